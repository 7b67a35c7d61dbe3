"""Fetch video references and sample frames with PyAV."""

from captionflow.video.clip import Clip, VideoFacts

__all__ = ["Clip", "VideoFacts"]
