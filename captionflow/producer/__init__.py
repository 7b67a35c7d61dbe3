"""Publishing video-reference events."""

from captionflow.producer.publisher import Publisher, PublishReport
from captionflow.producer.sources import Candidate, Rejected, expand

__all__ = ["Candidate", "PublishReport", "Publisher", "Rejected", "expand"]
