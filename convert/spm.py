"""Read a SentencePiece ``tokenizer.model`` without the sentencepiece package.

The file is a serialized ``sentencepiece.ModelProto`` (protobuf). Only a handful of fields matter
for a GGUF vocabulary, so this module decodes the protobuf wire format directly:

* ``ModelProto.pieces`` (1, repeated ``SentencePiece``): piece (1, string), score (2, float),
  type (3, enum: NORMAL=1, UNKNOWN=2, CONTROL=3, USER_DEFINED=4, UNUSED=5, BYTE=6).
* ``ModelProto.trainer_spec`` (2): model_type (3), byte_fallback (35), unk_id (40), bos_id (41),
  eos_id (42), pad_id (43).
* ``ModelProto.normalizer_spec`` (3): name (1), add_dummy_prefix (3).

The SentencePiece type numbers equal gguf's ``TokenType`` values, so they are copied unchanged.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from capsfuse_lite.errors import CheckpointError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}


class _ProtoError(ValueError):
    pass


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise _ProtoError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise _ProtoError("varint too long")


def _fields(buf: bytes) -> Iterator[tuple[int, int, object]]:
    """Yield (field number, wire type, value) for one message; value is int, bytes or float."""
    pos = 0
    end = len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            if pos + 8 > end:
                raise _ProtoError("truncated fixed64")
            value = buf[pos:pos + 8]
            pos += 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > end:
                raise _ProtoError("truncated length-delimited field")
            value = buf[pos:pos + length]
            pos += length
        elif wire == 5:
            if pos + 4 > end:
                raise _ProtoError("truncated fixed32")
            value = struct.unpack_from("<f", buf, pos)[0]
            pos += 4
        else:
            raise _ProtoError(f"unsupported wire type {wire}")
        yield number, wire, value


def _int32(value: int) -> int:
    """A protobuf int32 is sign-extended to 64 bits on the wire."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


@dataclass
class SentencePieceModel:
    pieces: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    types: list[int] = field(default_factory=list)
    model_type: str = "unigram"
    byte_fallback: bool = False
    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = -1
    normalizer: str = ""
    add_dummy_prefix: bool = True

    def __len__(self) -> int:
        return len(self.pieces)


def _parse_piece(buf: bytes) -> tuple[str, float, int]:
    piece, score, kind = "", 0.0, NORMAL
    for number, _wire, value in _fields(buf):
        if number == 1:
            piece = bytes(value).decode("utf-8")
        elif number == 2:
            score = float(value)
        elif number == 3:
            kind = int(value)
    return piece, score, kind


def parse_sentencepiece(data: bytes) -> SentencePieceModel:
    """Decode the pieces and the few trainer/normalizer settings of a ModelProto."""
    model = SentencePieceModel()
    for number, wire, value in _fields(data):
        if number == 1 and wire == 2:
            piece, score, kind = _parse_piece(value)
            model.pieces.append(piece)
            model.scores.append(score)
            model.types.append(kind)
        elif number == 2 and wire == 2:
            for sub, sub_wire, sub_value in _fields(value):
                if sub_wire != 0:
                    continue
                if sub == 3:
                    model.model_type = MODEL_TYPES.get(sub_value, str(sub_value))
                elif sub == 35:
                    model.byte_fallback = bool(sub_value)
                elif sub == 40:
                    model.unk_id = _int32(sub_value)
                elif sub == 41:
                    model.bos_id = _int32(sub_value)
                elif sub == 42:
                    model.eos_id = _int32(sub_value)
                elif sub == 43:
                    model.pad_id = _int32(sub_value)
        elif number == 3 and wire == 2:
            for sub, sub_wire, sub_value in _fields(value):
                if sub == 1 and sub_wire == 2:
                    model.normalizer = bytes(sub_value).decode("utf-8", "replace")
                elif sub == 3 and sub_wire == 0:
                    model.add_dummy_prefix = bool(sub_value)
    return model


def load_sentencepiece(path: Path) -> SentencePieceModel:
    """Read ``tokenizer.model``; a file that is not a SentencePiece model is a CheckpointError."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the SentencePiece model ({exc.strerror})") from None
    try:
        model = parse_sentencepiece(data)
    except (_ProtoError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not a valid SentencePiece tokenizer.model ({exc}); re-download it") from None
    if not model.pieces:
        raise CheckpointError(f"{path}: the SentencePiece model holds no pieces; re-download it")
    return model
