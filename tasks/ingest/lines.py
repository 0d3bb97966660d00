"""Line readers shared by the JSON-lines sources: plain, ``.gz`` or ``.zst`` files, one line at a time.

``zstandard``'s ``stream_reader`` (and ``read_to_iter``) return a silent early
EOF when the input ends inside a frame, so a half-downloaded dump would read as
a shorter, valid one; :class:`ZstdFramesReader` decompresses frame by frame
with ``decompressobj`` and raises when the input ends before a frame's end.
Pushshift dumps use a 2 GiB window (``--long=31``), hence
``max_window_size=2**31``. :func:`iter_text_lines` decodes one line at a time
and never holds a line longer than its limit.
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Iterator
from pathlib import Path

import zstandard

from .errors import IngestError

__all__ = ["MAX_LINE_BYTES", "OversizedLine", "ZstdFramesReader", "iter_text_lines", "open_binary"]

MAX_LINE_BYTES = 16 << 20  # a longer line is quarantined unread (ingest.max_row_bytes)
OVERSIZED_HEAD_BYTES = 200  # what the quarantine keeps of a line too long to read
_ZSTD_READ = 1 << 16  # compressed bytes read from the file at a time
# Compressed bytes per decompress call. A zstd block (<= 128 KiB out) takes at least 4 bytes in, so
# 512 bytes in give at most 16 MiB out: a few KB that expand to GBs never sit in memory at once.
_ZSTD_FEED = 512
_MAX_WINDOW = 2**31  # Pushshift: zstd --long=31


# --------------------------------------------------------------------------- streams


class _TruncatedStream(Exception):
    """Raised inside the raw reader; turned into an IngestError with a line number."""


class ZstdFramesReader(io.RawIOBase):
    """A raw binary stream over a (multi-frame) zstd file that notices truncation.

    ``zstandard``'s ``stream_reader`` reports a file cut inside a frame as a
    normal EOF. Here each frame is decompressed by its own ``decompressobj``;
    when the input ends while a frame is unfinished, ``readinto`` raises.
    Memory is bounded by the output of one compressed chunk (64 KiB in).
    """

    def __init__(self, fh: io.BufferedIOBase, max_window_size: int = _MAX_WINDOW) -> None:
        super().__init__()
        self._fh = fh
        self._dctx = zstandard.ZstdDecompressor(max_window_size=max_window_size)
        self._obj = None  # decompressobj of the frame being read
        self._fed = False  # the current frame has been fed at least one byte
        self._pending = b""  # compressed bytes read and not yet fed, from ``_pos`` on
        self._pos = 0
        self._out = memoryview(b"")
        self._done = False
        self.decompressed = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        while not self._out:
            if self._done:
                return 0
            self._out = memoryview(self._decompress_more())
        n = min(len(b), len(self._out))
        b[:n] = self._out[:n]
        self._out = self._out[n:]
        self.decompressed += n
        return n

    def _decompress_more(self) -> bytes:
        if self._pos >= len(self._pending):
            self._pending, self._pos = self._fh.read(_ZSTD_READ), 0
        # an offset into the bytes read, not a slice of what is left: that copied ~32 KiB per 512 bytes fed
        data = self._pending[self._pos : self._pos + _ZSTD_FEED]
        self._pos += len(data)
        if not data:
            if self._obj is not None and self._fed and not self._obj.eof:
                raise _TruncatedStream(
                    "truncated zstd stream: the file ends inside a frame "
                    f"(after {self.decompressed + len(self._out)} decompressed bytes); "
                    "the download is probably incomplete"
                )
            self._done = True
            return b""
        if self._obj is None or self._obj.eof:
            self._obj = self._dctx.decompressobj()
            self._fed = False
        self._fed = True
        out = self._obj.decompress(data)
        if self._obj.eof:
            # the next frame begins here
            self._pending, self._pos = self._obj.unused_data + self._pending[self._pos :], 0
        return out

    def close(self) -> None:
        try:
            self._fh.close()
        finally:
            super().close()


def open_binary(path: Path) -> io.BufferedIOBase:
    """Open ``path`` for binary reading, decompressing ``.zst`` / ``.gz`` by suffix."""
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    fh = open(path, "rb")
    if suffix == ".zst":
        return io.BufferedReader(ZstdFramesReader(fh), buffer_size=1 << 20)
    return fh


class OversizedLine(str):
    """Stands for a line longer than the limit: its text is the line's first bytes (decoded leniently)."""


def iter_text_lines(path: Path, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, text)`` for each non-blank line of a (compressed) text file.

    A line longer than ``max_line_bytes`` is never held whole: it is read past
    and yielded as an :class:`OversizedLine` holding its first bytes, for the
    reader to quarantine.

    Lines are split on ``\\n`` only (a lone ``\\r`` inside a line is kept), decoded
    as strict UTF-8 one at a time so that a bad byte is reported at its line,
    a UTF-8 BOM on line 1 is dropped, and the line ending is stripped. Raises
    :class:`IngestError` for a truncated or corrupt stream, non-UTF-8 bytes and
    a file without any non-blank line (``empty file``).
    """
    file = str(path)
    lineno = 0
    yielded = False
    try:
        stream = open_binary(path)
    except OSError as exc:
        raise IngestError(f"cannot open: {exc}", path=file) from exc
    with stream:
        while True:
            try:
                raw = stream.readline(max_line_bytes + 1)
                oversized = len(raw) > max_line_bytes and not (len(raw) == max_line_bytes + 1 and raw.endswith(b"\n"))
                if oversized:
                    head, rest = raw[:OVERSIZED_HEAD_BYTES], raw
                    while rest and not rest.endswith(b"\n"):
                        rest = stream.readline(1 << 20)
            except _TruncatedStream as exc:
                raise IngestError(str(exc), path=file, line=lineno + 1) from None
            except zstandard.ZstdError as exc:
                raise IngestError(f"corrupt zstd stream: {exc}", path=file, line=lineno + 1) from exc
            except EOFError as exc:  # gzip: "Compressed file ended before the end-of-stream marker"
                raise IngestError(f"truncated compressed stream: {exc}", path=file, line=lineno + 1) from exc
            except (gzip.BadGzipFile, OSError) as exc:
                raise IngestError(f"cannot read: {exc}", path=file, line=lineno + 1) from exc
            if not raw:
                break
            lineno += 1
            if oversized:
                yielded = True
                yield lineno, OversizedLine(head.decode("utf-8", errors="replace"))
                continue
            try:
                text = raw.decode("utf-8", errors="strict")
            except UnicodeDecodeError as exc:
                bad = raw[exc.start : exc.end]
                raise IngestError(
                    f"not valid UTF-8: byte(s) {bad.hex(' ')} at byte {exc.start} of the line",
                    path=file,
                    line=lineno,
                ) from None
            if lineno == 1 and text.startswith("\ufeff"):
                text = text[1:]
            text = text.rstrip("\r\n")
            if not text.strip():
                continue
            yielded = True
            yield lineno, text
    if not yielded:
        raise IngestError("empty file (no non-blank line)", path=file)
