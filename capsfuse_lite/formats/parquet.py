"""Parquet through pyarrow (the ``parquet`` extra): record batches in, row groups out."""

from __future__ import annotations

import os

from capsfuse_lite.errors import InputFileError
from capsfuse_lite.formats.base import Layout, RecordReader, RecordWriter, _arrow_types, _dumps, import_pyarrow


_PARQUET_BATCH_ROWS = 4096
_PARQUET_WRITE_ROWS = 16384


class ParquetReader(RecordReader):
    """A Parquet file, streamed in record batches (row group by row group)."""

    format = "parquet"

    def _open(self):
        _, pq = import_pyarrow()
        try:
            # pre_buffer (pyarrow's default) would read every row group's pages up front: the whole file
            return pq.ParquetFile(self.path, pre_buffer=False)
        except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for bad files
            raise self.error("cannot open", f"not a readable Parquet file ({exc})") from None

    def rows(self, columns=None):
        pf = self._open()
        names = pf.schema_arrow.names
        cols = [c for c in columns if c in names] if columns is not None else None
        index = 0
        try:
            for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=cols):
                for row in batch.to_pylist():
                    yield index, row
                    index += 1
        except InputFileError:
            raise
        except Exception as exc:
            raise self.error(f"row {index}", f"cannot read the Parquet data ({exc})") from None

    def scan(self, required=()):
        pf = self._open()
        schema = pf.schema_arrow
        missing = [name for name in required if name not in schema.names]
        if missing:
            raise self.error("schema", f"missing column(s) {', '.join(map(repr, missing))} (columns: {', '.join(schema.names)}); "
                             "pass --raw-field/--synthetic-field to name the caption columns")
        pa, _ = import_pyarrow()
        kinds = {}
        for f in schema:
            t = f.type
            kinds[f.name] = ("string" if pa.types.is_string(t) or pa.types.is_large_string(t) else
                             "bool" if pa.types.is_boolean(t) else
                             "int" if pa.types.is_integer(t) else
                             "float" if pa.types.is_floating(t) else "json")
        return Layout("parquet", pf.metadata.num_rows, kinds, schema)


class ParquetWriter(RecordWriter):
    def __init__(self, path, layout):
        super().__init__(path, layout)
        self.pa, pq = import_pyarrow()
        if layout.arrow_schema is not None:
            self.schema = layout.arrow_schema
            self.json_columns = []
        else:
            kinds = _arrow_types(self.pa)
            self.schema = self.pa.schema([self.pa.field(name, kinds[kind]) for name, kind in layout.columns.items()])
            self.json_columns = [name for name, kind in layout.columns.items() if kind == "json"]
        self.writer = pq.ParquetWriter(str(self.path), self.schema)
        self.pending: list[dict] = []

    def write(self, row):
        for name in self.json_columns:
            value = row.get(name)
            if value is not None and not isinstance(value, str):
                row = {**row, name: _dumps(value)}
        self.pending.append(row)
        self.rows += 1
        if len(self.pending) >= _PARQUET_WRITE_ROWS:
            self._flush()

    def _flush(self):
        if self.pending:
            self.writer.write_table(self.pa.Table.from_pylist(self.pending, schema=self.schema))
            self.pending = []

    def close(self):
        if self.writer is None:
            return
        self._flush()
        self.writer.close()
        self.writer = None
        with open(self.path, "rb+") as f:
            os.fsync(f.fileno())
