"""Logging for the command line.

Interactive commands (demo, run, publish, subscribe) show captionflow's own lines; the
engine's libraries (vLLM, torch, Triton, transformers) and aiokafka only say something at
error level, unless ``--verbose``. ``serve`` logs like a service: every library at its own
level, for the operator's log pipeline.

vLLM configures its loggers from the environment when it is imported, and its engine core
runs in child processes that inherit the environment, so the quiet settings are written
to ``os.environ`` before anything imports vLLM. Values the user exported are kept.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Loggers of the libraries under the engine and the broker client.
THIRD_PARTY = ("vllm", "torch", "triton", "transformers", "huggingface_hub", "filelock",
               "urllib3", "httpx", "PIL", "numba")
# Environment read at import time by vLLM, torch's C++ core and Hugging Face libraries,
# here and in the engine's child processes.
QUIET_ENV = {
    "VLLM_LOGGING_LEVEL": "ERROR",
    "TORCH_CPP_LOG_LEVEL": "ERROR",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # Deprecation notices from inside the libraries, in the child processes too.
    "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning,ignore::UserWarning",
}


def _vllm_level_from_env() -> None:
    """vLLM applies VLLM_LOGGING_LEVEL only once an engine is configured, after its modules
    have logged their import-time warnings. Applied here, it holds from the start, also in
    the engine's spawned child processes, which import this module with the command line."""
    level = os.environ.get("VLLM_LOGGING_LEVEL", "").upper()
    if level in logging.getLevelNamesMapping():
        logging.getLogger("vllm").setLevel(level)


_vllm_level_from_env()


# Set to 1 for every library's own lines, in the CLI and in the Python API alike.
VERBOSE_ENV = "CAPTIONFLOW_VERBOSE"


def verbose_from_env() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def setup_library_logging() -> None:
    """The Python API (captionflow.dataflow), called from a user's script: as quiet as the
    CLI, unless CAPTIONFLOW_VERBOSE is set or the script configured logging itself (the
    root logger has handlers), in which case its configuration decides. Must run before
    vLLM is imported, for the same reason as :func:`setup_logging`."""
    if verbose_from_env() or logging.getLogger().handlers:
        return
    setup_logging(False)
    # Only captionflow's warnings: its progress bar and summary line say the rest.
    logging.getLogger().setLevel(logging.WARNING)


def setup_logging(verbose: bool = False, *, service: bool = False) -> None:
    """Configure logging once, at the entrypoint, before vLLM is imported."""
    verbose = verbose or verbose_from_env()
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format=FORMAT)
    # aiokafka's debug output is per request; nobody wants it interleaved with ours.
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    if verbose or service:
        return
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    for name in THIRD_PARTY:
        logging.getLogger(name).setLevel(logging.ERROR)
    # Start-up failures are raised as captionflow errors that name the cause; aiokafka's
    # own lines about them would say it twice.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    for category in (DeprecationWarning, FutureWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)
