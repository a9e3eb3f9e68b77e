"""CapsFus-LLaMA (HF LLaMA checkpoint) to GGUF, streaming and torch-free.

Installed as ``capsfuse_lite.convert``.
"""
