"""How many rows a batch run keeps in flight when the caller does not say."""

from __future__ import annotations

from captionflow.batch.runner import default_concurrency
from captionflow.config import Settings
from captionflow.serving.engine_plan import KV_MAX_SEQUENCES
from captionflow.serving.engine_setup import vllm_cpu_build


def test_default_follows_the_engine_batch_when_smaller() -> None:
    # The tiny CPU engine runs 8 requests at once: 8 more rows would only hold their frames.
    settings = Settings(serving={"max_num_seqs": 8}, video={"decode_workers": 2},
                        worker={"max_in_flight": 32})
    assert default_concurrency(settings) == 10


def test_default_is_max_in_flight_otherwise() -> None:
    # With max_num_seqs unset, a CPU build's engine plan sets it (KV_MAX_SEQUENCES).
    unset = default_concurrency(Settings(worker={"max_in_flight": 32}))
    assert unset == (KV_MAX_SEQUENCES + Settings().video.decode_workers
                     if vllm_cpu_build() else 32)
    assert default_concurrency(Settings(serving={"max_num_seqs": 256},
                                        worker={"max_in_flight": 32})) == 32
    remote = Settings(serving={"backend": "openai", "max_num_seqs": 4},
                      worker={"max_in_flight": 32})
    assert default_concurrency(remote) == 32
