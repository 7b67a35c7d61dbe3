"""What every ``captionflow`` command shares: the error console, the common options, and
settings built once, at the entrypoint (an error in them exits 2 with the fix)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from captionflow.config import Settings
from captionflow.errors import CaptionflowError, ConfigError

err = Console(stderr=True)

ConfigOpt = Annotated[Path | None, typer.Option(
    "--config", "-c", help="TOML or JSON settings file (also CAPTIONFLOW_CONFIG).",
    exists=True, dir_okay=False)]
BootstrapOpt = Annotated[str | None, typer.Option(
    "--bootstrap-servers", "-b", help="Kafka bootstrap servers (kafka.bootstrap_servers).")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")]


def load_settings(config: Path | None, **overrides: Any) -> Settings:
    """Build the settings or exit 2 with the message that says what to fix."""
    try:
        return Settings.load(config, overrides)
    except CaptionflowError as e:
        err.print(f"[red]error:[/red] {e.message}")
        raise typer.Exit(2) from e


def fail(e: CaptionflowError, code: int | None = None) -> typer.Exit:
    """Print the error; exit 2 for settings to change (ConfigError), else 1."""
    err.print(f"[red]error:[/red] {escape(str(e))}")
    return typer.Exit(code if code is not None else 2 if isinstance(e, ConfigError) else 1)
