"""Reference tables generated from the code, written into docs/ between markers.

``python -m captionflow.docgen`` rewrites every generated block; ``--check`` only says which
differ (tests/test_docs_generated.py runs it). A block starts with
``<!-- generated: NAME (python -m captionflow.docgen) -->`` and ends with
``<!-- end generated: NAME -->``; everything outside the markers is prose kept by hand.

- ``settings`` (docs/settings.md): every field of ``config.py``: name, environment
  variable, type, default, and its help: the field's ``description``, else the comment
  right above it (a comment above a group of fields belongs to the first one only).
- ``metrics`` (docs/metrics.md): name, type, labels and help of every ``metrics.py`` metric.
- ``errors`` (docs/errors.md): code, kind and retriable of every ``errors.py`` code.
- ``cli`` (docs/cli.md): every command of the ``captionflow`` CLI and its flags.

The metrics and errors tables keep hand-written columns after the generated ones (a
metric's unit and meaning, an error's cause and remedy), matched by the first column, so
the code decides what rows exist and what their facts are, and the prose stays prose.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
COMMAND = "python -m captionflow.docgen"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# --- settings ---------------------------------------------------------------------------------


def _field_comments(cls: type) -> dict[str, str]:
    """Each field's comment in the class's source: the ``#`` block right above it, else its
    line's trailing comment, else the block above the run of fields it belongs to when that
    block names it (``s3_min_read_bytes`` in a comment over three s3 fields)."""
    source = inspect.getsource(cls)
    lines = source.splitlines()
    found: dict[str, str] = {}
    group = ""
    previous_end = -2
    for node in ast.parse(source).body[0].body:  # type: ignore[attr-defined]
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            previous_end = -2
            continue
        block: list[str] = []
        i = node.lineno - 2
        while i >= 0 and lines[i].strip().startswith("#"):
            block.insert(0, lines[i].strip().lstrip("#").strip())
            i -= 1
        trailing = lines[node.end_lineno - 1].partition("  # ")[2].strip()  # type: ignore[operator]
        if block:
            group = " ".join(block)
        elif node.lineno - 1 != previous_end:
            group = ""
        previous_end = node.end_lineno  # type: ignore[assignment]
        named = group if re.search(rf"\b{node.target.id}\b", group) else ""
        text = " ".join(block) if block else trailing or named
        if text:
            found[node.target.id] = text
    return found


def _annotation_texts(cls: type) -> dict[str, str]:
    source = inspect.getsource(cls)
    out = {}
    for node in ast.parse(source).body[0].body:  # type: ignore[attr-defined]
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = ast.unparse(node.annotation)
    return out


def _default(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    else:
        value = field.default
    if value is None:
        return "—"
    if isinstance(value, BaseModel):
        return "(section)"
    if isinstance(value, str):
        return f"`{value!r}`" if value == "" or value != value.strip() else f"`{value}`"
    if isinstance(value, tuple):
        return "`" + (", ".join(str(v) for v in value) or "(empty)") + "`"
    if isinstance(value, dict):
        return "`" + ", ".join(f"{k}={v}" for k, v in value.items()) + "`"
    return f"`{value}`"


def setting_rows() -> list[list[str]]:
    from captionflow.config import ENV_PREFIX, Settings

    rows = []
    for section, section_field in Settings.model_fields.items():
        cls = section_field.annotation
        assert isinstance(cls, type) and issubclass(cls, BaseModel), section
        comments = _field_comments(cls)
        types = _annotation_texts(cls)
        for name, field in cls.model_fields.items():
            help_text = field.description or comments.get(name, "")
            rows.append([f"`{section}.{name}`",
                         f"`{ENV_PREFIX}{section.upper()}__{name.upper()}`",
                         f"`{types.get(name, '')}`", _default(field), help_text])
    return rows


def settings_without_help() -> list[str]:
    return [row[0].strip("`") for row in setting_rows() if not row[4]]


# --- metrics ----------------------------------------------------------------------------------


def metric_rows() -> list[list[str]]:
    from prometheus_client import CollectorRegistry

    from captionflow.metrics import Metrics

    metrics = Metrics(CollectorRegistry())
    rows = []
    for value in vars(metrics).values():
        kind = getattr(value, "_type", None)
        if kind is None:
            continue
        name = value._name + ("_total" if kind == "counter" else "")
        labels = ", ".join(f"`{label}`" for label in value._labelnames) or "—"
        rows.append([f"`{name}`", kind, labels, value._documentation])
    return rows


# --- errors -----------------------------------------------------------------------------------


def error_rows() -> list[list[str]]:
    from captionflow import errors

    def subclasses(cls: type) -> Iterator[type]:
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    facts: dict[str, tuple[str, str]] = {}
    for cls in subclasses(errors.CaptionflowError):
        if "code" not in vars(cls):
            continue  # a base class: its subclasses name the codes
        fact = (str(cls.kind), "yes" if cls.retriable else "no")
        assert facts.setdefault(str(cls.code), fact) == fact, f"{cls.code}: two kinds"
    return [[f"`{code}`", *facts.get(str(code), ("?", "?"))] for code in errors.ErrorCode]


# --- cli --------------------------------------------------------------------------------------


def cli_rows() -> list[list[str]]:
    import typer

    from captionflow.cli import app

    group: Any = typer.main.get_command(app)
    rows = []
    for name, command in sorted(group.commands.items()):
        if command.hidden:
            continue
        summary = (command.help or command.short_help or "").strip().split("\n\n")[0]
        rows.append([f"`captionflow {name}`", "", "", summary])
        for param in command.params:
            if param.name == "help" or getattr(param, "hidden", False):
                continue
            if param.param_type_name == "argument":
                flag = f"`{(param.metavar or param.name).upper()}`"
            else:
                flag = ", ".join(f"`{o}`" for o in [*param.opts, *param.secondary_opts])
            default = param.default
            shown = ("—" if default is None or callable(default) or default == () else
                     f"`{default}`")
            if getattr(param, "is_flag", False) and default is False:
                shown = "off"
            rows.append(["", flag, shown, getattr(param, "help", None) or ""])
    return rows


# --- blocks -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    name: str
    doc: Path
    header: list[str]
    rows: Callable[[], list[list[str]]]
    # Generated columns; the rest are kept by hand, matched by the first column.
    generated: int

    def render(self, current: str | None) -> str:
        kept: dict[str, list[str]] = {}
        if current is not None and self.generated < len(self.header):
            for line in current.splitlines()[2:]:
                cells = _split_row(line)
                if cells:
                    kept[cells[0]] = cells[self.generated:]
        # Rows keep the order the doc gives them (the code's order for new ones), so that
        # hand edits and merges touch only their own rows.
        order = {key: i for i, key in enumerate(kept)}
        generated = sorted(self.rows(), key=lambda row: order.get(_cell(row[0]), len(order)))
        rows = []
        for row in generated:
            hand = kept.get(_cell(row[0]), [""] * (len(self.header) - self.generated))
            rows.append([*row, *hand])
        return _table(self.header, rows)


def _split_row(line: str) -> list[str]:
    line = line.strip()
    if not line.startswith("|"):
        return []
    return [c.strip().replace("\x00", "\\|")
            for c in line.replace("\\|", "\x00").strip("|").split("|")]


BLOCKS = [
    Block("settings", DOCS / "settings.md", ["setting", "environment variable", "type",
                                             "default", "help"], setting_rows, 5),
    Block("metrics", DOCS / "metrics.md", ["name", "type", "labels", "help", "unit", "meaning"],
          metric_rows, 4),
    Block("errors", DOCS / "errors.md", ["code", "kind", "retriable", "what happened",
                                         "what to do", "caused in"], error_rows, 3),
    Block("cli", DOCS / "cli.md", ["command", "flag", "default", "help"], cli_rows, 4),
]


def _markers(name: str) -> tuple[str, str]:
    return (f"<!-- generated: {name} ({COMMAND}) -->", f"<!-- end generated: {name} -->")


def _pattern(name: str) -> re.Pattern[str]:
    start, end = _markers(name)
    return re.compile(re.escape(start) + r"\n(.*?)\n?" + re.escape(end), re.S)


def rendered(block: Block, text: str) -> str:
    """``text`` (the doc) with ``block`` as the code would write it now."""
    match = _pattern(block.name).search(text)
    if match is None:
        raise ValueError(f"{block.doc.relative_to(REPO)} has no {_markers(block.name)[0]!r} "
                         f"... {_markers(block.name)[1]!r} block")
    start, end = _markers(block.name)
    table = block.render(match.group(1))
    return text[:match.start()] + f"{start}\n{table}\n{end}" + text[match.end():]


def stale(docs: Path = DOCS) -> list[str]:
    """The generated blocks that differ from what the code would write now."""
    out = []
    for block in BLOCKS:
        path = docs / block.doc.name
        text = path.read_text()
        if rendered(block, text) != text:
            out.append(f"{path.relative_to(docs.parent)} ({block.name})")
    return out


def write(docs: Path = DOCS) -> list[str]:
    changed = []
    for block in BLOCKS:
        path = docs / block.doc.name
        text = path.read_text()
        new = rendered(block, text)
        if new != text:
            path.write_text(new)
            changed.append(str(path.relative_to(docs.parent)))
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 naming the blocks that differ")
    args = parser.parse_args(argv)
    if args.check:
        differ = stale()
        for name in differ:
            print(f"stale: {name}; run `{COMMAND}`")
        return 1 if differ else 0
    for name in write():
        print(f"wrote {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
