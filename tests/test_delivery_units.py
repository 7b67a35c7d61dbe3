"""Pure logic of delivery under faults, without a broker or an engine: outputs that always
fit, the dependency gate, the poison guard, attempts that never charge a record for an
outage, engine stall accounting and the micro-batcher aborting abandoned requests."""

from __future__ import annotations

import asyncio
import hashlib

import orjson
import pytest

from captionflow.captioning import Attempts
from captionflow.config import WorkerSettings
from captionflow.consumer.batch import MicroBatcher
from captionflow.consumer.dependencies import DependencyGate
from captionflow.consumer.guard import PoisonGuard
from captionflow.consumer.publish import DROPPABLE_FIELDS, fit_caption, record_size
from captionflow.errors import (
    Dependency,
    DependencyState,
    EngineOverloadedError,
    EngineUnavailableError,
    ErrorCode,
    FetchFailedError,
    MalformedJsonError,
    ObjectStoreUnavailableError,
    OutputTooLargeError,
)
from captionflow.schemas.codec import dead_letter, decode_dead_letter_event, encode, now_rfc3339
from captionflow.schemas.events import CaptionEvent, TokenUsage, Turn, WindowCaption
from captionflow.serving.base import CaptionRequest, CaptionResult, EngineProgress
from tests.support.model_fixtures import synthetic_clip

LIMIT = 1_048_576


def _caption(*, caption: str = "a cat", metadata_bytes: int = 0,
             windows: int = 0) -> CaptionEvent:
    usage = TokenUsage(prompt_tokens=1, completion_tokens=1)
    return CaptionEvent(
        id="ev-1", video=["/v.mp4"], image=["/i.png"],
        conversation=[Turn.model_validate({"from": "human", "value": "describe"})],
        caption=caption, model="m", finish_reason="stop", usage=usage,
        windows=[WindowCaption(index=i, start_s=i, end_s=i + 1, caption="w" * 1000,
                               finish_reason="stop", usage=usage) for i in range(windows)]
        or None,
        metadata={"blob": "x" * metadata_bytes} if metadata_bytes else {},
        created_at=now_rfc3339())


def test_a_caption_that_fits_is_sent_whole() -> None:
    event = _caption(metadata_bytes=1000)
    value, dropped = fit_caption(event, "ev-1", LIMIT)
    assert (value, dropped) == (encode(event), [])


def test_echoed_metadata_is_dropped_first_and_the_caption_kept() -> None:
    value, dropped = fit_caption(_caption(metadata_bytes=1_046_000, windows=3), "ev-1", LIMIT)
    data = orjson.loads(value)
    assert dropped == ["metadata"] and data["dropped_fields"] == ["metadata"]
    assert data["caption"] == "a cat" and data["metadata"] == {} and len(data["windows"]) == 3
    assert record_size(b"ev-1", value) <= LIMIT


def test_fields_go_in_the_documented_order_until_it_fits() -> None:
    event = _caption(metadata_bytes=5000, windows=20)
    limit = record_size(b"ev-1", encode(event.model_copy(
        update={"metadata": {}, "image": None, "conversation": [], "windows": None,
                "dropped_fields": list(DROPPABLE_FIELDS)}))) + 10
    value, dropped = fit_caption(event, "ev-1", limit)
    assert dropped == list(DROPPABLE_FIELDS)
    assert orjson.loads(value)["caption"] == "a cat"


def test_a_caption_too_large_alone_is_an_output_too_large_error() -> None:
    with pytest.raises(OutputTooLargeError) as info:
        fit_caption(_caption(caption="y" * (LIMIT + 10)), "ev-1", LIMIT)
    assert info.value.code == ErrorCode.OUTPUT_TOO_LARGE and not info.value.retriable


@pytest.mark.parametrize("raw", [b"\xff" * 900_000, b"{" + b"a" * 2_097_152, None])
def test_dead_letters_carry_a_bounded_prefix_with_size_and_hash(raw: bytes | None) -> None:
    dl = dead_letter(raw, MalformedJsonError("bad"), key=b"k" * 5000,
                     payload_max_bytes=65_536)
    value = encode(dl)
    assert record_size(b"k", value) < 100_000
    back = decode_dead_letter_event(value)
    size = len(raw or b"")
    assert back.payload_size_bytes == size
    assert back.payload_sha256 == hashlib.sha256(raw or b"").hexdigest()
    assert back.payload_truncated == (size > 65_536)
    assert len(back.key or "") <= 1030


def test_a_small_payload_is_kept_whole() -> None:
    dl = dead_letter(b'{"id": 1}', MalformedJsonError("bad"), payload_max_bytes=65_536)
    assert (dl.payload, dl.payload_truncated, dl.payload_size_bytes) == ('{"id": 1}', False, 9)


# --- the poison guard ---------------------------------------------------------------------


