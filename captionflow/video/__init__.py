"""Fetch video references and sample frames with PyAV."""

from captionflow.video.clip import Clip, ClipList, ClipStream, VideoFacts
from captionflow.video.fetchers import LocalVideo, fetch, register_fetcher
from captionflow.video.sampling import SamplingPolicy
from captionflow.video.source import FrameSource, VideoClips, load_clips
from captionflow.video.windows import Window, plan_windows

__all__ = ["Clip", "ClipList", "ClipStream", "FrameSource", "VideoClips", "LocalVideo", "SamplingPolicy", "VideoFacts", "Window",
           "fetch", "load_clips", "plan_windows", "register_fetcher"]
