"""What captioning one event produced: each caption after the quality gate, by window and
by prompt, and the event's own captions (the only clip's, a summary, or the windows joined).
Shared by the worker's caption events and batch mode's rows."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from captionflow.quality import CaptionStatus, worst
from captionflow.schemas.events import CacheInfo, TokenUsage, WindowCaption
from captionflow.serving.base import CaptionResult
from captionflow.video.clip import Clip


def window_end_s(clip: Clip) -> float:
    return clip.end_s if clip.end_s is not None else clip.facts.duration_s


@dataclass(frozen=True, slots=True)
class Caption:
    """One caption after the quality gate: the attempt it kept, and every attempt's result
    and status (all their tokens were spent)."""

    text: str
    finish_reason: str
    status: CaptionStatus
    results: tuple[CaptionResult, ...] = ()
    statuses: tuple[CaptionStatus, ...] = ()
    parsed: Any = None
    # The caption cache's key for this caption, when it was looked up; ``hit``: it came
    # from the cache, and ``results`` replay the stored generations' usage (no engine work).
    key: str | None = None
    hit: bool = False

    @property
    def generations(self) -> int:
        return len(self.results)

    @property
    def regenerated_for(self) -> tuple[CaptionStatus, ...]:
        """The statuses that made the gate ask again, one per extra request."""
        return self.statuses[:-1]


@dataclass(frozen=True, slots=True)
class EventCaption:
    """``prompts`` maps prompt names to their text, the first one's caption being the
    event's ``caption``; ``windows`` holds each clip's captions by prompt name, and
    ``captions`` the event's: the only clip's, a window summary, or the windows joined with
    their time spans."""

    prompts: dict[str, str]
    named: bool
    captions: dict[str, Caption]
    windows: list[dict[str, Caption]]
    summarized: bool
    clips: list[Clip]
    fetch_decode_s: float
    caption_s: float

    @property
    def first(self) -> Caption:
        return next(iter(self.captions.values()))

    @property
    def text(self) -> str:
        return self.first.text

    @property
    def prompt(self) -> str:
        return next(iter(self.prompts.values()))

    @property
    def finish_reason(self) -> str:
        return self.first.finish_reason

    @property
    def status(self) -> CaptionStatus:
        return self.first.status

    def generated(self) -> list[Caption]:
        """Every caption the engine produced (window by window, then summaries)."""
        out = [c for w in self.windows for c in w.values()]
        if self.summarized:
            out.extend(self.captions.values())
        return out

    @property
    def results(self) -> list[CaptionResult]:
        return [r for c in self.generated() for r in c.results]

    def engine_made(self) -> list[Caption]:
        """The captions the engine made for this event (cache hits left out)."""
        return [c for c in self.generated() if not c.hit]

    @property
    def frames_decoded(self) -> int:
        """Frames decoded for this event (windows served from the cache were not)."""
        return sum(c.num_frames for c in self.clips if not c.extra.get("cached"))

    def cache_info(self) -> CacheInfo | None:
        looked_up = [c for c in self.generated() if c.key is not None]
        if not looked_up:
            return None
        if self.windowed and not self.summarized:
            keys = [c.key or "" for w in self.windows for c in w.values()]
            key = hashlib.sha256(",".join(keys).encode()).hexdigest()
        else:
            key = self.first.key or ""
        hits = sum(c.hit for c in looked_up)
        return CacheInfo(hit=hits == len(self.generated()), key=key, hits=hits,
                         lookups=len(looked_up))

    @property
    def prompt_tokens(self) -> int:
        return sum(r.prompt_tokens for r in self.results)

    @property
    def completion_tokens(self) -> int:
        return sum(r.completion_tokens for r in self.results)

    @property
    def frames_sampled(self) -> int:
        return sum(c.num_frames for c in self.clips)

    @property
    def windowed(self) -> bool:
        return len(self.clips) > 1 or self.clips[0].window_index is not None

    def window_captions(self) -> list[WindowCaption] | None:
        if not self.windowed:
            return None
        out = []
        for clip, by_name in zip(self.clips, self.windows, strict=True):
            first = next(iter(by_name.values()))
            out.append(WindowCaption(
                index=clip.window_index or 0, start_s=clip.start_s, end_s=window_end_s(clip),
                caption=first.text, finish_reason=first.finish_reason,
                usage=TokenUsage(prompt_tokens=sum(r.prompt_tokens for r in first.results),
                                 completion_tokens=sum(r.completion_tokens
                                                       for r in first.results)),
                status=first.status, generations=first.generations,
                captions={n: c.text for n, c in by_name.items()} if self.named else None,
                caption_json=first.parsed,
                cache_hit=all(c.hit for c in by_name.values())
                if first.key is not None else None))
        return out

    def quality_fields(self) -> dict[str, Any]:
        """The caption event's (and batch row's) status, gate and multi-prompt fields."""
        return {
            "status": self.status,
            "generations": len(self.results),
            "captions": {n: c.text for n, c in self.captions.items()} if self.named else None,
            "captions_status": {n: c.status for n, c in self.captions.items()}
            if self.named else None,
            "caption_json": self.first.parsed,
            "summarized": self.summarized,
            "cache": self.cache_info(),
        }


def summary_prompt(template: str, prompt: str, clips: list[Clip],
                   captions: list[Caption]) -> str:
    lines = "\n".join(f"[{c.start_s:.1f}s-{window_end_s(c):.1f}s] {k.text.strip()}"
                      for c, k in zip(clips, captions, strict=True))
    return f"{template}\nThe captions answer this request: {prompt}\n\n{lines}"


def joined(clips: list[Clip], captions: list[Caption]) -> Caption:
    """The windows' captions as one text, each line with its time span; the worst status."""
    text = "\n".join(f"[{c.start_s:.1f}s-{window_end_s(c):.1f}s] {k.text}"
                     for c, k in zip(clips, captions, strict=True))
    finish = "length" if any(k.finish_reason == "length" for k in captions) else "stop"
    return Caption(text=text, finish_reason=finish, status=worst([k.status for k in captions]))
