"""Partition handover. On revoke: finish (bounded) the work of the revoked partitions and
commit it. On lost (our membership was fenced, so another member may own them already):
drop that work without committing. aiokafka only calls ``on_partitions_revoked``; a lost
assignment shows as a reset generation when it does."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiokafka import ConsumerRebalanceListener, TopicPartition

from captionflow.errors import RebalanceFailedError
from captionflow.metrics import Metrics

log = logging.getLogger(__name__)

Partitions = set[TopicPartition]


class RebalanceHandler(ConsumerRebalanceListener):
    def __init__(self, *, on_assigned: Callable[[Partitions], None],
                 on_revoked: Callable[[Partitions], Awaitable[None]],
                 on_lost: Callable[[Partitions], None], is_lost: Callable[[], bool],
                 metrics: Metrics) -> None:
        self._on_assigned = on_assigned
        self._on_revoked = on_revoked
        self._on_lost = on_lost
        self._is_lost = is_lost
        self._metrics = metrics
        # aiokafka logs and swallows listener exceptions; the service polls this instead.
        self.error: RebalanceFailedError | None = None

    async def on_partitions_revoked(self, revoked: Partitions) -> None:
        if not revoked:
            return
        try:
            if self._is_lost():
                log.warning("partitions lost (membership fenced); dropping their work "
                            "uncommitted: %s", _names(revoked))
                self._metrics.rebalances.labels("lost").inc()
                self._on_lost(set(revoked))
                return
            log.info("partitions revoked; draining and committing: %s", _names(revoked))
            self._metrics.rebalances.labels("revoked").inc()
            await self._on_revoked(set(revoked))
        except Exception as e:
            self.error = RebalanceFailedError(
                f"handing back {_names(revoked)} failed: {e!r}")
            log.error("%s", self.error)

    async def on_partitions_assigned(self, assigned: Partitions) -> None:
        try:
            log.info("partitions assigned: %s", _names(assigned))
            self._metrics.rebalances.labels("assigned").inc()
            self._on_assigned(set(assigned))
        except Exception as e:
            self.error = RebalanceFailedError(f"taking over {_names(assigned)} failed: {e!r}")
            log.error("%s", self.error)


def _names(tps: Partitions) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(tps)) or "none"
