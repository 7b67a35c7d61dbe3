"""The reference tables in docs/ are what the code would write now (captionflow/docgen.py):
settings, metrics, error codes and CLI flags. Regenerate with ``python -m captionflow.docgen``."""

from __future__ import annotations

import shutil
from pathlib import Path

from captionflow import docgen


def test_generated_doc_tables_match_the_code() -> None:
    stale = docgen.stale()
    assert not stale, (f"docs out of date with the code: {', '.join(stale)}; "
                       f"run `{docgen.COMMAND}` and commit the result")


def test_every_setting_has_help() -> None:
    missing = docgen.settings_without_help()
    assert not missing, (f"settings without help: {missing}; give each a Field(description=...) "
                         "in captionflow/config.py, then run " + docgen.COMMAND)


def test_a_doc_that_drifts_is_named(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    shutil.copytree(docgen.DOCS, docs)
    settings = docs / "settings.md"
    text = settings.read_text()
    [row] = [line for line in text.splitlines() if line.startswith("| `kafka.request_timeout_")]
    cells = row.split(" | ")
    cells[3] = "`1`"  # the default column
    settings.write_text(text.replace(row, " | ".join(cells)))
    assert docgen.stale(docs) == ["docs/settings.md (settings)"]
    docgen.write(docs)
    assert docgen.stale(docs) == []
