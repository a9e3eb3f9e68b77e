"""Upstream CapsFusion constants and the GGUF metadata keys that carry them.

The converter writes these under ``capsfuse.*`` in every GGUF; ``fuse`` reads them back as its
defaults (falling back to the constants here for GGUFs made by other tools).
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_HUB_REPO = "BAAI/CapsFus-LLaMA"

# Byte for byte what upstream builds (CapsFusion's inference script); {raw} is the stripped
# `laion_2b` alt-text and {synthetic} the stripped `laion_coco` BLIP caption.
PROMPT_TEMPLATE = (
    "Please merge and refine the information from the two given sentences. "
    "Sentence 1 provides detailed real-world knowledge, yet it suffers from flaws in sentence "
    "structure and grammar. Sentence 2 exhibits nice sentence structure, but lacking in-depth "
    "real-world details and may contain false information. Please combine them into a new "
    "sentence, ensuring a well-structured sentence while retaining the detailed real-world "
    "information provided in Sentence 1. Avoid simply concatenating the sentences.\n\n"
    "Sentence 1: {raw}\nSentence 2: {synthetic}\nNew Sentence:"
)

MAX_INPUT_TOKENS = 256  # prompt budget, BOS included
NUM_BEAMS = 3
MAX_NEW_TOKENS = 80
# transformers 4.28 counted the left padding (prompts padded to 256) in the beam-search length
# normalisation; 256 reproduces how CapsFusion-120M was generated, 0 current transformers.
LENGTH_OFFSET = 256

# How a prompt meets a model's own chat template (`fuse --chat-template`): "none" feeds upstream's
# prompt text as it is (CapsFus-LLaMA was trained on that); "auto" makes it the user message of the
# GGUF's chat template (tokenizer.chat_template), for other instruct models.
CHAT_TEMPLATES = ("none", "auto")

RAW_FIELD = "laion_2b"
SYNTHETIC_FIELD = "laion_coco"
OUTPUT_FIELD = "capsfusion"

# GGUF metadata keys written by `capsfuse-lite convert`.
KEY_PROMPT_TEMPLATE = "capsfuse.prompt_template"
KEY_MAX_INPUT_TOKENS = "capsfuse.max_input_tokens"
KEY_NUM_BEAMS = "capsfuse.num_beams"
KEY_MAX_NEW_TOKENS = "capsfuse.max_new_tokens"
KEY_LENGTH_OFFSET = "capsfuse.length_offset"
KEY_SOURCE = "capsfuse.source"
KEY_REVISION = "capsfuse.revision"
KEY_SOURCE_SHA256 = "capsfuse.source_sha256"  # JSON object: file name -> sha256
KEY_CONVERTER_VERSION = "capsfuse.converter_version"
# Written by `capsfuse-lite bench-model` only: true when the weights are random (benchmark models).
KEY_RANDOM_WEIGHTS = "capsfuse.random_weights"

# Files shipped inside the package (sample captions, the LLaMA vocabulary for bench-model).
PACKAGE_DATA = Path(__file__).resolve().parent / "data"
