"""The engine: CapsFus-LLaMA on llama.cpp, many rows at a time.

``llama`` (the only module that touches llama.cpp's C handles) and ``native`` (facts about the
installed libraries) at the bottom; ``prompts`` (upstream's template, the 256-token rule), ``plan``
(slots and KV layout before anything is allocated), ``search`` (greedy and HF-exact beam search),
``ubatch`` (llama.cpp's micro-batch split), ``scheduler`` (continuous batching, prefix reuse) and
``fuser`` (:class:`~capsfuse_lite.engine.fuser.Fuser`, the public face) above them. Nothing here
reads or writes a caption file.
"""
