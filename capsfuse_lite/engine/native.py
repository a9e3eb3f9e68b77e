"""Facts about the installed llama.cpp shared libraries, read from the files (nothing is loaded).

A llama-cpp-python build linked with ``-static-libstdc++`` (for instance through an ``LDFLAGS``
in the build environment) carries a private copy of libstdc++ inside ``libggml-cuda.so`` and
exports it. The process then binds some C++ runtime symbols to that copy and others to the
system's ``libstdc++.so.6``, whichever the load order reaches first; objects made by one copy are
used by the other. Reported on a CUDA 13 machine: ``llama_model_load_from_file`` segfaulted in
``llama_model::print_info`` when numpy (whose C++ runtime is the system one) was imported before
llama.cpp, and matplotlib imported after llama.cpp crashed the same way. Investigated here by
relinking a CUDA build: the normal build is clean (libstdc++.so.6 NEEDED, no libstdc++ symbols
exported); ``-static-libstdc++`` reproduces the reported exports; linking with
``-Wl,--exclude-libs,ALL`` hides them (README's CUDA install line).

:func:`libstdcxx_hazard` finds such a library by its ELF dynamic symbol table: it exports symbols
that only libstdc++ itself defines (``std::ostream::_M_insert<long>``, ``std::ios_base::Init``,
``std::locale::classic``, ``std::cout``, ``__cxa_throw`` ...). Counting ``std::`` symbols would not
do: every C++ library exports template instances.
"""

from __future__ import annotations

import importlib.util
import mmap
import os
import struct
from functools import lru_cache
from pathlib import Path

# defined only by libstdc++/libsupc++ itself, never by code that merely uses the library
SENTINELS = frozenset({
    b"_ZNSo9_M_insertIlEERSoT_",  # std::ostream::_M_insert<long> (the reported crash site)
    b"_ZNSt8ios_base4InitC1Ev",  # std::ios_base::Init::Init()
    b"_ZNSt6locale7classicEv",  # std::locale::classic()
    b"_ZNKSt6locale2id5_M_idEv",  # std::locale::id::_M_id() const
    b"_ZSt4cout",  # std::cout
    b"__cxa_throw",
    b"_ZSt20__throw_length_errorPKc",
})

_SHT_DYNSYM, _SHT_DYNAMIC, _DT_NEEDED = 11, 6, 1
_EXPORTED_BINDINGS = (1, 2, 10)  # STB_GLOBAL, STB_WEAK, STB_GNU_UNIQUE
_EXPORTED_VISIBILITY = (0, 3)  # STV_DEFAULT, STV_PROTECTED


def exported_symbols(path: str | os.PathLike) -> tuple[list[str], set[bytes]]:
    """(DT_NEEDED sonames, names of the symbols an ELF64 shared library defines and exports)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data[:4] != b"\x7fELF" or data[4] != 2:
            raise ValueError(f"{path}: not an ELF64 file")
        end = "<" if data[5] == 1 else ">"
        (shoff,) = struct.unpack_from(end + "Q", data, 0x28)
        shentsize, shnum = struct.unpack_from(end + "HH", data, 0x3A)
        sections = [struct.unpack_from(end + "IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
        needed: list[str] = []
        symbols: set[bytes] = set()
        for _name, kind, _flags, _addr, offset, size, link, _info, _align, entsize in sections:
            if kind not in (_SHT_DYNSYM, _SHT_DYNAMIC):
                continue
            strtab = sections[link][4] if link < shnum else 0

            def string(at: int) -> bytes:
                start = strtab + at
                return data[start : data.find(b"\0", start)]

            if kind == _SHT_DYNSYM:
                for p in range(offset, offset + size, entsize or 24):
                    name, info, other, shndx = struct.unpack_from(end + "IBBH", data, p)
                    if shndx and (info >> 4) in _EXPORTED_BINDINGS and (other & 3) in _EXPORTED_VISIBILITY:
                        symbols.add(string(name))
            else:
                for p in range(offset, offset + size, entsize or 16):
                    tag, value = struct.unpack_from(end + "qQ", data, p)
                    if tag == _DT_NEEDED:
                        needed.append(string(value).decode(errors="replace"))
    return needed, symbols


def llama_lib_dir() -> Path | None:
    """The folder llama-cpp-python loads its libraries from (``LLAMA_CPP_LIB_PATH`` honoured),
    found without importing it."""
    override = os.environ.get("LLAMA_CPP_LIB_PATH")
    if override:
        return Path(override)
    spec = importlib.util.find_spec("llama_cpp")
    return Path(spec.origin).parent / "lib" if spec and spec.origin else None


def libstdcxx_hazard(lib_dir: str | os.PathLike | None = None) -> str | None:
    """The file name of a library of this llama.cpp build that exports its own libstdc++, else None."""
    folder = Path(lib_dir) if lib_dir is not None else llama_lib_dir()
    if folder is None or not folder.is_dir():
        return None
    files = sorted({p.resolve() for p in folder.glob("lib*.so*") if p.is_file()})
    return _hazard(tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))


@lru_cache(maxsize=8)
def _hazard(files: tuple[tuple[str, int, int], ...]) -> str | None:
    for path, _size, _mtime in files:
        try:
            _, symbols = exported_symbols(path)
        except (OSError, ValueError, struct.error):
            continue
        if symbols & SENTINELS:
            return Path(path).name
    return None
