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
import os
import stat
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


_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"  # 0xFD2FB528, little-endian


def zstd_frames_whole(fh: io.BufferedIOBase) -> bool:
    """Whether ``fh`` (at its start) holds whole zstd frames and nothing else, up to its last byte.

    Only the frames' and blocks' headers are read (RFC 8878, sections 3.1.1 and 3.1.1.2); the blocks are
    seeked past, so a 190 MiB month takes ~10,000 small reads. False for anything else: a frame cut
    short, a skippable frame, a reserved bit or block type, bytes that are not a frame. Such a file is
    then read by :class:`ZstdFramesReader`, which says what is wrong and where. Leaves ``fh`` anywhere.
    """
    size = os.fstat(fh.fileno()).st_size
    while True:
        magic = fh.read(4)
        if not magic:
            return True
        if magic != _ZSTD_MAGIC:
            return False
        descriptor = fh.read(1)
        if not descriptor:
            return False
        d = descriptor[0]
        if d & 0x08:  # reserved bit
            return False
        single_segment = bool(d & 0x20)
        fcs = (1 if single_segment else 0, 2, 4, 8)[d >> 6]
        header = (0 if single_segment else 1) + (0, 1, 2, 4)[d & 0x03] + fcs
        if len(fh.read(header)) != header:
            return False
        while True:
            block = fh.read(3)
            if len(block) != 3:
                return False
            value = int.from_bytes(block, "little")
            last, kind, block_size = value & 1, (value >> 1) & 3, value >> 3
            if kind == 3:  # reserved block type
                return False
            end = fh.tell() + (1 if kind == 1 else block_size)  # an RLE block holds one byte
            if end > size:
                return False
            fh.seek(end)
            if last:
                break
        if d & 0x04 and len(fh.read(4)) != 4:  # content checksum
            return False


def open_binary(path: Path) -> io.BufferedIOBase:
    """Open ``path`` for binary reading, decompressing ``.zst`` / ``.gz`` by suffix.

    A ``.zst`` of whole frames (:func:`zstd_frames_whole`, checked first) is decompressed by zstandard's
    ``stream_reader``, with a quarter less CPU than :class:`ZstdFramesReader` (1,026 MiB: 1.13 against 1.51
    CPU-s, ``bench/ingest/pushshift_read.py``);
    a file cut short fails that check, so the reader that takes a cut frame for the end never sees one.
    Any other ``.zst`` goes to :class:`ZstdFramesReader`. Either way a read returns at most what was asked
    for, whatever the compression ratio."""
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    fh = open(path, "rb")
    if suffix == ".zst":
        try:
            # a pipe or a device cannot be looked over first: it is read as it comes
            regular = stat.S_ISREG(os.fstat(fh.fileno()).st_mode)
            whole = regular and zstd_frames_whole(fh)
            if regular:
                fh.seek(0)
        except BaseException:
            fh.close()
            raise
        if whole:
            reader = zstandard.ZstdDecompressor(max_window_size=_MAX_WINDOW).stream_reader(
                fh, read_size=_ZSTD_READ, read_across_frames=True, closefd=True)
            return io.BufferedReader(reader, buffer_size=1 << 20)  # type: ignore[arg-type]
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
