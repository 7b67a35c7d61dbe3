"""Dependency outages: which dependency is down, probing it back, and who waits for it.

A record that fails with a :class:`~captionflow.errors.DependencyError` is not at fault, so
it is neither retried blindly nor dead-lettered: it reports the error here and waits. The
first report probes the dependency at once. If the probe fails, the dependency is marked
down (the worker pauses every partition and turns not ready), one task probes it with
capped exponential backoff and jitter, and every waiting record resumes when it answers.

If the probe answers at once, the dependency is fine and the failure may be the record's
own (a request the server fails every time): the caller counts that attempt, so such a
record still ends as a dead letter after ``worker.max_attempts``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from tenacity import AsyncRetrying, retry_if_result, wait_exponential_jitter

from captionflow.errors import Dependency, DependencyError

log = logging.getLogger(__name__)

Probe = Callable[[], Awaitable[bool]]


@dataclass(slots=True)
class _State:
    down_since: float | None = None
    reason: str = ""
    up: asyncio.Event = field(default_factory=asyncio.Event)
    prober: asyncio.Task[None] | None = None
    last_ok: float = 0.0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class DependencyGate:
    """Tracks each dependency's state; ``on_change(dependency, up, reason)`` is called on
    every transition (metrics, readiness, pausing)."""

    def __init__(self, probes: dict[Dependency, Probe], *, probe_timeout_s: float,
                 backoff_initial_ms: int, backoff_max_ms: int,
                 on_change: Callable[[Dependency, bool, str], None] | None = None) -> None:
        self._probes = probes
        self._timeout_s = probe_timeout_s
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

    # --- records ---------------------------------------------------------------------------

    async def report(self, error: DependencyError) -> bool:
        """Called by a record that failed with ``error``; returns once the dependency
        answers. True means it answered the first probe (count the attempt), False that
        it was down and came back (the record was not at fault)."""
        dep = error.dependency
        state = self._states.get(dep)
        if state is None:  # nothing to probe it with: treat as a plain retriable failure
            return True
        if state.down_since is None:
            async with state.lock:
                if state.down_since is None:
                    if time.monotonic() - state.last_ok < 1.0 or await self._probe(dep):
                        return True
                    self.mark_down(dep, str(error))
        await state.up.wait()
        return False

    # --- watchers --------------------------------------------------------------------------

    def mark_down(self, dependency: Dependency, reason: str) -> None:
        """Mark a dependency down (a failed probe, a stalled engine); probing starts."""
        state = self._states[dependency]
        state.reason = reason
        if state.down_since is not None or self._closed:
            return
        state.down_since = time.monotonic()
        state.up.clear()
        log.warning("dependency %s is down (%s); pausing and probing", dependency, reason)
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
        ok = await self._probe(dependency) or await self._probe(dependency)
        if not ok:
            self.mark_down(dependency, f"{dependency} did not answer two probes")
        return ok

    async def close(self) -> None:
        self._closed = True
        probers = [s.prober for s in self._states.values() if s.prober is not None]
        for task in probers:
            task.cancel()
        await asyncio.gather(*probers, return_exceptions=True)

    # --- probing ---------------------------------------------------------------------------

    async def _probe(self, dependency: Dependency) -> bool:
        try:
            ok = bool(await asyncio.wait_for(self._probes[dependency](), self._timeout_s))
        except (Exception, TimeoutError) as e:  # a probe that raises is a failed probe
            log.debug("probe of %s failed: %r", dependency, e)
            ok = False
        if ok:
            self._states[dependency].last_ok = time.monotonic()
        return ok

    async def _probe_until_up(self, dependency: Dependency) -> None:
        state = self._states[dependency]
        async for attempt in AsyncRetrying(wait=self._wait, retry=retry_if_result(lambda ok: not ok),
                                           reraise=True):
            with attempt:
                ok = await self._probe(dependency)
            if not attempt.retry_state.outcome.failed:
                attempt.retry_state.set_result(ok)
        down_s = time.monotonic() - (state.down_since or time.monotonic())
        log.warning("dependency %s answers again after %.1f s; resuming", dependency, down_s)
        state.down_since = None
        state.reason = ""
        state.prober = None
        state.up.set()
        if self._on_change is not None:
            self._on_change(dependency, True, "")
