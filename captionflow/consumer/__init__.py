"""Consuming: the worker's data path and the subscriber."""
