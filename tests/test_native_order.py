"""llama.cpp's shared libraries load before numpy's (issue 8: a CUDA build whose libggml-cuda.so
carries its own libstdc++ crashed at model load when numpy came first), and a build with such a
private libstdc++ is detected and refused with a clear line instead of a segfault.

Load order is read from the dynamic linker itself (dl_iterate_phdr lists objects in load order)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest

LOAD_ORDER = textwrap.dedent("""
    import ctypes, json, sys

    class Info(ctypes.Structure):
        _fields_ = [("addr", ctypes.c_void_p), ("name", ctypes.c_char_p)]

    def load_order():
        names = []
        CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(Info), ctypes.c_size_t, ctypes.c_void_p)
        def cb(info, size, data):
            names.append((info.contents.name or b"").decode())
            return 0
        ctypes.CDLL(None).dl_iterate_phdr(CB(cb), None)
        return names

    def first(names, part):
        return next((i for i, n in enumerate(names) if part in n), None)

    {body}
    names = load_order()
    print(json.dumps({{"llama": first(names, "libllama.so"), "numpy": first(names, "_multiarray_umath")}}))
""")


def load_order_after(body: str) -> dict:
    code = LOAD_ORDER.format(body=textwrap.indent(textwrap.dedent(body), "").strip())
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("body", [
    "from capsfuse_lite import Fuser",
    "import capsfuse_lite.engine.fuser",
    "import capsfuse_lite.convert",
    "from capsfuse_lite.cli import native_first; native_first(); import pyarrow.parquet",
])
def test_llama_cpp_loads_before_numpy(body):
    order = load_order_after(body)
    assert order["llama"] is not None and order["numpy"] is not None
    assert order["llama"] < order["numpy"], order


def test_fuse_command_loads_llama_cpp_before_reading_parquet(tmp_path):
    """`fuse` on a Parquet file: pyarrow (and numpy with it) must come after llama.cpp."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"laion_2b": ["a"], "laion_coco": ["b"]}), tmp_path / "in.parquet")
    body = f"""
        from capsfuse_lite.cli import main
        sys.argv = ["capsfuse-lite", "fuse", {str(tmp_path / 'in.parquet')!r}, "-o", {str(tmp_path / 'out.jsonl')!r},
                    "--model", {str(tmp_path / 'missing.gguf')!r}, "-q"]
        try:
            main()
        except SystemExit:
            pass
    """
    order = load_order_after(body)
    assert order["llama"] is not None and order["numpy"] is not None and order["llama"] < order["numpy"], order


def test_a_private_libstdcxx_is_detected_and_refused_when_numpy_came_first(tmp_path, monkeypatch, capsys):
    """A library that exports libstdc++'s own symbols (as a build linked with -static-libstdc++
    does, like the reported CUDA build's libggml-cuda.so) is found from its ELF symbol table; with
    numpy imported first, loading a model is refused with one line instead of crashing; in the
    other order it is loaded with one warning naming the fix."""
    if shutil.which("cc") is None:
        pytest.skip("no C compiler to build the fake library")
    from capsfuse_lite.engine import llama
    from capsfuse_lite.errors import ModelLoadError
    from capsfuse_lite.engine.native import libstdcxx_hazard

    assert libstdcxx_hazard() is None  # the installed build links the system libstdc++
    (tmp_path / "plain.c").write_text("int ggml_something(void) { return 1; }\n")
    (tmp_path / "private.c").write_text("void _ZNSo9_M_insertIlEERSoT_(void) {}\nvoid _ZSt4cout(void) {}\n")
    for name, source in (("libggml-a.so", "plain.c"), ("libggml-cuda.so", "private.c")):
        subprocess.run(["cc", "-shared", "-fPIC", "-o", str(tmp_path / name), str(tmp_path / source)], check=True)
    assert libstdcxx_hazard(tmp_path) == "libggml-cuda.so"
    (tmp_path / "libggml-cuda.so").unlink()
    assert libstdcxx_hazard(tmp_path) is None
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(tmp_path / "libggml-cuda.so"), str(tmp_path / "private.c")], check=True)

    monkeypatch.setenv("LLAMA_CPP_LIB_PATH", str(tmp_path))
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    monkeypatch.setattr(llama, "_NUMPY_FIRST", True)
    with pytest.raises(ModelLoadError, match="carries its own copy of libstdc\\+\\+.*before numpy.*exclude-libs"):
        llama.Model(model)
    monkeypatch.setattr(llama, "_NUMPY_FIRST", False)
    monkeypatch.setattr(llama, "_warned_hazard", False)
    llama._check_load_order()
    llama._check_load_order()
    err = capsys.readouterr().err
    assert err.count("warning: this llama-cpp-python build's libggml-cuda.so carries") == 1 and "exclude-libs" in err
