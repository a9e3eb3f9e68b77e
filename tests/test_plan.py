"""KV sizing and --slots auto (capsfuse_lite.engine.plan) on LLaMA-2-13B's shape with made-up devices."""

from __future__ import annotations

import pytest

from capsfuse_lite.engine import plan
from capsfuse_lite.errors import ConfigError
from capsfuse_lite.engine.plan import GIB, KVLayout, ModelShape, choose_slots, kv_layout, remember_knee, remembered_knee

LLAMA_13B = ModelShape(n_layer=40, n_embd=5120, n_head=40, n_head_kv=40, head_dim_k=128, head_dim_v=128,
                       n_ff=13824, n_vocab=32001, n_ctx_train=4096, file_bytes=int(7.33 * GIB), quant="q4_k_m")
ROW = dict(max_input=256, max_new=80, n_prefix=113, shared_min=111)


def test_kv_bytes_per_cell_of_13b():
    assert LLAMA_13B.kv_bytes_per_cell("f16") == 40 * 40 * 256 * 2 == 819200  # 0.78 MiB
    assert LLAMA_13B.kv_bytes_per_cell("q8_0") == pytest.approx(819200 * 34 / 64)


def test_unified_layout_holds_the_prefix_once_and_each_rows_worst_case():
    layout = kv_layout(slots=64, beams=3, unified=True, **ROW)
    row = 256 - 111 + 3 * 80
    assert layout == KVLayout(True, 64 * 3 + 1, plan.pad(113 + 64 * row), row)
    assert layout.n_ctx % 256 == 0 and layout.n_ctx >= 113 + 64 * row


def test_stream_layout_gives_every_sequence_a_whole_row():
    layout = kv_layout(slots=64, beams=1, unified=False, **ROW)
    assert layout.n_seq_max == 65 and layout.row_cells == 512 and layout.n_ctx == 65 * 512
    with pytest.raises(ConfigError, match="beams=1"):
        kv_layout(slots=4, beams=3, unified=False, **ROW)


def gpu(free_gib: float) -> dict:
    return {"description": "Test GPU", "free": int(free_gib * GIB), "total": int(80 * GIB)}


def auto(device, beams=3, unified=True, requested="auto", **kw):
    return choose_slots(requested=requested, shape=LLAMA_13B, beams=beams, unified=unified, kv_type="f16",
                        device=device, **ROW, **kw)


def test_auto_on_a_large_gpu_stops_at_the_knee(monkeypatch, tmp_path):
    monkeypatch.setenv("CAPSFUSE_LITE_CACHE", str(tmp_path))
    greedy = auto(gpu(70), beams=1, unified=False)
    beams = auto(gpu(70))
    assert greedy.slots == plan.DEFAULT_KNEE[("gpu", 1)] and "the knee binds" in greedy.reason
    assert beams.slots == plan.DEFAULT_KNEE[("gpu", "beams")]


def test_auto_on_a_24gb_card_is_bound_by_memory(monkeypatch, tmp_path):
    monkeypatch.setenv("CAPSFUSE_LITE_CACHE", str(tmp_path))
    free = 24 - 7.33 - 0.4  # a 24 GB card after the 13B q4_k_m weights and the CUDA context
    choice = auto(gpu(free), beams=1, unified=False)  # greedy, a 512-cell stream per sequence
    assert choice.slots < plan.DEFAULT_KNEE[("gpu", 1)] and "memory binds" in choice.reason
    budget = free * GIB * plan.FIT_FRACTION - plan.compute_bytes(LLAMA_13B, 512)

    def kv(s):
        return kv_layout(slots=s, beams=1, unified=False, **ROW).bytes(LLAMA_13B, "f16")

    assert kv(choice.slots) <= budget < kv(choice.slots + 1)  # the largest count that fits


def test_requested_slots_that_do_not_fit_are_refused_with_the_numbers():
    with pytest.raises(ConfigError, match=r"--slots 64 needs .* GiB .* at most \d+ slot\(s\) fit"):
        auto(gpu(16), requested=64)
    with pytest.raises(ConfigError, match="not even one slot fits"):
        auto(gpu(0.5))
    assert auto(gpu(70), requested=16).slots == 16


def test_cpu_uses_the_cpu_knee_and_available_ram(monkeypatch, tmp_path):
    monkeypatch.setenv("CAPSFUSE_LITE_CACHE", str(tmp_path))
    assert auto(None, beams=1, unified=False, host_available=64 * GIB).slots == plan.DEFAULT_KNEE[("cpu", 1)]
    assert auto(None, host_available=3 * GIB).slots < plan.DEFAULT_KNEE[("cpu", "beams")]


def test_a_knee_measured_by_bench_is_used(monkeypatch, tmp_path):
    monkeypatch.setenv("CAPSFUSE_LITE_CACHE", str(tmp_path))
    assert remembered_knee("Test GPU", LLAMA_13B, 3) is None
    assert remember_knee("Test GPU", LLAMA_13B, 3, 48) is not None
    assert remembered_knee("Test GPU", LLAMA_13B, 3) == 48
    assert remembered_knee("Test GPU", LLAMA_13B, 1) is None  # per beam count
    choice = auto(gpu(70))
    assert choice.slots == 48 and "measured here" in choice.reason


def test_auto_layout_prefers_streams_unless_memory_makes_them_much_smaller(monkeypatch, tmp_path):
    monkeypatch.setenv("CAPSFUSE_LITE_CACHE", str(tmp_path))

    def layout(free):
        return plan.choose_layout(requested="auto", shape=LLAMA_13B, beams=1, kv_unified=None, kv_type="f16",
                                  device=gpu(free), **ROW)

    unified, choice = layout(70)
    assert not unified and choice.slots == plan.DEFAULT_KNEE[("gpu", 1)]
    unified, choice = layout(16.27)  # streams: ~20 slots; unified fits the knee's 64
    assert unified and choice.slots == plan.DEFAULT_KNEE[("gpu", 1)] and "unified" in choice.reason
    beams_unified, _ = plan.choose_layout(requested="auto", shape=LLAMA_13B, beams=3, kv_unified=None,
                                          kv_type="f16", device=gpu(70), **ROW)
    assert beams_unified


def test_a_gpu_that_reports_no_memory_gets_the_gpu_knee(monkeypatch, tmp_path):
    monkeypatch.setenv("CAPSFUSE_LITE_CACHE", str(tmp_path))
    choice = auto({"description": "Some GPU", "free": None, "total": None}, beams=1, unified=False)
    assert choice.slots == plan.DEFAULT_KNEE[("gpu", 1)] and "not reported" in choice.reason


def test_the_options_plan_errors_name_exist_on_fuse():
    import re

    from typer.testing import CliRunner

    from capsfuse_lite.cli import app

    messages = []
    for device, requested in ((gpu(16), 64), (gpu(0.5), "auto")):
        with pytest.raises(ConfigError) as info:
            auto(device, requested=requested)
        messages.append(str(info.value))
    help_text = CliRunner().invoke(app, ["fuse", "--help"], env={"COLUMNS": "200"}).output
    flags = {flag for message in messages for flag in re.findall(r"--[a-z][a-z-]+", message)}
    assert {"--slots", "--kv-type", "--n-gpu-layers"} <= flags
    for flag in flags:
        assert flag in help_text, flag
