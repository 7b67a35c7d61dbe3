"""captionflow's vLLM plugin: the fast Qwen2-VL video preprocessing
(:mod:`captionflow.serving.fast_video_processor`) in every vLLM process of an environment
where captionflow is installed.

The in-process engine installs that path itself; this is for a ``vllm serve`` (the openai
backend's server) started in the same environment, whose API server process runs the
multimodal processor and is where a GPU host's CPU goes. vLLM loads the plugin from the
``vllm.general_plugins`` entry point in each of its processes; ``VLLM_PLUGINS`` set to a
list without ``captionflow_fast_video`` (or to nothing) turns it off."""

from __future__ import annotations

import logging

from captionflow.serving import fast_video_processor

# A child of vLLM's "vllm" logger, so the line lands in the server's own log. The server
# loads plugins while it parses its arguments, before it configures that logger, so the
# line is written at the first clip rather than here.
log = logging.getLogger("vllm.captionflow")


def register() -> None:
    fast_video_processor.install(announce_to=log)
