"""Caption file readers/writers: round trips, streaming, compression, and malformed files named precisely."""

from __future__ import annotations

import gzip
import itertools
import json
import os
import random
import shlex
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import pytest
import zstandard
from fake_fuser import FakeFuser, fake_caption
from typer.testing import CliRunner
from markers import needs_pyarrow

from capsfuse_lite.formats import json as json_format
from capsfuse_lite.formats import parquet as parquet_format
from capsfuse_lite.formats import source as source_format
from capsfuse_lite.errors import ConfigError, InputFileError
from capsfuse_lite.formats import (Layout, detect_compression, detect_format, open_reader, open_writer,
                                   parse_csv_delimiter, read_all)

try:  # the `parquet` extra; without it only the Parquet cases skip (see markers.py)
    import pyarrow as pa
    import pyarrow.parquet as pq
except ImportError:  # pragma: no cover
    pa = pq = None

MiB = 1 << 20


def write_rows(path, fmt, rows, **options):
    layout = Layout(fmt)
    for row in rows:
        layout.note_row(row)
    with open_writer(path, fmt, layout, **options) as writer:
        for row in rows:
            writer.write(row)
    return layout


def compress(data: bytes, compression: str | None) -> bytes:
    if compression == "gzip":
        return gzip.compress(data)
    if compression == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    return data


def _fail(path, *required, **options) -> str:
    with pytest.raises(InputFileError) as info:
        open_reader(path, **options).scan(required=required)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    return message


# ----------------------------------------------------------------------------------------------
# Round trips, layouts, detection


@pytest.mark.parametrize("name", ["rows.json", "rows.jsonl", "rows.csv", pytest.param("rows.parquet", marks=needs_pyarrow),
                                  "rows.jsonl.gz", "rows.csv.gz", "rows.json.zst"])
def test_sample_rows_round_trip_every_format(tmp_path, sample_rows, name):
    path = tmp_path / name
    fmt = detect_format(path)
    write_rows(path, fmt, sample_rows)
    magic = {"gzip": b"\x1f\x8b", "zstd": b"\x28\xb5\x2f\xfd", None: b""}[detect_compression(path)]
    assert path.read_bytes().startswith(magic)
    back = read_all(path)
    assert back == sample_rows  # all columns kept, order preserved, text byte for byte
    layout = open_reader(path).scan(required=("laion_2b", "laion_coco"))
    assert layout.rows == len(sample_rows)
    assert list(layout.columns) == ["laion_2b", "laion_coco", "capsfuion_official"]


def test_json_array_is_decoded_across_any_chunk_boundary(tmp_path, monkeypatch, sample_rows):
    rows = sample_rows[:5] + [{"laion_2b": "multi\nline \u00e9\U0001F600", "laion_coco": None, "nested": {"a": [1, {"b": "]"}]}}]
    text = " \n[ " + " ,\n\t".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n ] \n"
    path = tmp_path / "rows.json"
    path.write_text(text, encoding="utf-8")
    for chunk in (1, 5, 64):  # multi-byte characters and escapes split between reads
        monkeypatch.setattr(source_format, "_CHUNK_BYTES", chunk)
        assert read_all(path) == rows
    (tmp_path / "empty.json").write_text("[ ]")
    assert read_all(tmp_path / "empty.json") == []


@pytest.mark.parametrize("value", ["null", "true", "false", "-12.5e+3", '"\\u00e9\\ud83d\\ude00"', "NaN", "-Infinity", "[]"])
def test_json_values_cut_by_the_buffer_end_are_read_whole(tmp_path, monkeypatch, value):
    monkeypatch.setattr(source_format, "_CHUNK_BYTES", 1)  # the buffer then ends 1, 2, 4, 8, ... characters into a row
    path = tmp_path / "v.json"
    rows = [{"pad": "x" * pad, "v": value} for pad in range(40)]  # the value at every offset around 16 and 32
    path.write_text("[" + ",".join(json.dumps(r).replace(json.dumps(value), value) for r in rows) + "]")
    assert [json.dumps(r["v"]) for r in read_all(path)] == [json.dumps(json.loads(value))] * 40  # NaN != NaN


@needs_pyarrow
def test_layout_kinds_give_parquet_and_csv_a_stable_schema(tmp_path):
    rows = [{"a": "x", "n": 1, "d": {"k": [1]}, "b": True},
            {"a": None, "n": 2.5, "d": "text", "e": "late column"}]
    layout = write_rows(tmp_path / "mixed.parquet", "parquet", rows)
    assert layout.columns == {"a": "string", "n": "float", "d": "json", "b": "bool", "e": "string"}
    table = pq.read_table(tmp_path / "mixed.parquet")
    assert table.column("n").to_pylist() == [1.0, 2.5]
    assert table.column("d").to_pylist() == ['{"k": [1]}', "text"]
    assert table.column("e").to_pylist() == [None, "late column"]
    write_rows(tmp_path / "mixed.csv", "csv", rows)
    assert read_all(tmp_path / "mixed.csv")[1] == {"a": "", "n": "2.5", "d": "text", "b": "", "e": "late column"}


