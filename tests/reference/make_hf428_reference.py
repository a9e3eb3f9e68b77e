"""Regenerate tests/fixtures/hf428_reference.json.gz: upstream CapsFusion's decoding, run by
transformers 4.28.1 itself, on the tiny test checkpoints.

Usage (from the repository root, in the project's venv; transformers 4.28.1 lives in a side venv
because the tests need a current transformers):

    python3 -m venv /work/venv428
    /work/venv428/bin/pip install "transformers==4.28.1" "torch==2.13.0" "numpy<2" sentencepiece protobuf
    python tests/reference/make_hf428_reference.py --python428 /work/venv428/bin/python

Two phases, one script:

1. ``build`` (the project venv: current transformers, torch 2.13.0, llama.cpp): builds the tiny
   checkpoint exactly as tests/conftest.py does (``make_llama_checkpoint`` defaults, seed 0) and
   its EOS variant (tests/fidelity.py), fingerprints their weights, converts the base checkpoint to
   an f32 GGUF and builds the 47 sample prompts with the project's PromptBuilder (llama.cpp's
   tokenizer; equal to sentencepiece's), then runs phase 2 in the 4.28 venv and writes the fixture.
2. ``generate`` (the 4.28.1 venv; imports only torch and transformers): upstream's procedure from
   ``capsfusion_inference.py`` -- batches of 4 in input order, each prompt left-padded to 256 with
   ``[PAD]`` (id 32000, attention mask 0), then ``model.generate(input_ids=..., attention_mask=...,
   num_beams=3, max_new_tokens=80)`` with the checkpoint's generation config (deterministic beam
   search: ``do_sample`` False, ``length_penalty`` 1.0, ``early_stopping`` False). The token content is our
   unpadded prompt ids, so the comparison isolates the search; as a side check, the 4.28 tokenizer
   call upstream made (``AutoTokenizer(padding_side="left")``, ``padding="max_length"``,
   ``max_length=256``, ``truncation=True``) is run on our prompt texts and the rows whose ids and
   masks come out identical are counted (4.28 converts the slow tokenizer to a fast one with
   protobuf; phase 2 runs with ``PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python`` for current
   protobuf releases).

About 30 minutes on two busy CPU cores (most of it the 94 row-alone runs).

Float32, not upstream's bf16: the fixture checks the engine's search against 4.28's, so both sides
must see the same logits up to float noise; the engine's exact mode is an f32 GGUF with an f32 KV
cache (llama.cpp and torch f32 log-probabilities agree to ~1e-5). bf16 would move logits by ~1e-2
and turn every near-tie into noise, for no information about the search.

Each model is generated twice: in upstream's batches of 4 (the reference) and one row at a time
(still padded to 256). They can differ because 4.28.1's ``BeamSearchScorer.process`` increments
``cur_len`` inside its loop over the batch: the stop test of the row at batch position ``j``
divides by ``P + n - 1 + (1 + the number of rows before it in the batch not yet done)``, so
upstream's stopping step depended on a row's batch partners (``P + n`` for a row alone).

Stored per model and row: the generated ids (EOS stripped), the finish reason, the step at which
4.28 marked the row done (``None``: it ran to ``max_new_tokens`` and was finalised), every
hypothesis 4.28 kept (normalised score, generated ids), the search trace of the batched run (per
step, per running beam in 4.28's order, the ``TOP_K`` best tokens with their log-probabilities, from
``output_scores``), and ``per_row``: the same fields for the run alone (no trace: a row alone stops
no later than in a batch, so its search is a prefix of the batched one). Done steps and hypotheses are read from ``BeamSearchScorer``'s state by
wrappers that call the original methods unchanged. The prompt ids (unpadded) are stored once.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
OUT = TESTS / "fixtures" / "hf428_reference.json.gz"

SETTINGS = {
    "num_beams": 3,
    "max_new_tokens": 80,
    "batch_size": 4,
    "pad_to": 256,
    "pad_id": 32000,
    "eos_id": 2,
    "dtype": "float32",
    "top_k": 7,
}


# -- phase 1: the project venv ----------------------------------------------------------------------


def build(python428: str, out: Path) -> None:
    sys.path.insert(0, str(TESTS))
    from checkpoints import make_llama_checkpoint
    from fidelity import STOP_SCALE, STOP_TOKEN, make_eos_variant, weight_fingerprint

    from capsfuse_lite import defaults
    from capsfuse_lite.convert import convert_checkpoint
    from capsfuse_lite.engine.fuser import PromptPreview

    rows = json.loads((TESTS / "fixtures" / "capsfusion_sample.json").read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = make_llama_checkpoint(work / "tiny_llama")  # tests/conftest.py's tiny_llama_dir
        eos = make_eos_variant(base, work / "tiny_eos")
        gguf = convert_checkpoint(base, work / "tiny-f32.gguf", out_type="f32", progress=False)
        with PromptPreview(gguf) as preview:
            prompts = [preview.build(r[defaults.RAW_FIELD], r[defaults.SYNTHETIC_FIELD]) for r in rows]
        job = {
            "settings": SETTINGS,
            "prompt_ids": [p.token_ids for p in prompts],
            "prompt_texts": [p.text for p in prompts],
            "models": {"base": str(base), "eos": str(eos)},
        }
        (work / "job.json").write_text(json.dumps(job))
        env = {**os.environ, "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION": "python", "TOKENIZERS_PARALLELISM": "false"}
        subprocess.run([python428, str(Path(__file__).resolve()), "generate", str(work)], check=True, env=env)
        result = json.loads((work / "result.json").read_text())
        fixture = {
            "generator": "tests/reference/make_hf428_reference.py",
            **result["versions"],
            "settings": SETTINGS,
            "generation_config": result["generation_config"],
            "checks": result["checks"],
            "prompt_ids": job["prompt_ids"],
            "models": {
                "base": {"checkpoint": "make_llama_checkpoint() defaults (tests/conftest.py tiny_llama_dir)",
                         "fingerprint": weight_fingerprint(base), "rows": result["models"]["base"]},
                "eos": {"checkpoint": f"make_eos_variant(base, token={STOP_TOKEN}, scale={STOP_SCALE})",
                        "stop_token": STOP_TOKEN, "stop_scale": STOP_SCALE,
                        "fingerprint": weight_fingerprint(eos), "rows": result["models"]["eos"]},
            },
        }
    out.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps(fixture, separators=(",", ":")).encode("utf-8")
    with open(out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as f:
        f.write(data)  # mtime=0: the same reference gives the same bytes
    for name, model in fixture["models"].items():
        rows = model["rows"]
        reasons = [r["finish_reason"] for r in rows]
        coupled = [i for i, r in enumerate(rows) if r["done_step"] != r["per_row"]["done_step"]]
        changed = [i for i, r in enumerate(rows) if r["generated_ids"] != r["per_row"]["generated_ids"]]
        print(f"{name}: {len(rows)} rows, {reasons.count('eos')} ended by EOS, "
              f"{sum(r['done_step'] is not None for r in rows)} stopped before max_new_tokens; batch of 4 vs "
              f"alone: stop step differs in rows {coupled}, output differs in rows {changed}")
    print(f"checks: {json.dumps(fixture['checks'])}")
    print(f"wrote {out} ({out.stat().st_size} bytes)")


# -- phase 2: the transformers 4.28.1 venv ------------------------------------------------------------


def generate(work: Path) -> None:
    import torch
    import transformers
    from transformers import AutoTokenizer, LlamaForCausalLM
    from transformers.generation.beam_search import BeamSearchScorer

    if transformers.__version__ != "4.28.1":
        raise SystemExit(f"phase 2 needs transformers 4.28.1, found {transformers.__version__}")
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    job = json.loads((work / "job.json").read_text())
    s = job["settings"]
    pad_to, n_beams, k = s["pad_to"], s["num_beams"], s["top_k"]
    prompts: list[list[int]] = job["prompt_ids"]

    # Read-only taps on 4.28's scorer: which batch rows are done after each step, and every kept
    # hypothesis after finalize (the behaviour is untouched: the originals run unchanged).
    record: dict = {}
    process, finalize = BeamSearchScorer.process, BeamSearchScorer.finalize

    def process_tap(self, *args, **kwargs):
        out = process(self, *args, **kwargs)
        record["done"].append([bool(d) for d in self._done])
        return out

    def finalize_tap(self, *args, **kwargs):
        out = finalize(self, *args, **kwargs)
        record["hyps"] = [[(float(score), hyp[pad_to:].tolist()) for score, hyp, _ in h.beams] for h in self._beam_hyps]
        return out

    BeamSearchScorer.process, BeamSearchScorer.finalize = process_tap, finalize_tap

    checks: dict = {}
    # upstream's tokenizer call on our prompt texts (side check; the fixture uses our ids)
    tokenizer = AutoTokenizer.from_pretrained(job["models"]["base"], padding_side="left")
    enc = tokenizer(job["prompt_texts"], padding="max_length", return_tensors="pt", max_length=pad_to, truncation=True)
    same = [i for i, p in enumerate(prompts)
            if enc.input_ids[i].tolist() == [s["pad_id"]] * (pad_to - len(p)) + p
            and enc.attention_mask[i].tolist() == [0] * (pad_to - len(p)) + [1] * len(p)]
    checks["upstream_tokenizer"] = {"class": type(tokenizer).__name__, "pad_token_id": tokenizer.pad_token_id,
                                    "identical_rows": len(same), "rows": len(prompts),
                                    "differing_rows": [i for i in range(len(prompts)) if i not in same]}

    def run(model, batch_size: int, traced: bool) -> list[dict]:
        rows = []
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            ids = torch.tensor([[s["pad_id"]] * (pad_to - len(p)) + p for p in batch])
            mask = torch.tensor([[0] * (pad_to - len(p)) + [1] * len(p) for p in batch])
            record.clear()
            record["done"] = []
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, num_beams=n_beams,
                                     max_new_tokens=s["max_new_tokens"], output_scores=traced,
                                     return_dict_in_generate=True)
            for i in range(len(batch)):
                generated = out.sequences[i, pad_to:].tolist()
                finish = "eos" if s["eos_id"] in generated else "length"
                if finish == "eos":
                    generated = generated[: generated.index(s["eos_id"])]
                done_step = next((t + 1 for t, flags in enumerate(record["done"]) if flags[i]), None)
                row = {
                    "generated_ids": generated,
                    "finish_reason": finish,
                    "done_step": done_step,
                    "hypotheses": [[round(sc, 9), toks] for sc, toks in record["hyps"][i]],
                }
                if traced:
                    trace = []
                    for t in range(done_step or s["max_new_tokens"]):
                        logprobs = out.scores[t][i * n_beams : (i + 1) * n_beams].double()
                        beams = logprobs[:1] if t == 0 else logprobs  # step 1: all beams hold the prompt
                        step = []
                        for beam in beams:
                            values, order = torch.sort(beam, descending=True, stable=True)
                            step.append([order[:k].tolist(), [round(float(v), 7) for v in values[:k]]])
                        trace.append(step)
                    row["trace"] = trace
                rows.append(row)
            print(f"batch {batch_size}: rows {start}-{start + len(batch) - 1} done", file=sys.stderr)
        return rows

    models = {}
    for name, folder in job["models"].items():
        model = LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
        gen_config = model.generation_config
        # left padding vs none: 4.28 derives position ids from the mask and masked keys get exactly
        # zero weight, so a padded row's logits equal an unpadded run's up to float noise
        pad_gap = 0.0
        with torch.no_grad():
            for p in prompts:
                ids = torch.tensor([[s["pad_id"]] * (pad_to - len(p)) + p])
                mask = torch.tensor([[0] * (pad_to - len(p)) + [1] * len(p)])
                padded = model(ids, attention_mask=mask).logits[0, -len(p):]
                alone = model(torch.tensor([p])).logits[0]
                pad_gap = max(pad_gap, float((padded - alone).abs().max()))
        checks[f"{name}_padded_vs_unpadded_max_logit_diff"] = pad_gap
        upstream = run(model, s["batch_size"], traced=True)
        per_row = run(model, 1, traced=False)
        for row, alone in zip(upstream, per_row):
            row["per_row"] = alone
        models[name] = upstream
    result = {
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
        "generation_config": {key: getattr(gen_config, key) for key in
                              ("do_sample", "num_beams", "length_penalty", "early_stopping", "eos_token_id",
                               "pad_token_id", "bos_token_id")},
        "checks": checks,
        "models": models,
    }
    (work / "result.json").write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="phase")
    gen = sub.add_parser("generate", help="phase 2 (run by phase 1 in the 4.28 venv)")
    gen.add_argument("work", type=Path)
    parser.add_argument("--python428", default="/work/venv428/bin/python",
                        help="python of a venv with transformers==4.28.1 and torch")
    parser.add_argument("-o", "--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.phase == "generate":
        generate(args.work)
    else:
        build(args.python428, args.out)


if __name__ == "__main__":
    main()
