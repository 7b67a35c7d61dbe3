"""One plug-in point for video sources: a scheme registered through ``register_fetcher``
(here ``mem://``, a stand-in for ``gs://`` or ``hf://``) is captioned end to end by a real
worker on the real broker and the shared vLLM engine, like a local file; the built-in
schemes are registrations too, imported only when a reference of theirs arrives."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from captionflow.config import VideoSettings
from captionflow.producer import Publisher
from captionflow.schemas import decode_caption_event
from captionflow.schemas.events import VideoEvent
from captionflow.video import LocalVideo, register_fetcher
from captionflow.video.fetchers import fetcher_for
from tests.support.kafka_helpers import read_topic, wait_all_committed
from tests.support.worker_fixtures import reference_captions, running_worker, worker_settings

# What the mem:// store holds: key -> bytes.
MEM_STORE: dict[str, bytes] = {}
served: list[Path] = []


def fetch_mem(reference: str, settings: VideoSettings, download_dir: Path) -> LocalVideo:
    """Copy the object to a temporary file, as a real object-store fetcher would."""
    data = MEM_STORE[reference.removeprefix("mem://")]
    download_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="mem-", suffix=".mp4", dir=download_dir)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    served.append(Path(name))
    return LocalVideo(path=Path(name), size_bytes=len(data), temporary=True,
                      bytes_read=len(data))


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="session")
async def test_a_registered_scheme_is_captioned_by_the_worker(
        kafka, topics, group_id, vllm_backend, tiny_settings, caption_videos,
        tmp_path: Path) -> None:
    register_fetcher("mem", fetch_mem)
    videos = caption_videos[:2]
    for i, video in enumerate(videos):
        MEM_STORE[f"clips/v{i}.mp4"] = video.read_bytes()
    settings = worker_settings(kafka, topics, group_id, tiny_settings, (videos[0].parent,),
                               **{"video.allowed_schemes": ("file", "mem"),
                                  "video.download_dir": tmp_path})
    expected = await reference_captions(vllm_backend, settings, videos)
    references = [f"mem://clips/v{i}.mp4" for i in range(len(videos))]
    async with Publisher(kafka, topic=topics.input) as pub:
        for i, reference in enumerate(references):
            await pub.send(VideoEvent(id=f"mem-{i}", video=reference))
    async with running_worker(settings, vllm_backend):
        records = await read_topic(kafka, topics.output, expected=len(references),
                                   timeout_s=120)
        await wait_all_committed(kafka, topics.input, group_id)
    captions = {c.video[0]: c for c in map(decode_caption_event, (r.value for r in records))}
    assert sorted(captions) == references
    for i, video in enumerate(videos):
        got = captions[f"mem://clips/v{i}.mp4"]
        assert got.caption == expected[str(video)]
        assert got.video_info.frames_sampled == 4
    assert await read_topic(kafka, topics.dead_letter, expected=0, settle_s=0.2) == []
    assert len(served) >= len(references)
    assert not [p for p in served if p.exists()], "temporary downloads were not released"


def test_a_fetcher_registered_by_name_is_imported_on_first_use() -> None:
    register_fetcher("mem-by-name", "tests.test_fetcher_plugin:fetch_mem")
    assert fetcher_for("mem-by-name") is fetch_mem
    assert fetcher_for("never-registered") is None


def test_the_built_in_fetchers_load_only_when_their_scheme_is_used() -> None:
    """The generic fetcher imports neither the http(s) nor the s3 fetcher (nor boto3)."""
    code = ("import sys; import captionflow.video.fetchers as f; "
            "loaded = lambda: {m for m in ('captionflow.video.fetch', 'captionflow.video.s3', "
            "'boto3') if m in sys.modules}; "
            "assert not loaded(), loaded(); "
            "f.fetcher_for('https'); assert loaded() == {'captionflow.video.fetch'}, loaded(); "
            "f.fetcher_for('s3'); assert 'captionflow.video.s3' in loaded(), loaded()")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_a_broken_registration_is_a_config_error_at_start_not_a_dead_letter() -> None:
    import asyncio

    from captionflow.errors import ConfigError, ErrorCode, FatalError
    from captionflow.video import FrameSource

    register_fetcher("broken", "tests.no_such_module:fetch")
    with pytest.raises(FatalError, match="cannot be imported") as info:
        fetcher_for("broken")
    assert info.value.code == ErrorCode.CONFIG_INVALID

    async def start(schemes: tuple[str, ...]) -> None:
        frames = FrameSource(VideoSettings(allowed_schemes=schemes))
        try:
            await frames.start()
        finally:
            await frames.close()

    with pytest.raises(ConfigError, match="broken://"):
        asyncio.run(start(("file", "broken")))
    with pytest.raises(ConfigError, match="no fetcher is registered for gs://"):
        asyncio.run(start(("file", "gs")))
    asyncio.run(start(("file", "http", "https", "s3")))
