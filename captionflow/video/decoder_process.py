"""A decoder child process: ``python -m captionflow.video.decoder_process FD LIMIT [DEVICE]``
(started by :class:`captionflow.video.pool.DecodePool`, never by hand; the pool's docstring
says why a fresh interpreter). It bounds its own memory, then serves probe and decode tasks
one at a time over the socket, handing frames back in a ``memfd``.

A module of its own, not imported by the package, so ``-m`` runs it exactly once.
"""

from __future__ import annotations

import math
import mmap
import os
import resource
import signal
import sys
import traceback
from dataclasses import asdict
from multiprocessing import reduction
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from captionflow.errors import (
    CaptionflowError,
    DecodeDeviceUnavailableError,
    ErrorCode,
    InternalError,
)
from captionflow.video.decode import check_device, decode_frames
from captionflow.video.demux import probe


def child_main(conn: Connection, memory_limit_bytes: int, device: str = "cpu") -> None:
    # Ctrl-C, and a SIGTERM sent to the whole process group (systemd's default
    # KillMode=control-group, `tini -g`, `kill -TERM -PGID`), reach the children too; the
    # worker decides when they stop: it drains, then closes the pool (SIGKILL), and a
    # child whose parent died sees its socket close and exits.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if memory_limit_bytes:
        resource.setrlimit(_limit_resource(device), (memory_limit_bytes, memory_limit_bytes))
    device_error = None
    try:
        held_device = check_device(device)  # noqa: F841 - held for this process's life
    except DecodeDeviceUnavailableError as e:
        device_error = e.message  # each decode then falls back to the CPU, counted
    conn.send(("ready", os.getpid(), device_error))  # task deadlines start counting now
    while True:
        try:
            task, kwargs = conn.recv()
        except (EOFError, OSError):
            return  # the parent closed the pipe or died
        try:
            if task == "probe":
                index = probe(**kwargs)
                conn.send(("ok", index, _peak_rss_bytes()))
            elif task == "decode":
                _decode_to_memfd(conn, device_error is not None, **kwargs)
            else:
                raise InternalError(f"unknown decoder task {task!r}")
        except (BrokenPipeError, ConnectionResetError):
            return  # the parent died mid-task: nobody is left to answer
        except MemoryError:
            conn.send(_out_of_memory(memory_limit_bytes))
        except Exception as e:
            # FFmpeg reports a failed allocation in many ways (EAGAIN from the scaler, a
            # frame it "cannot decode"); a failure while the address space touched the
            # limit is the limit's doing.
            if _touched_limit(memory_limit_bytes, device):
                conn.send(_out_of_memory(memory_limit_bytes))
            elif isinstance(e, CaptionflowError):
                conn.send(("error", type(e).__name__, str(e.code), e.message, e.retriable))
            else:
                conn.send(("bug", f"{e!r}\n{traceback.format_exc(limit=8)}"))


def _out_of_memory(limit: int) -> tuple[Any, ...]:
    return ("error", "DecodeOutOfMemoryError", str(ErrorCode.DECODE_OUT_OF_MEMORY),
            f"the decoder ran out of memory (video.decode_memory_limit_bytes={limit}); send a "
            "smaller video or raise the limit", False)


def _limit_resource(device: str) -> int:
    # The CUDA driver reserves tens of GiB of address space it never touches, so on a GPU
    # device only the data segment (heap and private writable mappings) is bounded.
    return resource.RLIMIT_AS if device == "cpu" else resource.RLIMIT_DATA


def _touched_limit(limit: int, device: str = "cpu") -> bool:
    """Whether this process's peak address space (its data segment now, on a GPU device)
    came within 64 MiB of ``limit``."""
    if not limit:
        return False
    key = "VmPeak:" if device == "cpu" else "VmData:"
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key):
                return int(line.split()[1]) * 1024 >= limit - (64 << 20)
    return False


def _decode_to_memfd(conn: Connection, no_device: bool, **kwargs: Any) -> None:
    fd = os.memfd_create("captionflow-frames", os.MFD_CLOEXEC)
    holder: list[mmap.mmap] = []

    def alloc(shape: tuple[int, ...]) -> np.ndarray:
        size = math.prod(shape)
        os.ftruncate(fd, size)
        holder.append(mmap.mmap(fd, size))
        return np.ndarray(shape, np.uint8, buffer=holder[0])

    # A child that could not open the GPU at start decodes on the CPU without trying again:
    # each try creates and drops a CUDA context beside the engine's.
    skipped_device = no_device and kwargs.get("device", "cpu") != "cpu"
    if skipped_device:
        kwargs["device"] = "cpu"
    try:
        frames, stats = decode_frames(alloc=alloc, **kwargs)
        if skipped_device:
            stats.device_fallback = "device_unavailable"
        shape = frames.shape
        del frames
        conn.send(("frames", shape, asdict(stats), _peak_rss_bytes()))
        reduction.send_handle(conn, fd, os.getppid())
    finally:
        for mm in holder:
            try:
                mm.close()
            except BufferError:
                pass  # an error's traceback still holds the array; the mapping goes with it
        os.close(fd)


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


if __name__ == "__main__":
    child_main(Connection(int(sys.argv[1])), int(sys.argv[2]), *sys.argv[3:4])