@needs_pyarrow
def test_with_columns_replaces_and_appends(tmp_path, sample_rows):
    path = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist([dict(r, capsfusion=1) for r in sample_rows]), path)
    layout = open_reader(path).scan().with_columns({"capsfusion": "string", "status": "string"})
    assert layout.arrow_schema.names[-2:] == ["capsfusion", "status"]
    assert str(layout.arrow_schema.field("capsfusion").type) == "string"
    assert list(layout.columns)[-2:] == ["capsfusion", "status"]


@needs_pyarrow
def test_parquet_is_read_in_batches_with_a_column_subset(tmp_path, monkeypatch, sample_rows):
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(sample_rows), path, row_group_size=10)
    monkeypatch.setattr(parquet_format, "_PARQUET_BATCH_ROWS", 4)
    got = list(open_reader(path).rows(columns=["laion_2b"]))
    assert [i for i, _ in got] == list(range(len(sample_rows)))
    assert [r for _, r in got] == [{"laion_2b": r["laion_2b"]} for r in sample_rows]


def test_csv_rfc4180_quoting(tmp_path):
    path = tmp_path / "q.csv"
    path.write_bytes(b'laion_2b,laion_coco\r\n"a, ""quoted""\r\nsecond line",b\r\n\r\nc,d\r\n')
    assert read_all(path) == [{"laion_2b": 'a, "quoted"\r\nsecond line', "laion_coco": "b"},
                              {"laion_2b": "c", "laion_coco": "d"}]


def test_format_and_compression_detection():
    assert detect_format("x.JSONL") == "jsonl"
    assert detect_format("x.ndjson") == "jsonl"
    assert detect_format("x.txt", "parquet") == "parquet"
    assert (detect_format("x.jsonl.gz"), detect_compression("x.jsonl.gz")) == ("jsonl", "gzip")
    assert (detect_format("x.CSV.ZST"), detect_compression("x.CSV.ZST")) == ("csv", "zstd")
    assert (detect_format("x.txt.zstd", "json"), detect_compression("x.txt.zstd")) == ("json", "zstd")
    assert detect_compression("x.json") is None
    with pytest.raises(ConfigError, match="--input-format"):
        detect_format("x.txt")
    with pytest.raises(ConfigError, match="--input-format"):
        detect_format("x.gz")
    with pytest.raises(ConfigError, match="unknown output format"):
        detect_format("x.json", "xml", role="output")
    for path, explicit in (("x.parquet.gz", None), ("x.gz", "parquet")):
        with pytest.raises(ConfigError, match="Parquet compresses its own pages"):
            detect_format(path, explicit, role="output")


# ----------------------------------------------------------------------------------------------
# Laziness and bounded memory: a reader that loads the whole file fails these


class Feeder(threading.Thread):
    """Writes a generated stream into a FIFO while a reader reads the other end; ``fed`` counts the
    (uncompressed) bytes handed over. A reader that loads everything makes it feed the whole stream."""

    def __init__(self, path: Path, chunks, compression=None):
        super().__init__(daemon=True)
        os.mkfifo(path)
        self.path, self.chunks, self.fed = path, chunks, 0
        self.compressor = {"gzip": lambda: zlib.compressobj(wbits=31),
                           "zstd": lambda: zstandard.ZstdCompressor().compressobj(),
                           None: lambda: None}[compression]()
        self.start()

    def run(self):
        try:
            with open(self.path, "wb", buffering=0) as f:
                for chunk in self.chunks:
                    data = self.compressor.compress(chunk) if self.compressor else chunk
                    view = memoryview(data)
                    while view:
                        view = view[f.write(view):]
                    self.fed += len(chunk)
                if self.compressor:
                    f.write(self.compressor.flush())
        except BrokenPipeError:  # the reader closed its end: it has read enough
            pass

    def stop(self) -> int:
        os.close(os.open(self.path, os.O_RDONLY | os.O_NONBLOCK))  # frees an open() still waiting for a reader
        self.join(timeout=60)
        assert not self.is_alive()
        return self.fed


STREAM_BYTES = 64 * MiB  # what a reader that loads everything would read
LAZY_BOUND = 8 * MiB  # what a streaming reader may have read after a few rows (chunks + pipe + buffers)


