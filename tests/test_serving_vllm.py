"""The vLLM backend on the real CPU engine with the tiny model (one engine for the module)."""

from __future__ import annotations

import asyncio

import pytest

from captionflow.errors import InvalidRequestError, PromptTooLongError
from captionflow.serving import CaptionRequest
from tests.support.model_fixtures import synthetic_clip

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="session"),
              pytest.mark.timeout(600),
              # vLLM's engine client leaves a zmq context for the garbage collector.
              pytest.mark.filterwarnings("ignore:Unclosed context:ResourceWarning"),
              pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")]


async def _hf(hf_backend_sync, request):
    return await hf_backend_sync.caption(request)


async def test_prompt_ids_equal_hf_processor(vllm_backend, hf_backend_sync):
    for seed, prompt in ((0, ""), (1, "What moves in this clip?")):
        request = CaptionRequest(f"p{seed}", synthetic_clip(seed, frames=6, fps=1.0), prompt)
        engine = await vllm_backend.caption(request)
        hf_ids = hf_backend_sync.processor_inputs(request)["input_ids"][0].tolist()
        assert list(engine.prompt_token_ids) == hf_ids
        assert engine.prompt_tokens == len(hf_ids)


# (8, 0.5) and (8, 1.0): the temporal position ids reach past the spatial ones, where
# transformers 5.19's own get_rope_index departs from Qwen2.5-VL's (docs/serving.md).
@pytest.mark.parametrize(("frames", "fps"), [(4, 2.0), (4, 0.5), (8, 4.0), (8, 0.5), (8, 1.0)])
async def test_greedy_tokens_equal_transformers(vllm_backend, hf_backend_sync, frames, fps):
    request = CaptionRequest(f"g{frames}-{fps}", synthetic_clip(0, frames=frames, fps=fps), "")
    engine = await vllm_backend.caption(request)
    reference = await _hf(hf_backend_sync, request)
    assert engine.prompt_token_ids == reference.prompt_token_ids
    assert engine.token_ids == reference.token_ids
    assert engine.completion_tokens == reference.completion_tokens > 0


@pytest.mark.parametrize(("frames", "fps", "prompt"), [
    (4, 2.0, ""), (4, 0.5, ""), (8, 4.0, ""), (8, 0.5, ""), (8, 1.0, "What moves?"),
    (40, 2.0, "")])
