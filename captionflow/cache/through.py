"""One clip's (or one summary's) captions through the cache: hits are used, misses are
made once and stored, captions another task is making are waited for."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping

from captionflow.cache.cache import CaptionCache, Claim, Pending
from captionflow.caption_result import Caption

MakeAll = Callable[[list[str]], Awaitable[dict[str, Caption]]]


async def through_cache(cache: CaptionCache | None, keys: Mapping[str, str | None],
                        make_all: MakeAll, *,
                        before_make: Callable[[], Awaitable[None]] | None = None,
                        ) -> dict[str, Caption]:
    """Captions by name. ``keys`` maps each name to its cache key (None: not cacheable);
    ``make_all(names)`` makes those captions with the engine; ``before_make`` (a decode) is
    awaited once, only if something must be made. Names that share a key share one
    caption."""
    found: dict[str, Caption] = {}
    claims: dict[str, Claim] = {}
    pending: dict[str, Pending] = {}
    if cache is not None:
        unique = list(dict.fromkeys(k for k in keys.values() if k is not None))
        tasks = [asyncio.ensure_future(cache.lookup(k)) for k in unique]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for task in tasks:
                if not task.cancelled() and isinstance(task.exception() or task.result(),
                                                       Claim):
                    task.result().abandon()
            raise
        for key, task in zip(unique, tasks, strict=True):
            outcome = task.result()
            if isinstance(outcome, Claim):
                claims[key] = outcome
            elif isinstance(outcome, Pending):
                pending[key] = outcome
            else:
                found[key] = outcome
    prepared = False
    try:
        # Own claims first, waits after: a task never waits while holding a claim that
        # the task it waits for might be waiting on.
        todo = [n for n, k in keys.items() if k is None or k in claims]
        by_name = await _make(todo, keys, make_all, before_make, claims) if todo else {}
        prepared = bool(todo)
        for key, waiting in pending.items():
            caption = await waiting.wait()
            if caption is not None:
                assert cache is not None
                found[key] = cache.waiter_hit(caption)
        left = [n for n, k in keys.items() if n not in by_name and k not in found]
        if left:
            # A maker failed: make these here, uncoalesced.
            by_name.update(await _make(left, keys, make_all,
                                       None if prepared else before_make, {}))
    finally:
        for claim in claims.values():
            claim.abandon()
    return {n: by_name[n] if n in by_name else found[k]  # type: ignore[index]
            for n, k in keys.items()}


async def _make(names: list[str], keys: Mapping[str, str | None], make_all: MakeAll,
                before_make: Callable[[], Awaitable[None]] | None,
                claims: dict[str, Claim]) -> dict[str, Caption]:
    if before_make is not None:
        await before_make()
    # One request per distinct key (two names asking the same thing share it).
    first: dict[str, str] = {}
    ask = []
    for n in names:
        k = keys[n]
        if k is None or k not in first:
            ask.append(n)
            if k is not None:
                first[k] = n
    made = await make_all(ask)
    out: dict[str, Caption] = {}
    for n in ask:
        k = keys[n]
        caption = made[n]
        if k is not None and k in claims:
            caption = await claims[k].fulfil(caption)
        out[n] = caption
    for n in names:
        k = keys[n]
        if n not in out and k is not None:
            out[n] = out[first[k]]
    return out