def stream(fmt: str, bad_row: int | None = None, total: int = STREAM_BYTES):
    """64 KiB chunks of a generated caption file (incompressible text); row ``bad_row`` malformed."""
    rng = random.Random(0)
    head, sep, tail = {"json": (b"[\n", b",\n", b"\n]\n"), "jsonl": (b"", b"\n", b"\n"),
                       "csv": (b"laion_2b,laion_coco\n", b"\n", b"\n")}[fmt]
    sent, chunk = 0, [head]
    for i in itertools.count():
        text, syn = rng.randbytes(150).hex(), f"row {i}"
        if i == bad_row:
            row = b"only one field" if fmt == "csv" else b'{"laion_2b": tru}'
        else:
            row = f"{text},{syn}".encode() if fmt == "csv" else json.dumps({"laion_2b": text, "laion_coco": syn}).encode()
        chunk += [sep if i else b"", row]
        sent += len(row) + len(sep)
        if sent >= total:
            yield b"".join(chunk + [tail])
            return
        if len(chunk) > 400:
            yield b"".join(chunk)
            chunk = []


LAZY_CASES = [("json", None), ("jsonl", None), ("csv", None), ("json", "gzip"), ("csv", "zstd")]


@pytest.mark.parametrize("fmt, compression", LAZY_CASES)
def test_readers_stream_a_big_file_lazily(tmp_path, fmt, compression):
    feeder = Feeder(tmp_path / "fifo", stream(fmt), compression)
    try:
        rows = open_reader(feeder.path, fmt).rows()
        first = list(itertools.islice(rows, 3))
        rows.close()
    finally:
        fed = feeder.stop()
    assert [(i, r["laion_coco"]) for i, r in first] == [(0, "row 0"), (1, "row 1"), (2, "row 2")]
    assert fed < LAZY_BOUND, f"read {fed / MiB:.1f} MiB of the stream to yield 3 rows"


@pytest.mark.parametrize("fmt, compression", LAZY_CASES)
def test_a_bad_second_row_is_reported_without_reading_on(tmp_path, fmt, compression):
    feeder = Feeder(tmp_path / "fifo", stream(fmt, bad_row=1), compression)
    try:
        with pytest.raises(InputFileError) as info:
            for _ in open_reader(feeder.path, fmt).rows():
                pass
    finally:
        fed = feeder.stop()
    where = {"json": "line 3, row 1: invalid JSON", "jsonl": "line 2: invalid JSON", "csv": "line 3, row 1: expected 2 fields"}
    assert where[fmt] in str(info.value)
    assert fed < LAZY_BOUND, f"read {fed / MiB:.1f} MiB of the stream before reporting row 1"


@needs_pyarrow
def test_parquet_holds_one_batch_not_the_file(tmp_path, monkeypatch):
    rng = random.Random(0)
    table = pa.table({"laion_2b": [rng.randbytes(250).hex() for _ in range(20_000)], "laion_coco": ["s"] * 20_000})
    pq.write_table(table, tmp_path / "big.parquet", row_group_size=500)
    monkeypatch.setattr(parquet_format, "_PARQUET_BATCH_ROWS", 500)
    base = pa.total_allocated_bytes()
    rows = open_reader(tmp_path / "big.parquet").rows()
    first = list(itertools.islice(rows, 3))
    held = pa.total_allocated_bytes() - base
    rows.close()
    assert [r["laion_2b"] for _, r in first] == table.column("laion_2b").to_pylist()[:3]
    assert held < table.nbytes / 8, f"{held / MiB:.1f} MiB held for 3 rows of a {table.nbytes / MiB:.0f} MiB table"


