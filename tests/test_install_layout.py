"""A plain (non-editable) install used from the repository folder, as the README's "First 10
minutes" leaves a user: there the source ``capsfuse_lite/`` shadows the installed package, and
``capsfuse_lite.convert`` (the top-level ``convert/`` folder, mapped into the package only by an
install) must still import. Issue 17: the README's API snippet failed with ModuleNotFoundError and
``python -m capsfuse_lite info`` with "internal error"."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

API = """
import json, sys
from capsfuse_lite import Fuser
from capsfuse_lite.convert import convert_checkpoint
import capsfuse_lite, capsfuse_lite.convert.pipeline
with Fuser(sys.argv[1], slots=1, beams=1, max_new_tokens=4) as fuser:
    rows = [(r.index, r.finish_reason) for r in fuser.fuse([("VW T-ROC alloy wheel", "The wheel is shown.")])]
print(json.dumps({"rows": rows, "package": capsfuse_lite.__file__, "convert": capsfuse_lite.convert.__file__,
                  "converter": convert_checkpoint.__module__}))
"""


@pytest.fixture(scope="module")
def plain_install(tmp_path_factory) -> Path:
    """A venv with capsfuse-lite installed by ``pip install`` (not editable) from a copy of the
    repository; its other dependencies come from this test's environment through a path line (a
    .pth file that adds a folder without running that folder's own .pth files, so the editable
    install of the test environment is not active in it)."""
    tmp = tmp_path_factory.mktemp("plain_install")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for name in ("capsfuse_lite", "convert"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                           "--target", str(site), str(src)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (site / "capsfuse_lite" / "convert" / "pipeline.py").is_file()  # the install maps convert/ into the package
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def _run(python: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    return subprocess.run([str(python), *args], cwd=REPO, capture_output=True, text=True, env=env, timeout=300)


def test_plain_install_is_not_editable(plain_install):
    # away from the repository the installed package is the one imported, and it has convert
    done = subprocess.run([str(plain_install), "-c", "import capsfuse_lite.convert as c; print(c.__file__)"],
                          cwd=plain_install.parent, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert str(REPO) not in done.stdout and "site-packages" in done.stdout


def test_api_snippet_from_the_repository_folder(plain_install, tiny_gguf_q8):
    done = _run(plain_install, "-c", API, str(tiny_gguf_q8))
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["rows"] == [[0, out["rows"][0][1]]] and out["rows"][0][1] in ("eos", "length")
    # from the repository folder the source tree is imported, and its convert is the repository's convert/
    assert out["package"] == str(REPO / "capsfuse_lite" / "__init__.py")
    assert out["convert"] == str(REPO / "convert" / "__init__.py")
    assert out["converter"] == "capsfuse_lite.convert.pipeline"


def test_python_m_from_the_repository_folder(plain_install, tiny_gguf_q8, tmp_path):
    done = _run(plain_install, "-m", "capsfuse_lite", "info", str(tiny_gguf_q8))
    assert done.returncode == 0, done.stderr
    assert "internal error" not in done.stderr and "llama" in done.stdout.lower()
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("not a model\n")
    done = _run(plain_install, "-m", "capsfuse_lite", "info", str(not_gguf))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and str(not_gguf) in lines[0], done.stderr
