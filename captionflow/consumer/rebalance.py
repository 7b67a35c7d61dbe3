"""Partition handover under aiokafka's eager protocol, where every rebalance revokes every
partition and the next assignment hands most of them straight back.

- **Revoked:** the service commits what finished (still in the old generation, before this
  member rejoins) and the partitions are *pending*: their in-flight work goes on, but no
  output is published and nothing is committed for them until the next assignment says
  who owns them.
- **Assigned:** a pending partition that came back is *kept*: its work continues where it
  was, publishes and commits as before, and fetching resumes after the last record it
  consumed. One that did not come back *moved*: its work is cancelled (aborting its engine
  requests) and dropped uncommitted, so the new owner, which starts at the committed
  offset, redelivers it and this member never commits that partition again.
- **Lost** (our membership was fenced, so another member may own the partitions already):
  drop that work without committing. aiokafka only calls ``on_partitions_revoked``; a lost
  assignment shows as a reset generation when it does. A revoke whose commit the group
  refuses (it moved to a new generation without this member) is lost too: the work is
  redone by the next owner, which costs duplicates, not a restart of this worker.

Gating publication on the assignment is what makes a kept partition safe: whatever
finished while the group rebalanced is published only by the member that owns it after.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiokafka import ConsumerRebalanceListener, TopicPartition

from captionflow.config import WorkerSettings
from captionflow.errors import RebalanceFailedError
from captionflow.metrics import Metrics

log = logging.getLogger(__name__)

Partitions = set[TopicPartition]


def consumer_options(w: WorkerSettings) -> dict[str, Any]:
    """The group member's consumer options: manual commits, the group timeouts, and static
    membership (``group_instance_id``) when ``worker.group_instance_id`` is set."""
    return {"group_id": w.group_id, "group_instance_id": w.group_instance_id,
            "enable_auto_commit": False, "auto_offset_reset": w.auto_offset_reset,
            "session_timeout_ms": w.session_timeout_ms,
            "heartbeat_interval_ms": w.heartbeat_interval_ms,
            "max_poll_interval_ms": w.max_poll_interval_ms,
            "rebalance_timeout_ms": w.rebalance_timeout_ms,
            "max_poll_records": w.max_poll_records}


class RevokeCommitRefused(Exception):
    """The revoke's commit failed: the partitions are to be handled as lost."""


class RebalanceHandler(ConsumerRebalanceListener):
    def __init__(self, *, on_assigned: Callable[[Partitions], None],
                 on_revoked: Callable[[Partitions], Awaitable[None]],
                 on_kept: Callable[[Partitions], None],
                 on_moved: Callable[[Partitions], None],
                 on_lost: Callable[[Partitions], None], is_lost: Callable[[], bool],
                 metrics: Metrics) -> None:
        self._on_assigned = on_assigned
        self._on_revoked = on_revoked
        self._on_kept = on_kept
        self._on_moved = on_moved
        self._on_lost = on_lost
        self._is_lost = is_lost
        self._metrics = metrics
        # Revoked partitions whose next owner is not known yet, each with the highest
        # offset that may still publish (-1: none).
        self._held: dict[TopicPartition, int] = {}
        self._settled = asyncio.Event()
        self._settled.set()
        # aiokafka logs and swallows listener exceptions; the service polls this instead.
        self.error: RebalanceFailedError | None = None

    def hold(self, tps: Partitions, *, up_to: Mapping[TopicPartition, int] | None = None
             ) -> None:
        """From now until the next assignment, records of ``tps`` may not publish; with
        ``up_to``, only those above ``up_to[tp]`` (while a revoke waits for the holes below
        it, a record above them that published could not be committed)."""
        for tp in tps:
            self._held[tp] = (up_to or {}).get(tp, -1)
        self._settled.clear()

    def pending(self) -> Partitions:
        return set(self._held)

    async def settled(self, tp: TopicPartition, offset: int) -> None:
        """Return once record ``offset`` of ``tp`` may publish: its partition is not waiting
        for an assignment, or the record is below what is held. A task whose partition
        moved is cancelled by ``on_moved`` while it waits here."""
        while offset > self._held.get(tp, offset):
            await self._settled.wait()

    async def on_partitions_revoked(self, revoked: Partitions) -> None:
        if not revoked:
            return
        try:
            if self._is_lost():
                self._lose(revoked, "membership fenced")
                return
            log.info("partitions revoked; committing what finished, in-flight work waits "
                     "for the next assignment: %s", _names(revoked))
            self._metrics.rebalances.labels("revoked").inc()
            # This member owns the partitions until it rejoins: while the revoke waits for
            # holes, the holes may still publish (one that finishes is then covered by the
            # revoke's commit). The revoke holds everything else, then all, before it commits.
            try:
                await self._on_revoked(set(revoked))
            except RevokeCommitRefused as e:
                self._lose(revoked, f"the revoke's commit failed: {e}")
                return
            self.hold(revoked)
        except Exception as e:
            self.error = RebalanceFailedError(
                f"handing back {_names(revoked)} failed: {e!r}")
            log.error("%s", self.error)

    def _lose(self, revoked: Partitions, why: str) -> None:
        log.warning("partitions lost (%s); dropping their work uncommitted: %s", why,
                    _names(revoked))
        self._metrics.rebalances.labels("lost").inc()
        for tp in revoked:
            self._held.pop(tp, None)
        if not self._held:
            self._settled.set()
        self._on_lost(set(revoked))

    async def on_partitions_assigned(self, assigned: Partitions) -> None:
        pending = set(self._held)
        self._held = {}
        try:
            moved, kept = pending - assigned, pending & assigned
            if moved:
                log.info("partitions moved to other members; cancelling their unfinished "
                         "work, left uncommitted for the new owner: %s", _names(moved))
                self._metrics.rebalances.labels("moved").inc()
                self._on_moved(moved)
            if kept:
                log.info("partitions kept; their in-flight work goes on: %s", _names(kept))
                self._metrics.rebalances.labels("kept").inc()
                self._on_kept(kept)
            log.info("partitions assigned: %s", _names(assigned))
            self._metrics.rebalances.labels("assigned").inc()
            self._on_assigned(set(assigned))
        except Exception as e:
            self.error = RebalanceFailedError(f"taking over {_names(assigned)} failed: {e!r}")
            log.error("%s", self.error)
        finally:
            self._settled.set()


def _names(tps: Partitions) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(tps)) or "none"