_PEAK_CHILD = """
import json, sys
from capsfuse_lite.formats import read_all
from capsfuse_lite.errors import InputFileError

def hwm_kib():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))

base = hwm_kib()
try:
    read_all(sys.argv[1])
    message = None
except InputFileError as exc:
    message = str(exc)
print(json.dumps({"growth_kib": hwm_kib() - base, "error": message}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for the peak RSS")
def test_json_syntax_error_in_row_2_of_100_mb_keeps_peak_memory_small(tmp_path):
    path = tmp_path / "big.json"
    row = json.dumps({"laion_2b": "x" * 300, "laion_coco": "y" * 200})
    with open(path, "w") as f:
        f.write("[\n" + row + ',\n{"laion_2b": tru},\n')
        block = (row + ",\n") * 2000
        for _ in range(100 * MiB // len(block)):
            f.write(block)
        f.write(row + "\n]\n")
    child = subprocess.run([sys.executable, "-c", _PEAK_CHILD, str(path)], capture_output=True, text=True, check=True)
    result = json.loads(child.stdout)
    assert f"{path}: line 3, row 1: invalid JSON" in result["error"]
    assert result["growth_kib"] < 16 * 1024, f"peak RSS grew {result['growth_kib'] // 1024} MiB"


class CountingDecoder:
    """json.JSONDecoder whose raw_decode counts the characters it is handed (its worst-case work)."""

    def __init__(self):
        self.decoder, self.chars, self.calls = json.JSONDecoder(), 0, 0

    def raw_decode(self, s, idx=0):
        self.chars += len(s) - idx
        self.calls += 1
        return self.decoder.raw_decode(s, idx)


def test_a_20_mb_json_row_parses_in_linear_work(tmp_path, monkeypatch):
    path = tmp_path / "long.json"
    path.write_text('[{"laion_2b": "' + "x" * (20 * MiB) + '", "laion_coco": "y"},\n{"laion_2b": "a", "laion_coco": "b"}]')
    counter = CountingDecoder()
    monkeypatch.setattr(json_format, "_DECODER", counter)
    rows = read_all(path)
    assert len(rows[0]["laion_2b"]) == 20 * MiB and rows[1] == {"laion_2b": "a", "laion_coco": "b"}
    # Refilling 1 MiB at a time and decoding from the row start each time costs ~10x the file here
    # (20 restarts); doubling what is read bounds the total at 2x the row plus the first chunks.
    assert counter.chars < 3 * path.stat().st_size, f"{counter.chars / path.stat().st_size:.1f}x the file ({counter.calls} calls)"


@pytest.mark.parametrize("name, text, where", [
    ("long.json", '[{"a": "' + "x" * 5000 + '"}]', "line 1, row 0: row longer than"),
    ("open.json", '[{"a": "x"},\n{"a": "' + "x\\n" * 2000 + "\n" * 10, "line 2, row 1: row longer than"),
    ("long.jsonl", '{"a": "x"}\n{"a": "' + "x" * 5000 + '"}\n', "line 2: line longer than"),
    ("open.csv", 'a,b\nx,y\n"unclosed,z\n' + "more text\n" * 1000, "line 3: row longer than"),
])
def test_a_row_over_the_size_limit_is_an_error(tmp_path, monkeypatch, name, text, where):
    monkeypatch.setattr(source_format, "MAX_ROW_CHARS", 1000)
    monkeypatch.setattr(source_format, "_CHUNK_BYTES", 64)
    (tmp_path / name).write_text(text)
    assert where in _fail(tmp_path / name)


# ----------------------------------------------------------------------------------------------
# Compressed inputs


@pytest.mark.parametrize("name, text, where, chunk", [
    ("bad.jsonl.gz", '{"a": "x"}\n\n{"a": tru}\n', "line 3: invalid JSON", 7),
    ("bad.csv.gz", "a,b\nx,y\n\nonly one\n", "line 4, row 1: expected 2 fields", 7),
    ("bad.json.zst", '[\n{"a": "x"},\n{"a": tru}\n]', "line 3, row 1: invalid JSON", 7),
    ("bad.jsonl.zst", '{"a": "x"}\n{"a": "\\ud800 ok"}\n{"a": "\xff"}\n', "line 3: not valid UTF-8", 7),
    ("bad.json.gz", '[\n{"a": "x"},\n\n{"a": "\xff"}]', "line 4: not valid UTF-8", 7),
    ("bad.json.gz", '[\n{"a": "x"},\n\n{"a": "\xff"}]', "line 4: not valid UTF-8", MiB),  # one chunk
])
def test_compressed_inputs_name_the_right_line(tmp_path, monkeypatch, name, text, where, chunk):
    monkeypatch.setattr(source_format, "_CHUNK_BYTES", chunk)
    path = tmp_path / name
    data = text.encode("utf-8").replace("\xff".encode(), b"\xff")
    path.write_bytes(compress(data, detect_compression(path)))
    assert where in _fail(path)


def test_compression_from_the_content_and_concatenated_streams(tmp_path, sample_rows):
    data = "".join(json.dumps(r) + "\n" for r in sample_rows[:3]).encode()
    (tmp_path / "rows.jsonl").write_bytes(gzip.compress(data))  # gzip data, name without .gz
    assert read_all(tmp_path / "rows.jsonl") == sample_rows[:3]
    (tmp_path / "rows.txt.zst").write_bytes(compress(data[:100], "zstd") + compress(data[100:], "zstd"))
    assert read_all(tmp_path / "rows.txt.zst", "jsonl") == sample_rows[:3]  # --input-format + .zst, two frames
    (tmp_path / "rows.jsonl.gz").write_bytes(gzip.compress(data[:100]) + gzip.compress(data[100:]))
    assert read_all(tmp_path / "rows.jsonl.gz") == sample_rows[:3]  # two gzip members (cat a.gz b.gz)


@pytest.mark.parametrize("name, damage, problem", [
    ("cut.jsonl.gz", lambda d: d[: len(d) * 2 // 3], "the gzip data ends early: the file is truncated"),
    ("flip.jsonl.gz", lambda d: d[:200] + bytes(b ^ 0x55 for b in d[200:240]) + d[240:], "corrupt gzip data"),
    ("cut.csv.zst", lambda d: d[: len(d) * 2 // 3], "the zstd data ends early: the file is truncated"),
    ("flip.json.zst", lambda d: d[:100] + bytes(b ^ 0x55 for b in d[100:140]) + d[140:], "corrupt zstd data"),
    ("plain.jsonl.gz", lambda d: b'{"laion_2b": "x"}\n', "line 1: not gzip data"),
])
def test_corrupt_or_truncated_compressed_input_is_one_clear_line(tmp_path, sample_rows, name, damage, problem):
    path = tmp_path / name
    write_rows(path, detect_format(path), sample_rows * 3)
    path.write_bytes(damage(path.read_bytes()))
    message = _fail(path)
    assert problem in message and ": line " in message


@pytest.mark.parametrize("module, name, hint", [("pyarrow", "x.parquet", "capsfuse-lite[parquet]"),
                                                 ("zstandard", "x.jsonl.zst", "capsfuse-lite[zstd]")])
def test_missing_optional_package_gives_install_hint(monkeypatch, tmp_path, module, name, hint):
    import builtins

    real_import = builtins.__import__

    def without(name, *args, **kwargs):
        if name.startswith(module):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    path = tmp_path / name
    path.write_bytes(b"\x28\xb5\x2f\xfd" if module == "zstandard" else b"")
    monkeypatch.setattr(builtins, "__import__", without)
    with pytest.raises(ConfigError, match=rf"^[^\n]*{hint.replace('[', '.').replace(']', '.')}"):
        open_reader(path).scan()
    with pytest.raises(ConfigError, match=hint.replace("[", ".").replace("]", ".")):
        open_writer(tmp_path / ("out." + name.split(".", 1)[1]), detect_format(name), Layout("json"))


# ----------------------------------------------------------------------------------------------
# CSV delimiters


def test_csv_delimiter_words_and_refusals():
    assert [parse_csv_delimiter(t) for t in (None, ";", "tab", "\\t", "TAB", "comma", "semicolon", "pipe", "\t")] == \
        [",", ";", "\t", "\t", "\t", ",", ";", "|", "\t"]
    for bad in ("", ";;", '"', "\n", "colon"):
        with pytest.raises(ConfigError, match="--csv-delimiter"):
            parse_csv_delimiter(bad)


def test_semicolon_csv_round_trips_with_its_delimiter(tmp_path):
    path = tmp_path / "in.csv"
    path.write_text('laion_2b;laion_coco\n"a; b, c";d\n', encoding="utf-8")
    layout = open_reader(path, csv_delimiter="semicolon").scan(required=("laion_2b", "laion_coco"))
    assert read_all(path, csv_delimiter=";") == [{"laion_2b": "a; b, c", "laion_coco": "d"}]
    rows = read_all(path, csv_delimiter=";")
    for out, delimiter, first in (("same.csv", None, "laion_2b;laion_coco"), ("tab.csv.gz", "tab", "laion_2b\tlaion_coco")):
        with open_writer(tmp_path / out, "csv", layout, csv_delimiter=delimiter) as writer:
            writer.write(rows[0])
        text = (gzip.decompress if out.endswith(".gz") else bytes)((tmp_path / out).read_bytes()).decode()
        assert text.splitlines()[0] == first
        assert read_all(tmp_path / out, csv_delimiter=delimiter or ";") == rows


def test_merge_keeps_the_delimiter_of_semicolon_parts(tmp_path):
    from capsfuse_lite.run.merge import merge_shards

    for i, rows in enumerate((["a0", "a2"], ["a1"])):
        part = tmp_path / f"p{i}.csv"
        part.write_text("id;text\n" + "".join(f"{r};x, y\n" for r in rows))
        meta = {"selection": {"shard": f"{i}/2", "limit": None}, "input": {"rows": 3, "bytes": 99},
                "output": {"rows": len(rows), "bytes": part.stat().st_size}}  # as `fuse --shard` writes it
        (tmp_path / f"p{i}.csv.meta.json").write_text(json.dumps(meta))
    assert merge_shards([tmp_path / "p0.csv", tmp_path / "p1.csv"], tmp_path / "all.csv.gz", csv_delimiter=";") == 3
    assert gzip.decompress((tmp_path / "all.csv.gz").read_bytes()).decode() == "id;text\r\na0;x, y\r\na1;x, y\r\na2;x, y\r\n"


@pytest.mark.parametrize("sep, option", [(";", "--csv-delimiter ';'"), ("\t", "--csv-delimiter tab"), ("|", "--csv-delimiter '|'")])
def test_one_column_header_suggests_the_delimiter(tmp_path, sep, option):
    path = tmp_path / "in.csv"
    path.write_text(f"laion_2b{sep}laion_coco{sep}id\nx{sep}y{sep}1\n")
    message = _fail(path, "laion_2b", "laion_coco")
    assert message.endswith(f"pass {option}") and "missing column(s)" in message
    path.write_text("laion_2b,laion_coco\nx,y\n")  # and the other way round
    assert "pass --csv-delimiter comma" in _fail(path, "laion_2b", "laion_coco", csv_delimiter=sep)


# ----------------------------------------------------------------------------------------------
# Edge cases a user hits and malformed files


@pytest.mark.parametrize("name", ["bom.json", "bom.jsonl", "bom.csv", "bom.csv.gz", "bom.jsonl.zst"])
def test_bom_crlf_and_no_final_newline(tmp_path, name):
    path = tmp_path / name
    rows = [{"laion_2b": "a \u00e9", "laion_coco": "b"}, {"laion_2b": "c", "laion_coco": "d"}]
    body = {"json": '[{"laion_2b": "a \u00e9", "laion_coco": "b"},\r\n {"laion_2b": "c", "laion_coco": "d"}]',
            "jsonl": '{"laion_2b": "a \u00e9", "laion_coco": "b"}\r\n\r\n{"laion_2b": "c", "laion_coco": "d"}',
            "csv": "laion_2b,laion_coco\r\na \u00e9,b\r\nc,d"}[detect_format(path)]
    path.write_bytes(compress(b"\xef\xbb\xbf" + body.encode(), detect_compression(path)))
    assert read_all(path) == rows


@pytest.mark.parametrize("name", ["u16.json", "u16.jsonl", "u16.csv"])
def test_utf16_file_is_named_as_such(tmp_path, name):
    path = tmp_path / name
    path.write_bytes('{"laion_2b": "x"}\n'.encode("utf-16"))
    assert "line 1: the file is UTF-16 text, not UTF-8" in _fail(path)


def test_json_file_of_objects_instead_of_an_array(tmp_path, monkeypatch):
    monkeypatch.setattr(source_format, "_CHUNK_BYTES", 4)
    path = tmp_path / "one.json"
    path.write_text('{\n  "laion_2b": "x",\n  "laion_coco": "y"\n}\n')
    assert read_all(path) == [{"laion_2b": "x", "laion_coco": "y"}]  # one object: one row
    path.write_text('{"a": 1}\n{"a": 2}\n\n{"a": 3}')  # JSON Lines saved as .json
    assert read_all(path) == [{"a": 1}, {"a": 2}, {"a": 3}]
    path.write_text('{"a": 1},\n{"a": 2}')
    assert "line 1, after row 0: expected the next object, found ','" in _fail(path)


@pytest.mark.parametrize("name, content, result", [
    ("e.json", b"", "line 1: the file is empty"),
    ("e.json.gz", gzip.compress(b"  \n"), "line 1: the file is empty"),
    ("e.jsonl", b"", []),
    ("e.jsonl.gz", gzip.compress(b"\n\n"), []),
    ("e.csv", b"", "line 1: no header row"),
    ("h.csv.zst", zstandard.ZstdCompressor().compress(b"laion_2b,laion_coco\r\n"), []),
])
def test_empty_files(tmp_path, name, content, result):
    (tmp_path / name).write_bytes(content)
    if isinstance(result, list):
        assert read_all(tmp_path / name) == result
    else:
        assert result in _fail(tmp_path / name)


@pytest.mark.parametrize("text, where, problem", [
    ('[\n{"a": "x"},\n{"a": tru},\n{"a": "y"}\n]', "line 3, row 1", "invalid JSON"),
    ('[\n{"a": "x"},\n[1, 2]\n]', "line 3, row 1", "not an object"),
    ('[\n{"a": "x"},\n]', "line 3", "trailing comma"),
    ('[\n{"a": "x"}\n{"a": "y"}]', "line 3, after row 0", "expected ',' or ']'"),
    ('[\n{"a": "x"},\n{"a": "y', "line 3, row 1", "ends inside this row"),
    ('[\n{"a": "x"}', "line 2", "end of file"),
    ('"a"', "line 1", "expected a JSON array"),
    ('[{"a": "x"}]\n{"b": 1}', "line 2", "after the JSON array"),
    ('[{"a": "x\ny"}]', "line 1, row 0", "Invalid control character"),
])
def test_malformed_json_names_line_and_problem(tmp_path, monkeypatch, text, where, problem):
    monkeypatch.setattr(source_format, "_CHUNK_BYTES", 3)
    path = tmp_path / "bad.json"
    path.write_text(text)
    message = _fail(path)
    assert f": {where}: " in message and problem in message


def test_malformed_jsonl(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": "x"}\n\n{"a": "y"}\n["not", "an object"]\n')
    assert "line 4: expected a JSON object, found an array" in _fail(path)
    path.write_text('{"a": "x"}\n{"a": \n{"a": "z"}\n')
    message = _fail(path)
    assert "line 2: invalid JSON" in message and "cut off" not in message
    path.write_bytes(b'{"a": "x"}\n{"a": "\xff"}\n')
    assert "line 2: not valid UTF-8" in _fail(path)
    path.write_text('{"a": "x"}\n{"a": "y"}\n{"a": "half a ro')  # a writer that crashed mid-line
    assert "line 3: invalid JSON" in _fail(path) and "has no line break: the file looks cut off" in _fail(path)


def test_jsonl_skips_blank_lines_and_bom(tmp_path):
    path = tmp_path / "ok.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": "x"}\n\n  \n{"a": "y"}')
    assert list(open_reader(path).rows()) == [(0, {"a": "x"}), (1, {"a": "y"})]


def test_malformed_csv(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("laion_2b,other\nx,y\n")
    message = _fail(path, "laion_2b", "laion_coco")
    assert "missing column(s) 'laion_coco'" in message and "--synthetic-field" in message
    path.write_text("laion_2b,laion_coco\nx,y\nonly one field\nz,w\n")
    assert "line 3, row 1: expected 2 fields" in _fail(path, "laion_2b", "laion_coco")
    path.write_text('laion_2b,laion_coco\nx,y\n"unterminated,z\n')
    assert "line 3: malformed CSV" in _fail(path, "laion_2b", "laion_coco")
    path.write_bytes(b"laion_2b,laion_coco\nx,y\n\nz,\xff\n")
    assert "line 4: not valid UTF-8" in _fail(path, "laion_2b", "laion_coco")
    path.write_text("a,a\n1,2\n")
    assert "duplicate column" in _fail(path)


@needs_pyarrow
def test_bad_parquet(tmp_path, sample_rows):
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    assert "not a readable Parquet file" in _fail(path)
    pq.write_table(pa.Table.from_pylist([{"laion_2b": "x"}]), path)
    assert "missing column(s) 'laion_coco'" in _fail(path, "laion_2b", "laion_coco")


def test_json_field_present_in_no_row_is_an_error(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"caption": "x", "laion_coco": "y"}\n')
    assert "no row has the field(s) 'laion_2b'" in _fail(path, "laion_2b", "laion_coco")


def test_missing_input(tmp_path):
    with pytest.raises(InputFileError, match="no such file"):
        open_reader(tmp_path / "nope.json")


# ----------------------------------------------------------------------------------------------
# Through `capsfuse-lite fuse` (the fake engine stands in for the model)

MODEL = Path(__file__).parent / "fixtures" / "ggml-vocab-llama-spm.gguf"  # a real GGUF header


@pytest.fixture
def fuse_cli(tmp_path, monkeypatch):
    from capsfuse_lite.engine import fuser as engine
    from capsfuse_lite.cli import app

    monkeypatch.setenv("CAPSFUSE_LITE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(engine, "Fuser", FakeFuser)

    def run(*args):
        result = CliRunner().invoke(app, ["fuse", *map(str, args), "--model", str(MODEL), "--quiet"])
        if result.exception and not isinstance(result.exception, SystemExit):
            raise result.exception
        return result

    return run


def fused(rows):
    return [fake_caption(r["laion_2b"], r["laion_coco"], 80)[0] for r in rows]


def test_fuse_reads_and_writes_compressed_files_and_semicolon_csv(tmp_path, sample_rows, fuse_cli):
    rows = sample_rows[:6]
    src = tmp_path / "in.csv.gz"
    write_rows(src, "csv", rows, csv_delimiter=";")
    result = fuse_cli(src, "-o", tmp_path / "out.jsonl.gz")  # no --csv-delimiter: told which one
    assert result.exit_code == 2 and "--csv-delimiter ';'" in result.stderr and "Traceback" not in result.output
    result = fuse_cli(src, "-o", tmp_path / "out.jsonl.gz", "--csv-delimiter", ";")
    assert result.exit_code == 0, result.output
    out = tmp_path / "out.jsonl.gz"
    assert out.read_bytes()[:2] == b"\x1f\x8b"
    assert [r["capsfusion"] for r in read_all(out)] == fused(rows)
    result = fuse_cli(src, "-o", tmp_path / "out.csv", "--csv-delimiter", "semicolon")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out.csv").read_text().startswith("laion_2b;laion_coco;capsfuion_official;capsfusion;")
    assert [r["capsfusion"] for r in read_all(tmp_path / "out.csv", csv_delimiter=";")] == fused(rows)
    command = json.loads((tmp_path / "out.csv.meta.json").read_text())["command"]
    assert ["--csv-delimiter", ";"] == shlex.split(command)[shlex.split(command).index("--csv-delimiter"):][:2]


def test_fuse_input_format_combines_with_compression_and_bad_gzip_is_one_line(tmp_path, sample_rows, fuse_cli):
    src = tmp_path / "dump.txt.zst"
    write_rows(src, "jsonl", sample_rows[:4], compression="zstd")
    result = fuse_cli(src, "-o", tmp_path / "out.json", "--input-format", "jsonl")
    assert result.exit_code == 0, result.output
    assert [r["capsfusion"] for r in read_all(tmp_path / "out.json")] == fused(sample_rows[:4])
    result = fuse_cli(src, "-o", tmp_path / "out.csv", "--input-format", "jsonl", "--csv-delimiter", "tab")
    assert result.exit_code == 0 and (tmp_path / "out.csv").read_text().startswith("laion_2b\tlaion_coco\t")
    result = fuse_cli(src, "-o", tmp_path / "out.parquet.gz", "--input-format", "jsonl")
    assert result.exit_code == 2 and "Parquet compresses its own pages" in result.stderr
    cut = tmp_path / "cut.jsonl.gz"
    write_rows(cut, "jsonl", sample_rows)
    cut.write_bytes(cut.read_bytes()[:-40])
    result = fuse_cli(cut, "-o", tmp_path / "out2.jsonl")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "the gzip data ends early" in result.stderr and len(result.stderr.strip().splitlines()) <= 2
    assert not (tmp_path / "out2.jsonl").exists()


def _jsonl_parts(tmp_path, parts: list[list[dict]], specs=None) -> list[Path]:
    """JSONL shard parts with the meta files `fuse --shard I/N` writes beside them (``specs``: the
    selection.shard of each, default ``I/N``)."""
    total = sum(map(len, parts))
    paths = []
    for i, rows in enumerate(parts):
        part = tmp_path / f"p{i}.jsonl"
        part.write_text("".join(json.dumps(r) + "\n" for r in rows))
        spec = f"{i}/{len(parts)}" if specs is None else specs[i]
        meta = {"selection": {"shard": spec, "limit": None}, "input": {"rows": total, "bytes": 99},
                "output": {"rows": len(rows), "bytes": part.stat().st_size}}
        (tmp_path / f"p{i}.jsonl.meta.json").write_text(json.dumps(meta))
        paths.append(part)
    return paths


@needs_pyarrow
def test_merge_into_parquet_unites_a_column_null_in_one_part_and_numbers_in_another(tmp_path):
    """Issue 16: JSONL parts whose column `n` is null in one part and int in the other have the same
    column names; the merged Parquet file's column holds both (no ArrowTypeError)."""
    from capsfuse_lite.run.merge import merge_shards

    parts = _jsonl_parts(tmp_path, [[{"t": "a", "n": None}, {"t": "c", "n": None}], [{"t": "b", "n": 7}]])
    assert merge_shards(parts, tmp_path / "all.parquet") == 3
    assert read_all(tmp_path / "all.parquet") == [{"t": "a", "n": None}, {"t": "b", "n": 7}, {"t": "c", "n": None}]
    assert pq.read_schema(tmp_path / "all.parquet").field("n").type == pa.int64()


