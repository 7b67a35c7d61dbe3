"""Run a pipeline script and note when it reaches each stage, on the parent's clock.

    python bench/seed_timeline.py SCRIPT  (with SEEDBENCH_T0 and SEEDBENCH_TIMELINE set)

The same hooks serve both sides, so neither side's code changes: functions are wrapped
right after their module is first imported (a ``sys.meta_path`` finder), and each stage's
first (or last) time is written as JSON lines to ``$SEEDBENCH_TIMELINE``:

- ``imports``: the script's storage object is made (its top-level imports are done);
- ``engine_start`` / ``engine_ready``: vLLM's ``LLM`` or ``AsyncLLM`` is built;
- ``first_decoded``: the first video's frames are in this process (qwen-vl-utils'
  ``fetch_video`` on the seed's side, captionflow's frame source on the other);
- ``first_token``: vLLM's output processor first sees a generated token (common to both);
- ``last_written``: the last write of the output file;
- ``exit``: the parent notes when the process is gone.

The wall time of a profiled run is not the benchmark's: the hooks cost little, but the
measured runs go without them.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import inspect
import json
import os
import runpy
import sys
import time
from collections.abc import Callable
from typing import Any

_T0 = float(os.environ.get("SEEDBENCH_T0", time.time()))
_OUT = os.environ.get("SEEDBENCH_TIMELINE", os.devnull)
_seen: set[str] = set()


def mark(stage: str, *, last: bool = False) -> None:
    if stage in _seen and not last:
        return
    _seen.add(stage)
    with open(_OUT, "a", encoding="utf-8") as f:
        f.write(json.dumps({"stage": stage, "t": round(time.time() - _T0, 3),
                            "pid": os.getpid()}) + "\n")


def _wrap(owner: Any, name: str, before: str | None = None, after: str | None = None,
          *, last: bool = False, when: Callable[..., bool] | None = None) -> None:
    raw = owner.__dict__.get(name) if isinstance(owner, type) else None
    kind = type(raw) if isinstance(raw, (staticmethod, classmethod)) else None
    fn = raw.__func__ if kind else getattr(owner, name, None)
    if fn is None or getattr(fn, "_seedbench", False):
        return

    def done(out: Any, args: Any) -> Any:
        if after and (when is None or when(out, *args)):
            mark(after, last=last)
        return out

    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            if before:
                mark(before)
            return done(await fn(*args, **kwargs), args)
    else:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if before:
                mark(before)
            return done(fn(*args, **kwargs), args)

    wrapper._seedbench = True  # type: ignore[attr-defined]
    setattr(owner, name, kind(wrapper) if kind else wrapper)


def _has_tokens(_out: Any, _self: Any, outputs: Any, *_: Any) -> bool:
    return any(getattr(o, "new_token_ids", None) for o in outputs or ())


def _patch(module: Any) -> None:
    name = module.__name__
    if name == "vllm.entrypoints.llm":
        _wrap(module.LLM, "__init__", "engine_start", "engine_ready")
    elif name == "vllm.v1.engine.async_llm":
        _wrap(module.AsyncLLM, "from_engine_args", "engine_start", "engine_ready")
    elif name == "vllm.v1.engine.output_processor":
        _wrap(module.OutputProcessor, "process_outputs", after="first_token", when=_has_tokens)
    elif name == "qwen_vl_utils.vision_process":
        _wrap(module, "fetch_video", after="first_decoded")
    elif name == "captionflow.video.source":
        _wrap(module.VideoClips, "clip", after="first_decoded")
    elif name == "dataflow.utils.storage":
        _wrap(module.FileStorage, "__init__", before="imports")
        _wrap(module.FileStorage, "write", after="last_written", last=True)
    elif name == "captionflow.batch.storage":
        _wrap(module.FileStorage, "__init__", before="imports")
    elif name == "captionflow.batch.files":
        _wrap(module, "write_rows", after="last_written", last=True)


_TARGETS = {"vllm.entrypoints.llm", "vllm.v1.engine.async_llm",
            "vllm.v1.engine.output_processor", "qwen_vl_utils.vision_process",
            "captionflow.video.source", "dataflow.utils.storage", "captionflow.batch.storage",
            "captionflow.batch.files"}


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in _TARGETS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def patched_exec(module: Any) -> None:
            exec_module(module)
            _patch(module)

        spec.loader.exec_module = patched_exec  # type: ignore[method-assign]
        return spec


if __name__ == "__main__":
    sys.meta_path.insert(0, _PatchAfterImport())
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
