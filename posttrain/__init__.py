"""posttrain: DeepSeek-V3's post-training stack, readable and tested."""

__version__ = "0.1.0"