def test_poison_guard_trips_on_a_full_window_of_one_code() -> None:
    guard = PoisonGuard(window_records=10, max_ratio=0.8)
    for _ in range(9):
        assert not guard.record("video_forbidden")  # window not full yet
    assert guard.record("video_forbidden")
    assert guard.tripped_code == "video_forbidden" and guard.holds("video_forbidden")
    assert not guard.holds("video_not_found") and not guard.holds(None)
    assert "video_forbidden" in guard.describe()


def test_poison_guard_ignores_mixed_failures_and_successes() -> None:
    guard = PoisonGuard(window_records=10, max_ratio=0.8)
    codes = ["video_forbidden", "video_not_found", None] * 20
    assert not any(guard.record(c) for c in codes)
    guard = PoisonGuard(window_records=10, max_ratio=0.8)
    for i in range(100):  # 8 of every 10 fail: at the ratio, not above it
        assert not guard.record("video_forbidden" if i % 10 < 8 else None)


def test_poison_guard_is_off_at_ratio_one() -> None:
    guard = PoisonGuard(window_records=2, max_ratio=1.0)
    assert not any(guard.record("internal") for _ in range(10))


# --- the dependency gate ------------------------------------------------------------------


async def test_gate_reports_a_healthy_dependency_as_the_records_own_failure() -> None:
    changes = []
    gate = DependencyGate({Dependency.ENGINE: _probe([True])}, probe_timeout_s=1,
                          backoff_initial_ms=10, backoff_max_ms=20,
                          on_change=lambda *c: changes.append(c))
    assert await gate.report(EngineUnavailableError("500")) is True
    assert changes == [] and gate.down() == {}
    await gate.close()


async def test_gate_pauses_until_the_dependency_answers_then_releases_every_waiter() -> None:
    changes = []
    answers = [False, False, False, True]
    gate = DependencyGate({Dependency.ENGINE: _probe(answers)}, probe_timeout_s=1,
                          backoff_initial_ms=10, backoff_max_ms=20,
                          on_change=lambda dep, up, why: changes.append((dep, up)))
    waiters = [asyncio.create_task(gate.report(EngineUnavailableError("refused")))
               for _ in range(3)]
    await asyncio.sleep(0.01)
    assert Dependency.ENGINE in gate.down()
    results = await asyncio.wait_for(asyncio.gather(*waiters), 5)
    assert results == [False, False, False]
    assert changes == [(Dependency.ENGINE, False), (Dependency.ENGINE, True)]
    assert gate.down() == {} and answers == []
    await gate.close()


async def test_gate_check_forgives_one_blip_but_not_two() -> None:
    answers = [False, True, False, False]
    gate = DependencyGate({Dependency.BROKER: _probe(answers)}, probe_timeout_s=1,
                          backoff_initial_ms=1000, backoff_max_ms=1000)
    assert await gate.check(Dependency.BROKER) is True and gate.down() == {}
    assert await gate.check(Dependency.BROKER) is False
    assert Dependency.BROKER in gate.down()
    await gate.close()


async def test_gate_counts_a_hanging_probe_as_down() -> None:
    async def hang() -> bool:
        await asyncio.sleep(60)
        return True

    gate = DependencyGate({Dependency.BROKER: hang}, probe_timeout_s=0.05,
                          backoff_initial_ms=10, backoff_max_ms=20)
    assert await gate.check(Dependency.BROKER) is False
    assert Dependency.BROKER in gate.down() and gate.down_for_s(Dependency.BROKER) >= 0
    await gate.close()


async def test_overload_is_never_charged_and_waits_out_its_retry_after() -> None:
    """The probe answers at once (a loaded `vllm serve` keeps answering /models), yet a 429
    is not the record's: it waits the Retry-After, then is retried uncounted."""
    changes = []
    gate = DependencyGate({Dependency.ENGINE: _probe([True] * 10)}, probe_timeout_s=1,
                          backoff_initial_ms=10, backoff_max_ms=20,
                          on_change=lambda dep, up, why: changes.append((dep, up)))
    loop = asyncio.get_running_loop()
    started = loop.time()
    charged = await asyncio.wait_for(
        gate.report(EngineOverloadedError("429", retry_after_s=0.3)), 5)
    assert charged is False and loop.time() - started >= 0.3
    assert changes == [(Dependency.ENGINE, False), (Dependency.ENGINE, True)]
    await gate.close()


async def test_a_probe_that_reports_a_refusal_keeps_the_dependency_misconfigured() -> None:
    states = []
    answers = [DependencyState.MISCONFIGURED] * 3 + [DependencyState.UP]
    gate = DependencyGate({Dependency.OBJECT_STORE: _probe(answers)}, probe_timeout_s=1,
                          backoff_initial_ms=10, backoff_max_ms=20,
                          on_change=lambda dep, up, why: states.append(gate.state(dep)))
    refused = ObjectStoreUnavailableError("InvalidAccessKeyId",
                                          state=DependencyState.MISCONFIGURED)
    waiter = asyncio.create_task(gate.report(refused))
    await asyncio.sleep(0.005)
    assert gate.state(Dependency.OBJECT_STORE) is DependencyState.MISCONFIGURED
    assert await asyncio.wait_for(waiter, 5) is False
    assert states == [DependencyState.MISCONFIGURED, DependencyState.UP] and answers == []
    await gate.close()


