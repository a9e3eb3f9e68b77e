"""Caption file readers/writers: round trips, streaming, and malformed files named precisely."""

from __future__ import annotations

import json

import pytest
from markers import needs_pyarrow

from capsfuse_lite import records
from capsfuse_lite.errors import ConfigError, InputFileError
from capsfuse_lite.records import Layout, detect_format, open_reader, open_writer, read_all

try:  # the `parquet` extra; without it only the Parquet cases skip (see markers.py)
    import pyarrow as pa
    import pyarrow.parquet as pq
except ImportError:  # pragma: no cover
    pa = pq = None


def write_rows(path, fmt, rows):
    layout = Layout(fmt)
    for row in rows:
        layout.note_row(row)
    with open_writer(path, fmt, layout) as writer:
        for row in rows:
            writer.write(row)
    return layout


@pytest.mark.parametrize("fmt", [pytest.param(f, marks=needs_pyarrow) if f == "parquet" else f for f in records.FORMATS])
def test_sample_rows_round_trip_every_format(tmp_path, sample_rows, fmt):
    path = tmp_path / f"rows.{fmt}"
    write_rows(path, fmt, sample_rows)
    back = read_all(path)
    assert back == sample_rows  # all columns kept, order preserved, text byte for byte
    layout = open_reader(path).scan(required=("laion_2b", "laion_coco"))
    assert layout.rows == len(sample_rows)
    assert list(layout.columns) == ["laion_2b", "laion_coco", "capsfuion_official"]


def test_json_array_is_streamed_in_small_chunks(tmp_path, monkeypatch, sample_rows):
    rows = sample_rows + [{"laion_2b": "multi\nline \u00e9\U0001F600", "laion_coco": None, "nested": {"a": [1, {"b": "]"}]}}]
    text = " \n[ " + " ,\n\t".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n ] \n"
    path = tmp_path / "rows.json"
    path.write_text(text, encoding="utf-8")
    for chunk in (1, 5, 64):
        monkeypatch.setattr(records, "_CHUNK_CHARS", chunk)
        assert read_all(path) == rows
    (tmp_path / "empty.json").write_text("[ ]")
    assert read_all(tmp_path / "empty.json") == []


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
    monkeypatch.setattr(records, "_PARQUET_BATCH_ROWS", 4)
    got = list(open_reader(path).rows(columns=["laion_2b"]))
    assert [i for i, _ in got] == list(range(len(sample_rows)))
    assert [r for _, r in got] == [{"laion_2b": r["laion_2b"]} for r in sample_rows]


def test_csv_rfc4180_quoting(tmp_path):
    path = tmp_path / "q.csv"
    path.write_bytes(b'laion_2b,laion_coco\r\n"a, ""quoted""\r\nsecond line",b\r\n\r\nc,d\r\n')
    assert read_all(path) == [{"laion_2b": 'a, "quoted"\r\nsecond line', "laion_coco": "b"},
                              {"laion_2b": "c", "laion_coco": "d"}]


def test_format_detection():
    assert detect_format("x.JSONL") == "jsonl"
    assert detect_format("x.ndjson") == "jsonl"
    assert detect_format("x.txt", "parquet") == "parquet"
    with pytest.raises(ConfigError, match="--input-format"):
        detect_format("x.txt")
    with pytest.raises(ConfigError, match="unknown output format"):
        detect_format("x.json", "xml", role="output")


def _fail(path, *required) -> str:
    with pytest.raises(InputFileError) as info:
        open_reader(path).scan(required=required)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    return message


@pytest.mark.parametrize("text, where, problem", [
    ('[\n{"a": "x"},\n{"a": tru},\n{"a": "y"}\n]', "line 3, row 1", "invalid JSON"),
    ('[\n{"a": "x"},\n[1, 2]\n]', "line 3, row 1", "not an object"),
    ('[\n{"a": "x"},\n]', "line 3", "trailing comma"),
    ('[\n{"a": "x"}\n{"a": "y"}]', "line 3, after row 0", "expected ',' or ']'"),
    ('[\n{"a": "x"},\n{"a": "y', "line 3, row 1", "invalid JSON"),
    ('[\n{"a": "x"}', "line 2", "end of file"),
    ('{"a": "x"}', "line 1", "expected a JSON array"),
    ('[{"a": "x"}]\n{"b": 1}', "line 2", "after the JSON array"),
    ("", "line 1", "found end of file"),
])
def test_malformed_json_names_line_and_problem(tmp_path, monkeypatch, text, where, problem):
    monkeypatch.setattr(records, "_CHUNK_CHARS", 3)
    path = tmp_path / "bad.json"
    path.write_text(text)
    message = _fail(path)
    assert f": {where}: " in message and problem in message


def test_malformed_jsonl(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": "x"}\n\n{"a": "y"}\n["not", "an object"]\n')
    assert "line 4: expected a JSON object, found an array" in _fail(path)
    path.write_text('{"a": "x"}\n{"a": \n')
    assert "line 2: invalid JSON" in _fail(path)
    path.write_bytes(b'{"a": "x"}\n{"a": "\xff"}\n')
    assert "line 2: not valid UTF-8" in _fail(path)


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
    path.write_text("a,a\n1,2\n")
    assert "duplicate column" in _fail(path)
    path.write_text("")
    assert "no header row" in _fail(path)


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


def test_missing_pyarrow_gives_install_hint(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name.startswith("pyarrow"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    path = tmp_path / "x.parquet"
    path.write_bytes(b"")
    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    with pytest.raises(ConfigError, match=r"capsfuse-lite\[parquet\]"):
        open_reader(path).scan()
