"""The caption cache: captions keyed by what was asked (``key.py``), kept in a store the
fleet shares (``stores.py``: a file store, an S3 prefix), looked up and filled by the caption
core for every window, prompt and summary (``cache.py``). docs/captions.md has the rule."""

from captionflow.cache.cache import CaptionCache, Claim, Pending, open_cache
from captionflow.cache.key import caption_key, engine_identity, request_identity
from captionflow.cache.stores import Store, open_store, register_store

__all__ = ["CaptionCache", "Claim", "Pending", "Store", "caption_key", "engine_identity",
           "open_cache", "open_store", "register_store", "request_identity"]