@pytest.mark.parametrize("spec", [1, "1/1", ["0", "2"]])
def test_merge_of_a_hand_edited_shard_in_a_meta_file_names_the_file(tmp_path, spec):
    """Issue 16: `"shard": 1` was an AttributeError (internal error), `"shard": "1/1"` an error naming
    --shard, an option merge does not have: now one line naming the meta file and the fix."""
    parts = _jsonl_parts(tmp_path, [[{"t": "a"}], [{"t": "b"}]], specs=["0/2", spec])
    result = CliRunner().invoke(__import__("capsfuse_lite.cli", fromlist=["app"]).app,
                                ["merge", *map(str, parts), "-o", str(tmp_path / "all.jsonl")])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'p1.jsonl.meta.json'}: selection.shard is {json.dumps(spec)}, not \"I/N\" with 0 <= I < N "
        "(the meta file was edited or damaged); rerun that shard"]


@needs_pyarrow
def test_nan_and_infinite_floats_are_written_to_json_as_null(tmp_path):
    """Issue 16: Parquet floats NaN/inf became bare NaN/Infinity in JSON and JSONL output (not JSON);
    JSON has no such numbers, so they are written as null (nested ones too). CSV keeps Python's text."""
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"x": [1.5, float("nan"), float("inf")], "l": [[1.0], [float("-inf")], None]}), src)
    rows = read_all(src)
    layout = open_reader(src).scan()
    for name, fmt in (("out.jsonl", "jsonl"), ("out.json", "json")):
        with open_writer(tmp_path / name, fmt, layout) as writer:
            for row in rows:
                writer.write(row)
        text = (tmp_path / name).read_text()
        json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in {name}")) if fmt == "json" else [
            json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in {name}")) for line in text.splitlines()]
        assert read_all(tmp_path / name) == [{"x": 1.5, "l": [1.0]}, {"x": None, "l": [None]}, {"x": None, "l": None}]