def _probe(answers: list):
    async def probe():
        return answers.pop(0) if answers else True
    return probe


# --- attempts -----------------------------------------------------------------------------


async def test_an_outage_is_never_charged_to_the_record() -> None:
    calls, outages = [], [False, False, False, False, False]

    async def fn() -> str:
        calls.append(1)
        if len(calls) <= 5:
            raise EngineUnavailableError("down")
        return "ok"

    async def on_dependency(error) -> bool:
        return outages.pop(0)  # False: it was down and came back

    attempts = Attempts(WorkerSettings(max_attempts=2, retry_backoff_ms=0),
                        on_dependency=on_dependency)
    assert await attempts.run(fn) == "ok"
    assert attempts.count == 1 and len(calls) == 6


async def test_a_record_failing_while_its_dependency_answers_ends_after_max_attempts() -> None:
    async def fn() -> str:
        raise EngineUnavailableError("500 for this request only")

    async def on_dependency(error) -> bool:
        return True

    attempts = Attempts(WorkerSettings(max_attempts=3, retry_backoff_ms=0),
                        on_dependency=on_dependency)
    with pytest.raises(EngineUnavailableError):
        await attempts.run(fn)
    assert attempts.count == 3


async def test_event_errors_keep_their_rule() -> None:
    calls = []

    async def fn() -> str:
        calls.append(1)
        raise FetchFailedError("503", retriable=True)

    attempts = Attempts(WorkerSettings(max_attempts=3, retry_backoff_ms=0))
    with pytest.raises(FetchFailedError):
        await attempts.run(fn)
    assert len(calls) == 3


# --- engine progress and the batcher ------------------------------------------------------


def test_stall_clock_runs_only_while_requests_wait(monkeypatch) -> None:
    now = [100.0]
    monkeypatch.setattr("captionflow.serving.base.time.monotonic", lambda: now[0])
    p = EngineProgress()
    now[0] = 200.0
    assert p.stalled_for_s() == 0.0  # idle: nothing owed
    p.started()
    now[0] = 230.0
    assert p.stalled_for_s() == 30.0
    p.progressed()
    now[0] = 235.0
    assert p.stalled_for_s() == 5.0
    p.ended(ok=False)
    assert p.stalled_for_s() == 0.0


async def test_a_cancelled_waiter_aborts_its_running_request() -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def run(request: CaptionRequest) -> CaptionResult:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        raise AssertionError("not reached")

    batcher = MicroBatcher(run, max_batch_size=1, max_wait_ms=0, max_in_engine=1)
    await batcher.start()
    waiter = asyncio.create_task(batcher.submit(CaptionRequest("r1", synthetic_clip(0), "")))
    await asyncio.wait_for(started.wait(), 5)
    waiter.cancel()
    await asyncio.wait_for(cancelled.wait(), 5)
    await batcher.close()


def test_rebalance_timeout_must_cover_the_revoke_drain_and_commit() -> None:
    with pytest.raises(ValueError, match="rebalance_timeout_ms"):
        WorkerSettings(revoke_grace_s=30, rebalance_timeout_ms=20_000)
    with pytest.raises(ValueError, match="twice worker.commit_timeout_ms"):
        WorkerSettings(revoke_grace_s=10, commit_timeout_ms=5000, rebalance_timeout_ms=15_000)
    WorkerSettings(revoke_grace_s=10, commit_timeout_ms=5000, rebalance_timeout_ms=20_000)


# --- stopping -------------------------------------------------------------------------------


@pytest.mark.parametrize("stopping", [False, True])
async def test_a_decoder_dying_while_the_worker_stops_is_not_the_records_fault(
        stopping: bool) -> None:
    from aiokafka.structs import ConsumerRecord

    from captionflow.config import Settings
    from captionflow.consumer.pipeline import RecordPipeline
    from captionflow.errors import DecodeCrashedError
    from captionflow.metrics import Metrics

    async def clips(reference, overrides):
        raise DecodeCrashedError("the decoder process died during probe: killed by SIGTERM")

    async def caption(request):
        raise AssertionError("nothing to caption")

    pipeline = RecordPipeline(Settings(), clips=clips, caption=caption, model_name="m",
                              metrics=Metrics.fresh(), worker_id="w",
                              stopping=lambda: stopping)
    record = ConsumerRecord("in", 0, 7, 0, 0, b"k", orjson.dumps({"id": "e", "video": ["v.mp4"]}),
                            None, 1, 20, ())
    if stopping:  # abandoned, uncommitted: the next owner gets it
        with pytest.raises(asyncio.CancelledError):
            await pipeline.process(record)
    else:
        output = await pipeline.process(record)
        assert output.error_code == ErrorCode.DECODE_CRASHED