async def test_transformers_mrope_positions_equal_vllms(hf_backend_sync, frames, fps, prompt):
    # vLLM 0.32's own position function, fed the grid and temporal factor the processor made.
    import types

    import torch
    from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration

    inputs = hf_backend_sync.processor_inputs(
        CaptionRequest("pos", synthetic_clip(3, frames=frames, fps=fps), prompt))
    config = hf_backend_sync._model.config
    ids = inputs["input_ids"]
    t, h, w = inputs["video_grid_thw"][0].tolist()
    merge = config.vision_config.spatial_merge_size
    factor = float(inputs["second_per_grid_ts"][0]) * config.vision_config.tokens_per_second
    offset = int((ids[0] == config.video_token_id).nonzero()[0])
    grid = types.SimpleNamespace(iter_mm_grid_thw=lambda features: iter(
        [(offset, t, h // merge, w // merge, factor)]))
    want, want_delta = Qwen2_5_VLForConditionalGeneration.get_mrope_input_positions(
        grid, ids[0].tolist(), [])
    got, got_delta = hf_backend_sync._model.model.get_rope_index(
        ids, video_grid_thw=inputs["video_grid_thw"], attention_mask=inputs["attention_mask"],
        second_per_grid_ts=inputs["second_per_grid_ts"],
        mm_token_type_ids=inputs.get("mm_token_type_ids"))
    assert torch.equal(got[:, 0], want.to(got.dtype))
    assert int(got_delta) == want_delta


async def test_fps_reaches_the_engine(vllm_backend):
    # Same frames, different sampling rate: the temporal position ids change the output.
    slow = await vllm_backend.caption(CaptionRequest("f1", synthetic_clip(0, frames=8, fps=0.5), ""))
    fast = await vllm_backend.caption(CaptionRequest("f2", synthetic_clip(0, frames=8, fps=4.0), ""))
    assert slow.token_ids != fast.token_ids


async def test_64_concurrent_requests_match_their_solo_results(vllm_backend):
    shapes = [(4, 56, 84), (6, 56, 56), (4, 84, 112), (8, 56, 84)]
    requests = [CaptionRequest(f"event-{i}/w0/a1",
                               synthetic_clip(100 + i, frames=shapes[i % 4][0],
                                              height=shapes[i % 4][1], width=shapes[i % 4][2]),
                               "" if i % 3 else f"Caption number {i}.")
                for i in range(64)]
    solo = {}
    for request in requests:
        solo[request.request_id] = (await vllm_backend.caption(request)).token_ids
    assert len(set(solo.values())) > 8  # the inputs really give different outputs
    together = await asyncio.gather(*(vllm_backend.caption(r) for r in reversed(requests)))
    for request, result in zip(reversed(requests), together, strict=True):
        assert result.request_id == request.request_id
        assert result.token_ids == solo[request.request_id], request.request_id


async def test_too_long_prompt_fails_alone(vllm_backend):
    # 64 frames of 224x224: 64/2 * 8*8 = 2048 video tokens... times 2 = over max_model_len 4096.
    huge = CaptionRequest("too-long", synthetic_clip(7, frames=128, height=224, width=224), "")
    normal = [CaptionRequest(f"ok-{i}", synthetic_clip(200 + i), "") for i in range(4)]
    results = await asyncio.gather(*(vllm_backend.caption(r) for r in [*normal[:2], huge,
                                                                      *normal[2:]]),
                                   return_exceptions=True)
    assert isinstance(results[2], PromptTooLongError), results[2]
    assert "max_model_len" in str(results[2])
    for result in results[:2] + results[3:]:
        assert not isinstance(result, BaseException), result
        assert result.completion_tokens > 0
    assert await vllm_backend.healthy()


async def test_invalid_options_fail_only_that_request(vllm_backend):
    bad = [CaptionRequest("bad-topp", synthetic_clip(1), "", {"top_p": 7.0}),
           CaptionRequest("bad-key", synthetic_clip(1), "", {"beams": 2}),
           CaptionRequest("bad-max", synthetic_clip(1), "", {"max_tokens": 0})]
    good = CaptionRequest("good", synthetic_clip(2), "")
    results = await asyncio.gather(*(vllm_backend.caption(r) for r in [*bad, good]),
                                   return_exceptions=True)
    for result in results[:3]:
        assert isinstance(result, InvalidRequestError), result
    assert results[3].request_id == "good"


async def test_seeded_sampling_concurrent_and_reproducible(vllm_backend):
    # DataFlow's fixed seed crashed the CPU engine once prompts split across scheduler steps;
    # here 12 seeded requests (more than max_num_seqs=8) run at once, twice.
    def batch(tag):
        return [CaptionRequest(f"{tag}-{i}", synthetic_clip(300 + i, frames=6), "",
                               {"temperature": 1.0, "top_p": 0.95, "top_k": 50, "seed": 42 + i,
                                "max_tokens": 16})
                for i in range(12)]
    first = await asyncio.gather(*(vllm_backend.caption(r) for r in batch("a")))
    second = await asyncio.gather(*(vllm_backend.caption(r) for r in batch("b")))
    assert [r.token_ids for r in first] == [r.token_ids for r in second]
    greedy = await vllm_backend.caption(CaptionRequest("greedy", synthetic_clip(300, frames=6), "",
                                                       {"max_tokens": 16}))
    assert any(r.token_ids != greedy.token_ids for r in first[:1])
    assert await vllm_backend.healthy()


async def test_vllm_prometheus_metrics_enabled(vllm_backend):
    from prometheus_client import REGISTRY, generate_latest

    await vllm_backend.caption(CaptionRequest("m", synthetic_clip(3), ""))
    text = generate_latest(REGISTRY).decode()
    assert "vllm:prompt_tokens_total" in text or "vllm:prompt_tokens" in text
    assert "vllm:num_requests_running" in text
    assert vllm_backend.model_info()["model"].endswith("qwen2.5-vl-tiny")
