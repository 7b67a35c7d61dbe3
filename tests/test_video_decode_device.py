"""The GPU decode option (``video.decode_device``): same sampling, same frames, and every
fallback to the CPU decoders, on real encoded videos.

On a host without an NVIDIA driver (CI, this project's machines) the device cannot be
opened, so these tests drive the fallbacks for real. On an NVIDIA host
(``bench/gpu_decode_check.sh``) the same tests check that NVDEC decoded the frames and that
they match the CPU path within codec tolerance.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import orjson
import psutil
import pytest
from pydantic import ValidationError

from captionflow.config import VideoSettings
from captionflow.errors import DecodeDeviceUnavailableError, ErrorKind
from captionflow.video import decode as decode_module
from captionflow.video.decode import check_device, decode_frames
from captionflow.video.demux import probe
from captionflow.video.source import FrameSource
from tests.support.corpus import CorpusFile, _encode, read_index


def _cuda_decodes() -> bool:
    try:
        return check_device("cuda") is not None
    except DecodeDeviceUnavailableError:
        return False


CUDA = _cuda_decodes()
# Frames NVDEC and FFmpeg's software decoders both produce: the same bitstream decoded to
# the same pixels, then scaled by the same libswscale call (NV12 instead of planar YUV in).
MAX_MEAN_ABS_DIFF = 1.0
# PyAV opens AV1 with libdav1d, which has no hwaccel: AV1 stays on the CPU everywhere.
SOFTWARE_ONLY = {"av1_96x64_24fps.mkv"}
# Below NVDEC's smallest picture for the codec (HEVC 144x144, VP9 128x128 in NVIDIA's
# decoder documentation): the GPU refuses them and the CPU decodes them again.
BELOW_NVDEC_MINIMUM = {"hevc_128x96_24fps.mp4", "vp9_odd_65x49_15fps.webm"}
PLAYABLE = ["h264_160x120_30fps.mp4", "h264_longgop_128x96_25fps.mp4",
            "hevc_128x96_24fps.mp4", "vp9_odd_65x49_15fps.webm", "av1_96x64_24fps.mkv",
            "mpeg4_176x144_10fps.avi", "h264_rotated90_96x64.mp4", "h264_vfr_96x64.mp4"]


def _sample(file: CorpusFile) -> tuple[Path, list[int]]:
    indices = sorted({0, file.frames // 3, file.frames // 2, file.frames - 1})
    return Path(file.path), indices


@pytest.mark.parametrize("name", PLAYABLE)
def test_gpu_device_returns_the_cpu_paths_frames(video_corpus: dict[str, CorpusFile],
                                                 name: str) -> None:
    path, indices = _sample(video_corpus[name])
    index = probe(path, max_duration_s=60)
    cpu, cpu_stats = decode_frames(path, index, indices, height=64, width=96)
    gpu, gpu_stats = decode_frames(path, index, indices, height=64, width=96, device="cuda")

    assert gpu.shape == cpu.shape and gpu_stats.rotation_deg == cpu_stats.rotation_deg
    coded = np.rot90(gpu, k=-(gpu_stats.rotation_deg // 90), axes=(1, 2))  # as encoded
    assert [read_index(f) for f in coded] == indices
    assert cpu_stats.device == "cpu" and cpu_stats.device_fallback == ""
    if name in SOFTWARE_ONLY:
        assert (gpu_stats.device, gpu_stats.device_fallback) == ("cpu", "codec_unsupported")
        np.testing.assert_array_equal(gpu, cpu)
    elif CUDA and name in BELOW_NVDEC_MINIMUM:
        assert (gpu_stats.device, gpu_stats.device_fallback) in {
            ("cpu", "hw_decode_failed"), ("cuda", "")}
        if gpu_stats.device == "cpu":
            np.testing.assert_array_equal(gpu, cpu)
    elif CUDA:
        assert (gpu_stats.device, gpu_stats.device_fallback) == ("cuda", "")
        diff = np.abs(gpu.astype(np.int16) - cpu.astype(np.int16))
        assert float(diff.mean()) <= MAX_MEAN_ABS_DIFF, f"mean abs diff {diff.mean():.2f}"
    else:
        # No driver: FFmpeg refused the device, and the CPU decoders did the work.
        assert (gpu_stats.device, gpu_stats.device_fallback) == ("cpu", "device_unavailable")
        np.testing.assert_array_equal(gpu, cpu)


def test_codec_without_a_device_decoder_is_decoded_on_the_cpu(tmp_path: Path) -> None:
    # FFV1 has no NVDEC decoder on any GPU, so this fallback is the same on every host.
    path = tmp_path / "ffv1.mkv"
    _encode(path, "ffv1", width=64, height=48, fps=10, frames=12)
    index = probe(path, max_duration_s=60)
    frames, stats = decode_frames(path, index, [0, 5, 11], height=48, width=64,
                                  device="cuda")
    assert [read_index(f) for f in frames] == [0, 5, 11]
    assert (stats.device, stats.device_fallback) == ("cpu", "codec_unsupported")


@pytest.mark.parametrize("failure", ["hw_decode_failed", "device_out_of_memory"])
def test_a_failed_gpu_pass_is_decoded_again_on_the_cpu_from_scratch(
        video_corpus: dict[str, CorpusFile], monkeypatch: pytest.MonkeyPatch,
        failure: str) -> None:
    """A GPU pass that drops a frame (NVDEC refusing a profile mid-stream) or runs out of
    GPU memory must not fail the event, nor leave a clip mixing the two decoders' output,
    nor count the abandoned pass's work. Only the GPU pass is stood in for here."""
    path, indices = _sample(video_corpus["h264_160x120_30fps.mp4"])
    index = probe(path, max_duration_s=60)
    real = decode_module._decode_into

    def failing_gpu_pass(path, index, target_pts, got, stats, opts, *, fast, device="cpu"):
        if device == "cpu":
            return real(path, index, target_pts, got, stats, opts, fast=fast)
        stats.device = device
        real(path, index, target_pts[:-1], got, stats, opts, fast=fast)
        got[target_pts[0]] = np.zeros_like(got[target_pts[0]])  # must not survive
        stats.decode_errors += 3
        if failure == "device_out_of_memory":
            raise decode_module.out_of_memory(path.name)

    _, cpu_stats = decode_frames(path, index, indices, height=64, width=96)
    monkeypatch.setattr(decode_module, "_decode_into", failing_gpu_pass)
    frames, stats = decode_frames(path, index, indices, height=64, width=96, device="cuda")
    assert [read_index(f) for f in frames] == indices
    assert (stats.device, stats.device_fallback) == ("cpu", failure)
    assert dataclasses.replace(stats, device_fallback="") == cpu_stats


