"""captionflow: Kafka in, Qwen2.5-VL captions out."""

__version__ = "0.1.0"
