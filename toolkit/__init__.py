"""LoRA post-training toolkit for NVIDIA Cosmos-Predict2 Video2World (2B, 14B)."""

__version__ = "0.1.0"