def test_decode_device_setting_accepts_cpu_and_cuda_devices_only() -> None:
    for device in ("cpu", "cuda", "cuda:0", "cuda:3"):
        assert VideoSettings(decode_device=device).decode_device == device
    for device in ("gpu", "cuda:", "CUDA", "vaapi", "cuda:x"):
        with pytest.raises(ValidationError):
            VideoSettings(decode_device=device)


@pytest.mark.skipif(CUDA, reason="an NVIDIA device opens on this host")
def test_check_device_names_the_missing_driver() -> None:
    assert check_device("cpu") is None
    with pytest.raises(DecodeDeviceUnavailableError) as caught:
        check_device("cuda")
    assert caught.value.kind is ErrorKind.FATAL and not caught.value.retriable
    assert "video.decode_device=cuda" in caught.value.message
    assert "nvidia-smi" in caught.value.message


@pytest.mark.skipif(CUDA, reason="an NVIDIA device opens on this host")
def test_frame_source_refuses_to_start_without_the_device(tmp_path: Path) -> None:
    """The decoder process finds out, the pool says so before any record, and nothing is
    left running."""
    settings = VideoSettings(allowed_roots=(tmp_path,), decode_device="cuda:0")
    # Other tests' workers may hold decoders of their own for the whole session.
    before = _decoder_processes()

    async def main() -> None:
        source = FrameSource(settings)
        with pytest.raises(DecodeDeviceUnavailableError, match="cuda:0"):
            async with source:
                pass
        assert source.pool.pids() == [] and source.pool.started == 1

    asyncio.run(main())
    assert _decoder_processes() - before == set()


def test_decoder_started_later_without_the_device_decodes_on_the_cpu(
        video_corpus: dict[str, CorpusFile], caplog: pytest.LogCaptureFixture) -> None:
    """Past the start-up check, a decoder process that cannot open the device (its memory
    taken by the engine, say) serves anyway: the clip is decoded on the CPU and says so."""
    file = video_corpus["h264_160x120_30fps.mp4"]
    settings = VideoSettings(allowed_roots=(Path(file.path).parent,), decode_device="cuda",
                             decode_workers=1)
    expected = FrameSource(VideoSettings(allowed_roots=(Path(file.path).parent,),
                                         decode_workers=1))

    async def main() -> tuple[list, list]:
        source = FrameSource(settings)  # no start(): as if the first decoder had opened it
        try:
            return await source.clips(file.path), await expected.clips(file.path)
        finally:
            await source.close()
            await expected.close()

    clips, cpu_clips = asyncio.run(main())
    if CUDA:
        assert clips[0].extra["decode_device"] == "cuda"
        return
    assert (clips[0].extra["decode_device"], clips[0].extra["device_fallback"]) == (
        "cpu", "device_unavailable")
    np.testing.assert_array_equal(clips[0].frames, cpu_clips[0].frames)
    assert "decodes on the CPU" in caplog.text


def _decoder_processes() -> set[int]:
    found = set()
    for process in psutil.Process().children(recursive=True):
        try:
            if "captionflow.video.decoder_process" in " ".join(process.cmdline()):
                found.add(process.pid)
        except psutil.NoSuchProcess:
            pass
    return found


