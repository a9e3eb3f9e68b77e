"""Greedy outputs of a LLaMA-architecture GGUF's own weights in transformers (fp32), against the
engine under several llama.cpp settings: which setting stays closest to exact arithmetic on the same
weights? (issue 15: on a CPU, flash attention and the prefix cache change near-tie tokens.)

The GGUF's tensors are dequantized with gguf-py (so both sides use identical weight values; llama.cpp
still rounds activations to 8 bits in its quantized matrix products, which the reference does not),
Q/K un-permuted from llama.cpp's rope layout, and loaded into ``transformers.LlamaForCausalLM``.
Prompts are the engine's own token ids for the 47 sample rows. Needs torch and transformers.

    python benchmarks/gguf_reference.py SmolLM2-135M-Instruct.Q4_1.gguf --out ref.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import llama_cpp  # noqa: F401  (llama.cpp before numpy/torch)

from capsfuse_lite import Fuser  # noqa: E402
from capsfuse_lite.bench.measure import load_pairs  # noqa: E402
from capsfuse_lite.engine.fuser import end_tokens, prompt_builder  # noqa: E402
from capsfuse_lite.engine.llama import Model  # noqa: E402
from capsfuse_lite.models import gguf_defaults  # noqa: E402


def hf_model(path: Path):
    import gguf
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    reader = gguf.GGUFReader(str(path))
    meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith("llama.")}
    n_head, n_kv = int(meta["llama.attention.head_count"]), int(meta["llama.attention.head_count_kv"])
    hidden, layers = int(meta["llama.embedding_length"]), int(meta["llama.block_count"])
    tensors = {t.name: t for t in reader.tensors}
    vocab = tensors["token_embd.weight"].shape[1] if "token_embd.weight" in tensors else int(meta["llama.vocab_size"])
    config = LlamaConfig(vocab_size=int(vocab), hidden_size=hidden, intermediate_size=int(meta["llama.feed_forward_length"]),
                         num_hidden_layers=layers, num_attention_heads=n_head, num_key_value_heads=n_kv,
                         rms_norm_eps=float(meta["llama.attention.layer_norm_rms_epsilon"]),
                         rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
                         max_position_embeddings=int(meta["llama.context_length"]),
                         tie_word_embeddings="output.weight" not in tensors)
    model = LlamaForCausalLM(config).float().eval()

    def weight(name: str) -> np.ndarray:
        t = tensors[name]
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        return np.asarray(data, dtype=np.float32).reshape([int(x) for x in reversed(t.shape)])

    def unpermute(w: np.ndarray, heads: int) -> np.ndarray:  # inverse of the converter's rope permutation
        return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    state = {"model.embed_tokens.weight": weight("token_embd.weight"), "model.norm.weight": weight("output_norm.weight")}
    if "output.weight" in tensors:
        state["lm_head.weight"] = weight("output.weight")
    names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
             "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    for i in range(layers):
        for short, long in names.items():
            w = weight(f"blk.{i}.{short}.weight")
            if short == "attn_q":
                w = unpermute(w, n_head)
            elif short == "attn_k":
                w = unpermute(w, n_kv)
            state[f"model.layers.{i}.{long}.weight"] = w
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    assert not unexpected and all("lm_head" in m or "rotary" in m for m in missing), (missing, unexpected)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


def greedy(model, ids: list[int], max_new: int, stop: set[int]) -> tuple[list[int], list[float]]:
    """Greedy tokens (end token excluded) and the top-2 margin at each step."""
    import torch

    out, margins = [], []
    with torch.no_grad():
        past, inp = None, torch.tensor([ids])
        for _ in range(max_new):
            res = model(input_ids=inp, past_key_values=past, use_cache=True)
            past = res.past_key_values
            logits = res.logits[0, -1].double()
            top = torch.topk(logits, 2)
            token = int(top.indices[0])
            margins.append(float(top.values[0] - top.values[1]))
            if token in stop:
                break
            out.append(token)
            inp = torch.tensor([[token]])
    return out, margins


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--rows", type=int, default=47)
    parser.add_argument("--max-new-tokens", type=int, default=80)
    parser.add_argument("--slots", default="1,16")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    pairs = load_pairs()[: args.rows]
    with Model(args.model) as m:
        meta = gguf_defaults(m.path)
        builder = prompt_builder(m, meta)
        prompts = [builder.build(*p).token_ids for p in pairs]
        stop = set(end_tokens(m, meta))
    model = hf_model(args.model)
    ref = [greedy(model, ids, args.max_new_tokens, stop) for ids in prompts]
    report = {"model": str(args.model), "rows": len(pairs), "max_new_tokens": args.max_new_tokens, "settings": []}
    for flash in (None, False):
        for cache in (True, False):
            for slots in (int(s) for s in args.slots.split(",")):
                with Fuser(args.model, slots=slots, beams=1, max_new_tokens=args.max_new_tokens, flash_attn=flash,
                           prefix_cache=cache, n_threads=2) as fuser:
                    outs = [r.token_ids for r in fuser.fuse(pairs)]
                    layout = "unified" if fuser.settings.get("kv_unified") else "streams"
                same, close = 0, []
                for (tokens, margins), got in zip(ref, outs):
                    if got == tokens:
                        same += 1
                        continue
                    d = next((i for i, (x, y) in enumerate(zip(tokens, got)) if x != y), min(len(tokens), len(got)))
                    close.append(round(margins[d], 3) if d < len(margins) else None)
                name = f"flash_attn={'auto' if flash is None else 'off'} prefix_cache={'on' if cache else 'off'} slots={slots} ({layout})"
                report["settings"].append({"setting": name, "identical": same, "reference_margins_at_differences": sorted(
                    m for m in close if m is not None)})
                print(f"{name}: {same}/{len(pairs)} rows identical to transformers fp32 on the same weights; "
                      f"reference margins where they differ: {sorted(m for m in close if m is not None)}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
