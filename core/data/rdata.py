"""Read character vectors from an R package's lazy-load database (``*.rdb``/``*.rdx``).

R packages store their data sets as a pair of files: ``Rdata.rdx`` (a compressed,
serialised index: name -> (offset, length) into the ``.rdb``) and ``Rdata.rdb``
(concatenated compressed blobs, one serialised R object each). Debian's
``r-cran-janeaustenr`` ships Jane Austen's six novels this way. This module
reads that format with the standard library only (no R needed); it supports the
subset of R's XDR serialisation that data sets use (vectors, lists, pairlists,
attributes, symbols, references).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from pathlib import Path
from typing import Any

# SEXP type codes (R Internals, "Serialization Formats").
_NILSXP, _SYMSXP, _LISTSXP, _CLOSXP, _ENVSXP, _PROMSXP, _LANGSXP = 0, 1, 2, 3, 4, 5, 6
_CHARSXP, _LGLSXP, _INTSXP, _REALSXP, _CPLXSXP, _STRSXP, _VECSXP = 9, 10, 13, 14, 15, 16, 19
_REFSXP, _NILVALUE_SXP, _GLOBALENV_SXP, _UNBOUNDVALUE_SXP = 255, 254, 253, 252
_MISSINGARG_SXP, _BASENAMESPACE_SXP, _EMPTYENV_SXP, _BASEENV_SXP = 251, 247, 242, 241
_SPECIAL_REFS = {_GLOBALENV_SXP, _UNBOUNDVALUE_SXP, _MISSINGARG_SXP, _BASENAMESPACE_SXP,
                 _EMPTYENV_SXP, _BASEENV_SXP}
_NA_INT = -(2**31)


class RDataError(ValueError):
    """The file is not an R serialisation this reader understands."""


class _Reader:
    def __init__(self, buf: bytes):
        self.buf, self.pos, self.refs = buf, 0, []

    def _take(self, n: int) -> bytes:
        if self.pos + n > len(self.buf):
            raise RDataError("truncated R serialisation")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def int(self) -> int:
        return struct.unpack(">i", self._take(4))[0]

    def header(self) -> None:
        if self._take(2) != b"X\n":
            raise RDataError("only XDR (big-endian binary) R serialisation is supported")
        version = self.int()
        self.int(), self.int()  # writer R version, minimal reader version
        if version == 3:
            self._take(self.int())  # native encoding name
        elif version != 2:
            raise RDataError(f"unsupported R serialisation version {version}")

    def item(self) -> Any:
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if kind == _NILVALUE_SXP or kind in _SPECIAL_REFS:
            return None
        if kind == _REFSXP:
            idx = flags >> 8 or self.int()
            return self.refs[idx - 1]
        if kind == _SYMSXP:
            name = self.item()
            self.refs.append(name)
            return name
        if kind == _CHARSXP:
            n = self.int()
            return None if n == -1 else self._take(n).decode("utf-8", errors="replace")
        if kind in (_LISTSXP, _LANGSXP, _CLOSXP, _PROMSXP):
            out: dict[str, Any] = {}
            items: list[Any] = []
            while True:  # pairlist: (attr) (tag) car, then the cdr inline
                if has_attr:
                    self.item()
                tag = self.item() if has_tag else None
                value = self.item()
                items.append(value)
                if tag is not None:
                    out[tag] = value
                nxt = self.int()
                kind, has_attr, has_tag = nxt & 0xFF, bool(nxt & (1 << 9)), bool(nxt & (1 << 10))
                if kind == _NILVALUE_SXP:
                    break
                if kind not in (_LISTSXP, _LANGSXP):
                    self.pos -= 4
                    self.item()
                    break
            return out if out else items
        if kind == _ENVSXP:
            env: dict[str, Any] = {}
            self.refs.append(env)
            self.int()  # locked
            self.item(), self.item()  # enclosure, frame
            self.item(), self.item()  # hash table, attributes
            return env
        if kind in (_LGLSXP, _INTSXP):
            n = self.int()
            vals = struct.unpack(f">{n}i", self._take(4 * n))
            value: Any = [None if v == _NA_INT else v for v in vals]
        elif kind == _REALSXP:
            n = self.int()
            value = list(struct.unpack(f">{n}d", self._take(8 * n)))
        elif kind == _CPLXSXP:
            n = self.int()
            raw = struct.unpack(f">{2 * n}d", self._take(16 * n))
            value = [complex(raw[i], raw[i + 1]) for i in range(0, 2 * n, 2)]
        elif kind == _STRSXP:
            value = [self.item() for _ in range(self.int())]
        elif kind == _VECSXP:
            value = [self.item() for _ in range(self.int())]
        else:
            raise RDataError(f"unsupported SEXP type {kind}")
        if has_attr:
            attrs = self.item()
            names = attrs.get("names") if isinstance(attrs, dict) else None
            if kind == _VECSXP and names and len(names) == len(value):
                return dict(zip(names, value))
        return value


def _decompress(blob: bytes) -> bytes:
    """One lazy-load blob: 4-byte big-endian length, then zlib (or a typed bz2/xz/raw) stream."""
    (n,) = struct.unpack(">I", blob[:4])
    body = blob[4:]
    try:
        out = zlib.decompress(body)
    except zlib.error:
        codec, data = body[:1], body[1:]
        if codec == b"2":
            out = bz2.decompress(data)
        elif codec == b"Z":
            out = lzma.decompress(data)
        elif codec == b"0":
            out = data
        else:
            raise RDataError("unknown compression in R lazy-load database") from None
    if len(out) != n:
        raise RDataError("R lazy-load blob has the wrong length")
    return out


def _unserialize(raw: bytes) -> Any:
    reader = _Reader(raw)
    reader.header()
    return reader.item()


def read_lazyload(stem: str | Path) -> dict[str, Any]:
    """Every object in ``<stem>.rdx``/``<stem>.rdb`` as Python values, keyed by R name."""
    stem = Path(stem)
    raw = Path(f"{stem}.rdx").read_bytes()
    # Code databases store the index like a blob; data databases gzip it whole.
    index = _unserialize(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else _decompress(raw))
    if not isinstance(index, dict) or "variables" not in index:
        raise RDataError(f"{stem}.rdx is not an R lazy-load index")
    rdb = Path(f"{stem}.rdb").read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].items():
        out[name] = _unserialize(_decompress(rdb[offset:offset + length]))
    return out