@pytest.mark.skipif(CUDA, reason="an NVIDIA device opens on this host")
def test_batch_run_on_a_missing_device_exits_before_any_row(tmp_path: Path,
                                                          video_corpus: dict[str, CorpusFile]
                                                          ) -> None:
    """``captionflow run`` with the GPU option on a host without one: exit 1 with the code
    and what to do, before the engine is started (so within seconds) and with no output."""
    rows = tmp_path / "rows.jsonl"
    video = video_corpus["h264_160x120_30fps.mp4"].path
    rows.write_text(orjson.dumps({"id": "a", "video": video}).decode() + "\n")
    out = tmp_path / "out.jsonl"
    env = {**os.environ, "CAPTIONFLOW_VIDEO__DECODE_DEVICE": "cuda"}
    proc = subprocess.run(
        [sys.executable, "-m", "captionflow", "run", "--input", str(rows), "--output", str(out),
         "--model", str(tmp_path / "no-model-here"), "--allowed-root", str(tmp_path.parent.parent)],
        capture_output=True, text=True, timeout=120, env=env, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "decode_device_unavailable" in proc.stdout + proc.stderr
    assert "video.decode_device=cpu" in proc.stdout + proc.stderr
    # Rows stay as they came, uncaptioned and unfailed: a rerun with a device takes them.
    written = [orjson.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    assert all(set(row) == {"id", "video"} for row in written), written


@pytest.mark.skipif(CUDA, reason="an NVIDIA device opens on this host")
def test_batch_rerun_with_every_row_done_needs_no_device(tmp_path: Path) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text(orjson.dumps({"id": "a", "video": "a.mp4"}).decode() + "\n")
    out = tmp_path / "out.jsonl"
    out.write_text(orjson.dumps({"id": "a", "video": "a.mp4", "caption": "done"}).decode()
                   + "\n")
    env = {**os.environ, "CAPTIONFLOW_VIDEO__DECODE_DEVICE": "cuda"}
    proc = subprocess.run(
        [sys.executable, "-m", "captionflow", "run", "--input", str(rows), "--output",
         str(out), "--model", str(tmp_path / "no-model-here")],
        capture_output=True, text=True, timeout=120, env=env, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert orjson.loads(out.read_text())["caption"] == "done"


@pytest.mark.skipif(CUDA, reason="an NVIDIA device opens on this host")
def test_worker_on_a_missing_device_exits_before_the_engine_and_the_broker(
        tmp_path: Path) -> None:
    """``captionflow serve`` checks the decode device before it loads a model or joins the
    group: with neither a model nor a broker here, the device is what it names."""
    env = {**os.environ, "CAPTIONFLOW_VIDEO__DECODE_DEVICE": "cuda:0",
           "CAPTIONFLOW_METRICS__PORT": "0",
           "CAPTIONFLOW_SERVING__MODEL": str(tmp_path / "no-model-here"),
           "CAPTIONFLOW_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:1"}
    proc = subprocess.run([sys.executable, "-m", "captionflow", "serve"], capture_output=True,
                          text=True, timeout=120, env=env, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    output = " ".join((proc.stdout + proc.stderr).split())  # the console wraps long lines
    assert "[decode_device_unavailable] video.decode_device=cuda:0" in output
    assert "no-model-here" not in output and "127.0.0.1:1" not in output


def test_fallbacks_reach_the_metric_and_the_caption_event() -> None:
    """The worker's side of a fallback: the clip's reason is counted, and an event with any
    window decoded on the CPU says "cpu" (pure logic: a host here cannot produce a clip that
    the GPU decoded)."""
    pytest.importorskip("aiokafka")  # the consumer package; the GPU host's check lacks it
    from prometheus_client import CollectorRegistry

    from captionflow.consumer.frames import _TimedStream
    from captionflow.consumer.pipeline import _decode_device
    from captionflow.metrics import Metrics
    from captionflow.video.clip import Clip, VideoFacts

    def make_clip(device: str, fallback: str) -> Clip:
        return Clip(frames=np.zeros((2, 28, 28, 3), np.uint8), frame_indices=(0, 1),
                    timestamps_s=(0.0, 0.5), sample_fps=2.0,
                    facts=VideoFacts(duration_s=1.0, source_fps=2.0, total_frames=2,
                                     width=28, height=28, codec="h264"),
                    extra={"decode_device": device, "device_fallback": fallback})

    class Windows:
        count, fetch_decode_s = 2, 0.0
        clips = [make_clip("cuda", ""), make_clip("cpu", "hw_decode_failed")]

        async def clip(self, i: int) -> Clip:
            return self.clips[i]

        async def aclose(self) -> None:
            pass

    metrics = Metrics(CollectorRegistry())
    stream = _TimedStream(Windows(), lambda s: None, metrics)
    clips = asyncio.run(_all(stream))
    counted = {s.labels["reason"]: s.value for s in metrics.decode_device_fallbacks.collect()[0]
               .samples if s.name.endswith("_total")}
    assert counted == {"hw_decode_failed": 1.0}
    assert _decode_device(clips) == "cpu" and _decode_device(clips[:1]) == "cuda"
    assert _decode_device([]) is None


async def _all(stream) -> list:
    return [await stream.clip(i) for i in range(stream.count)]
