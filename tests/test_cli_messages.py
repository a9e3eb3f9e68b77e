"""Every error path of every command ends in one true line (issue 11).

Each case below runs one command into one error a user can cause and checks: exit code 2, no
traceback, one ``error:`` line (or click's usage error), the expected reason, and that every option
the message names exists: ``--flags`` and metavars (SOURCE, INPUT, ...) outside backticks must be in
this command's ``--help``; inside a backticked ``capsfuse-lite CMD ...`` (or ``CMD ...``) command
they must be in CMD's; inside a backticked command of another program (pip) they are not ours.
Also: user data and commands with brackets print as they are (no rich markup), and the help of every
command reads the same way (flags as flags, real metavars, stated defaults, one progress flag).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import pytest
from typer.testing import CliRunner

from capsfuse_lite.cli import app

FIXTURES = Path(__file__).parent / "fixtures"
COMMANDS = ("convert", "info", "prompts", "fuse", "merge", "bench", "bench-model")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPSFUSE_LITE_CACHE", str(tmp_path / "cache"))


def invoke(args, **kwargs):
    return CliRunner().invoke(app, [str(a) for a in args], **kwargs)


# -- what a command's --help offers -------------------------------------------------------------

@lru_cache(maxsize=None)
def help_text(command: str, width: int = 200) -> str:
    with pytest.MonkeyPatch.context() as mp:  # the default cache folder as a user has it, not a long tmp one
        mp.delenv("CAPSFUSE_LITE_CACHE", raising=False)
        mp.delenv("XDG_CACHE_HOME", raising=False)
        result = invoke([command, "--help"], terminal_width=width, env={"COLUMNS": str(width)})
    assert result.exit_code == 0, result.output
    return result.stdout


@lru_cache(maxsize=None)
def offered(command: str) -> tuple[frozenset, frozenset]:
    """(option names, metavars) in ``command --help``: the first column of the Options section and
    the words of the usage line."""
    text = help_text(command)
    flags, metavars = set(), set(re.findall(r"\b[A-Z][A-Z_]{2,}\b", text.splitlines()[0]))
    for line in text.split("Options:")[1].splitlines():
        if not re.match(r"  -", line):  # an option's row starts at column 2; its wrapped help further in
            continue
        first = re.split(r"\s{2,}", line.strip())[0]
        for item in re.split(r", | / ", first):
            name, _, metavar = item.partition(" ")
            if name.startswith("-"):
                flags.add(name)
                metavars.update(re.findall(r"\b[A-Z][A-Z_]{2,}\b", metavar))
    return frozenset(flags), frozenset(metavars - {"OPTIONS"})


ALL_METAVARS = frozenset().union(*(offered(c)[1] for c in COMMANDS))
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
SPAN = re.compile(r"`([^`]*)`")


def hint_problems(command: str, message: str) -> list[str]:
    """Options and metavars ``message`` names that ``command`` (or the command a backticked
    capsfuse-lite command line names) does not have."""
    problems = []
    rest = message
    for span in SPAN.findall(message):
        rest = rest.replace(f"`{span}`", " ")
        words = span.split()
        if words[:1] == ["capsfuse-lite"]:
            words = words[1:]
        target = words[0] if words and words[0] in COMMANDS else None
        if words and target is None and not words[0].startswith("-"):
            continue  # another program's command line (pip ...): its flags are not ours
        target = target or command
        problems += [f"{flag} (in `{span}`) is not an option of {target}" for flag in FLAG.findall(span)
                     if flag not in offered(target)[0]]
    problems += [f"{flag} is not an option of {command}" for flag in FLAG.findall(rest) if flag not in offered(command)[0]]
    problems += [f"{word} is not an argument or metavar of {command}"
                 for word in re.findall(r"\b[A-Z][A-Z_]{2,}\b", rest)
                 if word in ALL_METAVARS and word not in offered(command)[1]]
    return problems


def test_the_hint_checker_catches_what_issue_11_found():
    """The checker itself: the two wrong hints the issue reports, and a right one of each kind."""
    assert hint_problems("fuse", "x: offline; pass a local folder as SOURCE") == [
        "SOURCE is not an argument or metavar of fuse"]
    assert hint_problems("fuse", "cannot load (pass --verbose for llama.cpp's log)") == []
    assert hint_problems("merge", "pass --verbose") == ["--verbose is not an option of merge"]
    assert hint_problems("convert", "pass a local model folder as SOURCE; --force overwrites") == []
    assert hint_problems("fuse", "`capsfuse-lite convert DIR -o X --type q8_0`, or pass --model F") == []
    assert hint_problems("fuse", "`capsfuse-lite convert DIR --model X`") == [
        "--model (in `capsfuse-lite convert DIR --model X`) is not an option of convert"]
    assert hint_problems("bench", "`pip install --no-cache-dir x`") == []


# -- the error paths ----------------------------------------------------------------------------

@dataclass
class Files:
    tmp: Path
    good: Path  # 3 sample rows, JSONL
    model: Path  # the tiny f32 GGUF
    broken: Path  # a GGUF that passes capsfuse-lite's header checks but llama.cpp cannot load
    truncated: Path
    done: Path  # a finished output of `good` (fake engine) with its meta file


def _unloadable_gguf(model: Path, out: Path) -> Path:
    """``model`` whose tokenizer model is renamed (same length, in place): header and sizes are intact
    (capsfuse-lite's checks pass), but llama.cpp refuses to load it, even vocabulary only."""
    import gguf

    shutil.copyfile(model, out)
    reader = gguf.GGUFReader(out, "r+")
    field = reader.fields["tokenizer.ggml.model"]
    value = field.parts[field.data[0]]
    value[:] = list(b"x" * len(value))
    del reader
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_gguf_f32, sample_rows) -> Files:
    from fake_fuser import FakeFactory

    from capsfuse_lite.run.single import FuseConfig, run_fuse

    d = tmp_path_factory.mktemp("messages")
    good = d / "in.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in sample_rows[:3]), encoding="utf-8")
    truncated = d / "truncated.gguf"
    truncated.write_bytes(tiny_gguf_f32.read_bytes()[: tiny_gguf_f32.stat().st_size // 2])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CAPSFUSE_LITE_CACHE", str(d / "cache"))
        run_fuse(FuseConfig(input=good, output=d / "done.jsonl", model=tiny_gguf_f32), fuser_factory=FakeFactory())
    return Files(d, good, tiny_gguf_f32, _unloadable_gguf(tiny_gguf_f32, d / "broken.gguf"), truncated,
                 d / "done.jsonl")


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@dataclass
class Case:
    id: str
    args: Callable[[Files, Path], list]  # (module files, this test's tmp_path) -> command line
    expect: str  # a piece of the message: the path the case means to take
    alone: bool = True  # the error line is all of stderr (else llama.cpp's own error lines may precede it)


CASES = [
    # fuse: input
    Case("fuse-missing-input", lambda f, t: ["fuse", t / "nope[red].jsonl", "-o", t / "o.jsonl", "-m", f.model],
         "nope[red].jsonl: no such file"),
    Case("fuse-bad-jsonl", lambda f, t: ["fuse", _write(t / "bad.jsonl", '{"laion_2b": "a", "laion_coco": "b"}\n{x\n'),
                                         "-o", t / "o.jsonl", "-m", f.model], "line 2"),
    Case("fuse-missing-field", lambda f, t: ["fuse", _write(t / "c.csv", "a,b\n1,2\n"), "-o", t / "o.jsonl"],
         "missing column(s)"),
    Case("fuse-unknown-extension", lambda f, t: ["fuse", _write(t / "in.txt", "x"), "-o", t / "o.jsonl"],
         "cannot tell the input format"),
    Case("fuse-unknown-output-format", lambda f, t: ["fuse", f.good, "-o", t / "o.jsonl", "--output-format", "xml"],
         "unknown output format"),
    Case("fuse-compressed-parquet", lambda f, t: ["fuse", f.good, "-o", t / "o.parquet.gz"], "compressed Parquet"),
    Case("fuse-bad-delimiter", lambda f, t: ["fuse", f.good, "-o", t / "o.csv", "--csv-delimiter", "ab"],
         "--csv-delimiter 'ab'"),
    # fuse: output
    Case("fuse-existing-output", lambda f, t: ["fuse", f.good, "-o", _write(t / "o.jsonl", "precious\n"), "-m", f.model],
         "is not a finished capsfuse-lite output"),
    Case("fuse-output-of-other-settings", lambda f, t: ["fuse", f.good, "-o", f.done, "-m", f.model, "--beams", "1"],
         "made with other settings"),
    Case("fuse-output-is-input", lambda f, t: ["fuse", f.good, "-o", f.good, "--force"], "must not be the input"),
    # fuse: options
    Case("fuse-slots-word", lambda f, t: ["fuse", f.good, "-o", t / "o.jsonl", "--slots", "many"], "--slots"),
    Case("fuse-slots-zero", lambda f, t: ["fuse", f.good, "-o", t / "o.jsonl", "--slots", "0"], "--slots"),
    Case("fuse-shard", lambda f, t: ["fuse", f.good, "-o", t / "o.jsonl", "--shard", "3/2"], "--shard"),
    Case("fuse-beams-zero", lambda f, t: ["fuse", f.good, "-o", t / "o.jsonl", "--beams", "0"], "--beams"),
    Case("fuse-limit-negative", lambda f, t: ["fuse", f.good, "-o", t / "o.jsonl", "--limit", "-1"], "--limit"),
    Case("fuse-resume-and-force", lambda f, t: ["fuse", f.good, "-o", t / "o.jsonl", "--resume", "--force"],
         "contradict"),
    Case("fuse-reserved-output-field", lambda f, t: ["fuse", f.good, "-o", t / "o.jsonl", "--output-field", "status"],
         "is reserved"),
    Case("fuse-same-fields", lambda f, t: ["fuse", f.good, "-o", t / "o.jsonl", "--raw-field", "laion_coco"],
         "name the same column"),
    Case("fuse-usage-error", lambda f, t: ["fuse", f.good, "-o", t / "o.jsonl", "--beams", "three"], "--beams"),
    Case("fuse-dataset-into-a-file", lambda f, t: ["fuse", f.tmp, "-o", t / "o.jsonl", "-m", f.model],
         "is written to a folder"),
    # fuse: model
    Case("fuse-model-missing", lambda f, t: ["fuse", f.good, "-o", t / "o.jsonl", "-m", t / "m[1].gguf"],
         "m[1].gguf does not exist"),
    Case("fuse-model-folder", lambda f, t: ["fuse", f.good, "-o", t / "o.jsonl", "-m", t], "is a folder"),
    Case("fuse-model-not-gguf", lambda f, t: ["fuse", f.good, "-o", t / "o.jsonl", "-m", _write(t / "m.gguf", "x")],
         "not a GGUF file"),
    Case("fuse-model-truncated", lambda f, t: ["fuse", f.good, "-o", t / "o.jsonl", "-m", f.truncated], "truncated"),
    Case("fuse-model-does-not-load", lambda f, t: ["fuse", f.good, "-o", t / "o.jsonl", "-m", f.broken, "--threads", "1"],
         "llama.cpp could not load", alone=False),
    Case("fuse-tokens-beyond-context", lambda f, t: ["fuse", f.good, "-o", t / "o.jsonl", "-m", f.model,
                                                     "--max-new-tokens", "100000"], "trained for"),
    Case("fuse-no-default-model", lambda f, t: ["fuse", f.good, "-o", t / "o.jsonl"], "no --model given"),
    # prompts
    Case("prompts-existing-output", lambda f, t: ["prompts", f.good, "-o", _write(t / "p.jsonl", "x"), "-m", f.model],
         "exists"),
    Case("prompts-missing-field", lambda f, t: ["prompts", _write(t / "c.csv", "a,b\n1,2\n"), "-o", t / "p.jsonl"],
         "missing column(s)"),
    Case("prompts-unknown-extension", lambda f, t: ["prompts", _write(t / "in.txt", "x"), "-o", t / "p.jsonl"],
         "cannot tell the input format"),
    Case("prompts-limit", lambda f, t: ["prompts", f.good, "-o", t / "p.jsonl", "--limit", "-2"], "--limit"),
    Case("prompts-no-default-model", lambda f, t: ["prompts", f.good, "-o", t / "p.jsonl"], "no --model given"),
    Case("prompts-model-does-not-load", lambda f, t: ["prompts", f.good, "-o", t / "p.jsonl", "-m", f.broken],
         "llama.cpp could not load", alone=False),
    # merge
    Case("merge-no-meta", lambda f, t: ["merge", f.good, "-o", t / "m.jsonl"], "no meta file beside"),
    Case("merge-not-a-shard", lambda f, t: ["merge", f.done, "-o", t / "m.jsonl"], "not a shard output"),
    Case("merge-existing-output", lambda f, t: ["merge", f.done, "-o", f.good], "exists"),
    Case("merge-part-twice", lambda f, t: ["merge", f.done, f.done, "-o", t / "m.jsonl"], "given twice"),
    # convert
    Case("convert-no-such-source", lambda f, t: ["convert", t / "nope", "-o", t / "o.gguf"], "not a hub id"),
    Case("convert-source-is-a-file", lambda f, t: ["convert", f.good, "-o", t / "o.gguf"], "SOURCE must be"),
    Case("convert-revision-of-a-folder", lambda f, t: ["convert", t, "-o", t / "o.gguf", "--revision", "v1"],
         "--revision only applies"),
    Case("convert-bad-type", lambda f, t: ["convert", t, "-o", t / "o.gguf", "--type", "q3_k"], "--type"),
    Case("convert-existing-output", lambda f, t: ["convert", t, "-o", f.model], "already exists"),
    # bench
    Case("bench-existing-report", lambda f, t: ["bench", "-m", f.model, "-o", f.good], "exists"),
    Case("bench-slots", lambda f, t: ["bench", "-m", f.model, "-o", t / "b.json", "--slots", "a,b"], "--slots"),
    Case("bench-device-gpu", lambda f, t: ["bench", "-m", f.model, "-o", t / "b.json", "--device", "gpu"],
         "no GPU offload"),
    Case("bench-baselines", lambda f, t: ["bench", "-m", f.model, "-o", t / "b.json", "--baselines", "mine"],
         "--baselines"),
    Case("bench-hf-without-checkpoint", lambda f, t: ["bench", "-m", f.model, "-o", t / "b.json",
                                                      "--baselines", "hf-upstream"], "--hf-checkpoint"),
    Case("bench-rows", lambda f, t: ["bench", "-m", f.model, "-o", t / "b.json", "--rows", "0"], "--rows"),
    Case("bench-repeats", lambda f, t: ["bench", "-m", f.model, "-o", t / "b.json", "--repeats", "1"], "--repeats"),
    Case("bench-threads", lambda f, t: ["bench", "-m", f.model, "-o", t / "b.json", "--threads", "0"], "--threads"),
    Case("bench-prefix-cache", lambda f, t: ["bench", "-m", f.model, "-o", t / "b.json", "--prefix-cache", "yes"],
         "--prefix-cache"),
    Case("bench-missing-input", lambda f, t: ["bench", "-m", f.model, "-o", t / "b.json", "-i", t / "no.csv"],
         "no such file"),
    Case("bench-unknown-extension", lambda f, t: ["bench", "-m", f.model, "-o", t / "b.json",
                                                  "-i", _write(t / "in.txt", "x")], "cannot tell the input format"),
    Case("bench-missing-model", lambda f, t: ["bench", "-m", t / "no.gguf", "-o", t / "b.json"], "no such file"),
    # bench-model
    Case("bench-model-shape", lambda f, t: ["bench-model", "-o", t / "m.gguf", "--shape", "huge"], "--shape"),
    Case("bench-model-type", lambda f, t: ["bench-model", "-o", t / "m.gguf", "--shape", "tiny", "--type", "q3_k"],
         "--type"),
    Case("bench-model-heads", lambda f, t: ["bench-model", "-o", t / "m.gguf", "--shape", "tiny", "--heads", "5"],
         "must split into 5 heads"),
    Case("bench-model-existing-output", lambda f, t: ["bench-model", "-o", f.model, "--shape", "tiny"],
         "already exists"),
    Case("bench-model-seed", lambda f, t: ["bench-model", "-o", t / "m.gguf", "--seed", "-1"], "--seed"),
    # info
    Case("info-truncated", lambda f, t: ["info", f.truncated], "truncated"),
    Case("info-missing", lambda f, t: ["info", t / "no.gguf"], "does not exist"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_every_error_is_one_line_whose_hints_exist(case, files, tmp_path):
    args = case.args(files, tmp_path)
    result = invoke(args)
    command = args[0]
    assert result.exit_code == 2, result.output
    err = result.stderr
    assert "Traceback" not in err and case.expect in " ".join(err.split()), err
    ours = [line for line in err.splitlines() if line.startswith("error: ")]
    if ours:  # capsfuse-lite's own errors: one line, nothing else on stderr
        assert len(ours) == 1 and (err.strip() == ours[0] or not case.alone), err
    else:  # click's usage errors
        assert "Error:" in err and f"Try 'capsfuse-lite {command} --help'" in err, err
    assert hint_problems(command, err) == []


def _subprocess(args, tmp_path) -> subprocess.CompletedProcess:
    """A fresh process: huggingface_hub reads HF_HOME / HF_HUB_OFFLINE when it is imported."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "COLUMNS": "300",
           "CAPSFUSE_LITE_CACHE": str(tmp_path / "cache")}
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run([sys.executable, "-m", "capsfuse_lite", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=120)


@pytest.mark.parametrize("command", ["convert", "fuse"])
def test_offline_hub_hints_name_what_each_command_has(command, files, tmp_path):
    """convert is told to pass a local folder as SOURCE; fuse (no SOURCE) how to convert one or --model."""
    args = (["convert", "BAAI/CapsFus-LLaMA", "-o", tmp_path / "o.gguf"] if command == "convert"
            else ["fuse", files.good, "-o", tmp_path / "o.jsonl", "--yes"])
    result = _subprocess(args, tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "cannot be reached" in result.stderr
    assert ("as SOURCE" in result.stderr) == (command == "convert")
    assert hint_problems(command, result.stderr) == []


# -- plain text: brackets are data, not markup ----------------------------------------------------

def test_error_lines_print_brackets_as_they_are(capsys):
    from capsfuse_lite.cli.common import error_line

    error_line("Parquet files need pyarrow: pip install 'capsfuse-lite[parquet]' [bold]x[/]")
    assert capsys.readouterr().err == "error: Parquet files need pyarrow: pip install 'capsfuse-lite[parquet]' [bold]x[/]\n"


def test_notes_summary_and_bench_table_print_brackets_as_they_are(tmp_path):
    import io

    from rich.console import Console

    from capsfuse_lite.cli.bench import report_table
    from capsfuse_lite.run.progress import RichProgress, print_summary
    from capsfuse_lite.run.rows import RunSummary

    console = Console(file=io.StringIO(), width=300)
    RichProgress(console).note("loading shard[red].gguf ...")
    summary = RunSummary(output=Path("out[red].jsonl"), complete=True, rows_total=2,
                         model={"file": "m[bold].gguf", "quant": "q8_0", "sha256": "ab"})
    print_summary(summary, console)
    report = {"model": {"path": "/x/m[red].gguf", "quant": "q8_0"},
              "settings": {"rows": 4, "max_new_tokens": 8, "n_threads": 1, "repeats": 2},
              "results": [{"name": "cpu slots=[1]", "status": "failed", "error": "no [bold]memory[/bold]"},
                          {"name": "cpu [red]loop", "status": "ok", "rows_per_s": 1.0, "generated_tokens_per_s": 2.0,
                           "prompt_tokens_per_s": 3.0, "time_to_first_result_s": 0.5, "peak_rss_mib": 9, "ratios": {}}]}
    console.print(report_table(report))
    text = console.file.getvalue()
    for shown in ("loading shard[red].gguf", "out[red].jsonl", "m[bold].gguf", "m[red].gguf", "cpu slots=[1]",
                  "failed: no [bold]memory[/bold]", "cpu [red]loop"):
        assert shown in text, shown


# -- exit code 1: a bug says how to report it -------------------------------------------------------

def test_an_internal_error_prints_the_traceback_and_how_to_report_it(monkeypatch, capsys, tmp_path):
    from capsfuse_lite import cli

    def boom(path):
        raise RuntimeError("unexpected")

    monkeypatch.setattr("capsfuse_lite.convert.info.describe_gguf", boom)
    monkeypatch.setattr(sys, "argv", ["capsfuse-lite", "info", str(FIXTURES / "ggml-vocab-llama-spm.gguf")])
    with pytest.raises(SystemExit) as stop:
        cli.main()
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: unexpected" in err
    assert err.strip().splitlines()[-1].startswith("error: internal error (RuntimeError): this is a bug in capsfuse-lite")
    assert "Please report it" in err and "capsfuse-lite 0.1.0" in err


# -- help ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("width", [80, 120])
def test_help_reads_well(command, width):
    text = help_text(command, width)
    assert text.startswith(f"Usage: capsfuse-lite {command} [OPTIONS]")
    for bad in ("<bool>", "<path>", "<str>", "<int>", "<list", "{", "the engine's", "llama.cpp's.", "(dynamic)"):
        assert bad not in text, bad
    assert max(map(len, text.splitlines())) <= width
    flags, metavars = offered(command)
    assert "--progress" not in flags and "--no-progress" not in flags
    if command in ("convert", "fuse", "bench", "bench-model"):  # the commands that draw progress: one spelling
        assert "-q, --quiet" in text
    for line in text.split("Options:")[1].splitlines():  # every option that takes a value names it in CAPS
        first = re.split(r"\s{2,}", line.strip())[0]
        if re.match(r"  -", line) and " " in first.replace(", ", ","):
            assert re.search(r" [A-Z][A-Z/_.|]*$|on\|off", first), first


def test_defaults_are_stated_with_their_values():
    from capsfuse_lite.machine import default_threads

    fuse = " ".join(help_text("fuse").split())
    assert f"[default: {default_threads()}, the cores this process may use]" in fuse
    assert "[default: auto]" in fuse and "[default: laion_2b]" in fuse and "capsfuse.num_beams: 3" in fuse
    bench = " ".join(help_text("bench").split())
    assert f"[default: {default_threads()}, the cores this process may use]" in bench and "[default: 48]" in bench


# -- progress: every figure labelled -------------------------------------------------------------------

def test_progress_lines_label_the_elapsed_time():
    import io

    from rich.console import Console

    from capsfuse_lite.run.progress import LogProgress, RichProgress

    log = LogProgress(io.StringIO(), interval=0.0)
    log.start(10)
    log.advance(3, 30)
    assert re.search(r"3/10 rows \(30\.0%\), [\d.]+ rows/s, [\d.]+ tok/s, ETA [\d:?]+, elapsed \d+:\d\d$", log.line())
    console = Console(file=io.StringIO(), width=200)
    bar = RichProgress(console)
    bar.start(10)
    bar.advance(3, 30)
    bar.close()
    assert re.search(r"3/10 rows\s+[\d.]+ rows/s \d+ tok/s ETA [\d:?]+ elapsed \d+:\d\d:\d\d$", console.file.getvalue().strip())


def test_the_command_list_shows_each_summary_whole():
    result = invoke(["--help"], terminal_width=80, env={"COLUMNS": "80"})
    listed = result.stdout.split("Commands:")[1].strip().splitlines()
    assert [line.split()[0] for line in listed] == list(COMMANDS)
    assert not any(line.endswith("...") for line in listed), listed


@pytest.mark.parametrize("terminal", [True, False])
def test_the_bench_table_never_cuts_a_figure(terminal):
    import io

    from rich.console import Console

    from capsfuse_lite.cli.bench import print_report_table

    figures = {"rows_per_s": 123.456, "generated_tokens_per_s": 9876.54, "prompt_tokens_per_s": 54321.0,
               "time_to_first_result_s": 12.345, "peak_rss_mib": 4321.0, "host_ms_per_step": 1.234,
               "device_ms_per_step": 648.06, "ratios": {"llama-cpp-python-loop": 1.74}}
    report = {"model": {"path": "/m/cpu768.gguf", "quant": "q8_0"},
              "settings": {"rows": 16, "max_new_tokens": 16, "n_threads": 2, "repeats": 2},
              "results": [{"name": "cpu llama-cpp-python-loop", "status": "ok", **figures, "ratios": {}},
                          {"name": "cpu slots=8 beams=3 cache=off", "status": "ok", **figures}]}
    console = Console(file=io.StringIO(), width=80, force_terminal=terminal, color_system=None)
    print_report_table(report, console)
    text = console.file.getvalue()
    for shown in ("cpu slots=8 beams=3 cache=off", "123.46", "9876.5", "54321", "12.35", "4321", "648.06", "1.74"):
        assert shown in text, shown
