"""Dependency outages: which dependency is down, probing it back, and who waits for it.

A record that fails with a :class:`~captionflow.errors.DependencyError` is not at fault, so
it is neither retried blindly nor dead-lettered: it reports the error here and waits. The
first report probes the dependency at once. If the probe fails, the dependency is marked
down (the worker pauses every partition and turns not ready), one task probes it with
capped exponential backoff and jitter, and every waiting record resumes when it answers.

If the probe answers at once, the dependency is fine and the failure may be the record's
own (a request the server fails every time): the caller counts that attempt, so such a
record still ends as a dead letter after ``worker.max_attempts``.

Two answers are never the record's, whatever the probe says, because the dependency said
so itself (:class:`~captionflow.errors.DependencyState`): ``overloaded`` (429, ``SlowDown``)
and ``misconfigured`` (it refuses this worker's credentials or ACLs). Such a report marks
the dependency down at once, for at least the server's ``Retry-After`` (already capped by
whoever raised the error) or a backoff that grows while the refusals repeat, and is never
counted as an attempt. A probe can answer with a state too (a store probe that gets
``InvalidAccessKeyId`` is ``misconfigured``), which then names the state in readiness.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from tenacity import AsyncRetrying, retry_if_result, wait_exponential_jitter

from captionflow.errors import Dependency, DependencyError, DependencyState

log = logging.getLogger(__name__)

# A probe answers True (up), False (down) or the state the dependency itself reported.
Probe = Callable[[], Awaitable[bool | DependencyState]]
# States a dependency reports about this worker: never charged to a record.
NOT_THE_RECORDS = frozenset({DependencyState.OVERLOADED, DependencyState.MISCONFIGURED})


@dataclass(slots=True)
class _State:
    down_since: float | None = None
    reason: str = ""
    up: asyncio.Event = field(default_factory=asyncio.Event)
    prober: asyncio.Task[None] | None = None
    last_ok: float = 0.0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    state: DependencyState = DependencyState.UP
    hold_s: float = 0.0  # the prober's first probe waits this long
    strikes: int = 0  # overload/misconfigured reports in a row: the hold grows with them
    up_since: float = 0.0


class DependencyGate:
    """Tracks each dependency's state; ``on_change(dependency, up, reason)`` is called on
    every transition (metrics, readiness, pausing)."""

    def __init__(self, probes: dict[Dependency, Probe], *, probe_timeout_s: float,
                 backoff_initial_ms: int, backoff_max_ms: int,
                 on_change: Callable[[Dependency, bool, str], None] | None = None) -> None:
        self._probes = probes
        self._timeout_s = probe_timeout_s
        self._initial_s = backoff_initial_ms / 1000
        self._max_s = backoff_max_ms / 1000
        self._wait = wait_exponential_jitter(multiplier=backoff_initial_ms / 1000,
                                             max=backoff_max_ms / 1000,
                                             jitter=backoff_initial_ms / 1000)
        self._on_change = on_change
        self._states = {dep: _State() for dep in probes}
        for state in self._states.values():
            state.up.set()
        self._closed = False

    # --- state -----------------------------------------------------------------------------

    def down(self) -> dict[Dependency, str]:
        """Dependencies that are down now, with the reason."""
        return {dep: s.reason for dep, s in self._states.items() if s.down_since is not None}

    def down_for_s(self, dependency: Dependency) -> float:
        state = self._states.get(dependency)
        if state is None or state.down_since is None:
            return 0.0
        return time.monotonic() - state.down_since

    def state(self, dependency: Dependency) -> DependencyState:
        state = self._states.get(dependency)
        return DependencyState.UP if state is None else state.state

    # --- records ---------------------------------------------------------------------------

    async def report(self, error: DependencyError) -> bool:
        """Called by a record that failed with ``error``; returns once the dependency
        answers. True means it answered the first probe (count the attempt), False that
        it was down and came back (the record was not at fault)."""
        dep = error.dependency
        state = self._states.get(dep)
        if state is None:  # nothing to probe it with: treat as a plain retriable failure
            return True
        if error.state in NOT_THE_RECORDS:
            # One hold per outage: the records that meet it together do not stretch it.
            hold_s = self._hold_s(state, error) if state.down_since is None else 0.0
            self.mark_down(dep, str(error), error.state, hold_s=hold_s)
        elif state.down_since is None:
            async with state.lock:
                if state.down_since is None:
                    if time.monotonic() - state.last_ok < 1.0:
                        return True
                    answer = await self._probe(dep)
                    if answer is DependencyState.UP:
                        return True
                    self.mark_down(dep, str(error), answer)
        await state.up.wait()
        return False

    def _hold_s(self, state: _State, error: DependencyError) -> float:
        """How long an overloaded or refusing dependency is left alone: its own Retry-After,
        else a jittered backoff that doubles while its refusals keep coming."""
        if time.monotonic() - state.up_since > 2 * self._max_s:
            state.strikes = 0
        state.strikes += 1
        if error.retry_after_s is not None:
            return error.retry_after_s
        base = min(self._max_s, self._initial_s * 2 ** (state.strikes - 1))
        return base * random.uniform(0.5, 1.0)

    # --- watchers --------------------------------------------------------------------------

    def mark_down(self, dependency: Dependency, reason: str,
                  how: DependencyState = DependencyState.DOWN, *, hold_s: float = 0.0) -> None:
        """Mark a dependency down (a failed probe, a stalled engine, an overload or a
        refusal it reported); probing starts, after ``hold_s``."""
        state = self._states[dependency]
        state.reason = reason
        if how is DependencyState.UP:
            how = DependencyState.DOWN
        changed = state.state is not how
        state.state = how
        if state.down_since is not None or self._closed:
            if changed and self._on_change is not None:
                self._on_change(dependency, False, reason)
            return
        state.hold_s = hold_s
        state.down_since = time.monotonic()
        state.up.clear()
        log.warning("dependency %s is %s (%s); pausing and probing", dependency, how, reason)
        if self._on_change is not None:
            self._on_change(dependency, False, reason)
        state.prober = asyncio.create_task(self._probe_until_up(dependency),
                                           name=f"captionflow-probe-{dependency}")

    async def check(self, dependency: Dependency) -> bool:
        """One probe, from the readiness loop; marks the dependency down if it fails."""
        state = self._states[dependency]
        if state.down_since is not None:
            return False  # its prober owns it until it answers
        # Nothing has failed yet, so one failed probe may be a blip (a dropped connection
        # under load): a second one decides, which keeps readiness from flapping.
        answer = await self._probe(dependency)
        if answer is DependencyState.DOWN:
            answer = await self._probe(dependency)
        if answer is DependencyState.UP:
            return True
        why = "did not answer two probes" if answer is DependencyState.DOWN else \
            f"is {answer} (its probe says so)"
        self.mark_down(dependency, f"{dependency} {why}", answer)
        return False

    async def close(self) -> None:
        self._closed = True
        probers = [s.prober for s in self._states.values() if s.prober is not None]
        for task in probers:
            task.cancel()
        await asyncio.gather(*probers, return_exceptions=True)

    # --- probing ---------------------------------------------------------------------------

    async def _probe(self, dependency: Dependency) -> DependencyState:
        try:
            answer = await asyncio.wait_for(self._probes[dependency](), self._timeout_s)
        except (Exception, TimeoutError) as e:  # a probe that raises is a failed probe
            log.debug("probe of %s failed: %r", dependency, e)
            answer = False
        if not isinstance(answer, DependencyState):
            answer = DependencyState.UP if answer else DependencyState.DOWN
        if answer is DependencyState.UP:
            self._states[dependency].last_ok = time.monotonic()
        return answer

    async def _probe_until_up(self, dependency: Dependency) -> None:
        state = self._states[dependency]
        if state.hold_s > 0:
            await asyncio.sleep(state.hold_s)

        async def probe() -> DependencyState:
            answer = await self._probe(dependency)
            if answer is not DependencyState.UP and answer is not state.state and \
                    answer is not DependencyState.DOWN:
                # The dependency says more than "no answer" (a refusal of our credentials).
                self.mark_down(dependency, f"{dependency} is {answer} (its probe says so)",
                               answer)
            return answer

        async for attempt in AsyncRetrying(
                wait=self._wait, retry=retry_if_result(lambda a: a is not DependencyState.UP),
                reraise=True):
            with attempt:
                answer = await probe()
            if not attempt.retry_state.outcome.failed:
                attempt.retry_state.set_result(answer)
        now = time.monotonic()
        down_s = now - (state.down_since or now)
        log.warning("dependency %s answers again after %.1f s; resuming", dependency, down_s)
        state.down_since = None
        state.reason = ""
        state.state = DependencyState.UP
        state.up_since = now
        state.prober = None
        state.up.set()
        if self._on_change is not None:
            self._on_change(dependency, True, "")
