"""``captionflow samples`` and ``captionflow tiny-model``: something to caption, and something
to caption it with, for trying captionflow on a machine without videos or model weights."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from captionflow.logs import setup_logging


def samples(
    directory: Annotated[Path, typer.Argument(help="Where the clips go (created).")
                         ] = Path("videos"),
    count: Annotated[int, typer.Option(help="How many clips (1-4).", min=1, max=4)] = 4,
) -> None:
    """Write short sample clips (2 s, H.264): a coloured square crossing the frame."""
    from captionflow.samples import make_sample_videos

    for path in make_sample_videos(directory, count):
        print(path)


def tiny_model(
    directory: Annotated[Path, typer.Argument(help="Parent folder of the model (created).")
                         ] = Path("models"),
) -> None:
    """Build a tiny random-weight Qwen2.5-VL, to try captionflow without model weights.

    Written to DIRECTORY/qwen2.5-vl-tiny, offline, in seconds. Every code path runs for real;
    only the weights are random, so its captions are gibberish. Serve it with
    `captionflow serve --model DIRECTORY/qwen2.5-vl-tiny`."""
    setup_logging()
    # Built from a config: nothing to download.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from captionflow.serving.tiny_model import TINY_MODEL_DIRNAME, build_tiny_model

    existing = directory / TINY_MODEL_DIRNAME
    path = existing if (existing / "config.json").exists() else build_tiny_model(directory)
    print(path)
