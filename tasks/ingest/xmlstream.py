"""Streaming, hardened reading of Stack Exchange dump XML.

A dump table is ``<posts>`` (or ``<votes>``) holding one ``<row .../>`` per
record, every field an attribute. :class:`RowParser` is a push parser: feed it
bytes from anywhere (a file, a 7z member being decompressed, a pipe) and it
calls ``on_row(attrib, line)`` once per ``<row>``, then forgets the element, so
memory stays flat whatever the size of the file.

Refused, never expanded: any document with a DTD (``<!DOCTYPE``), which is
where entity definitions (billion laughs) and external entities (XXE) live.
The decision is taken on the parser's own view of the document (its doctype
once the root element starts), not on a byte scan, so comments, processing
instructions or another encoding before the DTD change nothing; entities are
never resolved, and no row is handed on before that check. Text is read as
UTF-8 whatever the XML declaration says (UTF-16/32 is refused). A ``<row>``
longer than ``max_row_bytes`` is cut out of the byte stream before lxml sees
it. Errors name the file and the line.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lxml import etree

from .errors import IngestError

CHUNK = 1 << 20  # bytes per read; lxml parses each chunk incrementally
_HEAD_LIMIT = 1 << 16  # a prolog longer than this is not a dump table
MAX_ROW_BYTES = 16 << 20  # a <row> longer than this is quarantined unread (real rows are under 1 MiB)

RowCallback = Callable[[Any, int | None], None]
OversizeCallback = Callable[[int, bytes], None]


class RowParser:
    """Push parser for one dump table; calls ``on_row(attrib, line)`` per ``<row>``.

    ``on_oversize(line, head)`` is called instead for a ``<row>`` element
    longer than ``max_row_bytes`` (``head``: its first bytes); the element is
    skipped before it reaches the XML parser, so memory stays bounded whatever
    its size. Without ``on_oversize`` such a row is an error.
    """

    def __init__(self, label: str, on_row: RowCallback, *, root: str | None = None,
                 max_row_bytes: int = MAX_ROW_BYTES, on_oversize: OversizeCallback | None = None) -> None:
        self.label = label
        self.on_row = on_row
        self.on_oversize = on_oversize
        self.expected_root = root
        self.max_row_bytes = max_row_bytes
        self.rows = 0
        self.bytes_fed = 0
        self._parsed = 0  # bytes given to lxml
        self._lines_parsed = 0  # newlines given to lxml
        self._root_seen = False
        self._pending = b""  # bytes from the last '<' not yet given to lxml (one element at most)
        self._skipping: bytes | None = None  # last bytes of the oversized element being skipped
        self._skip_lines = 0  # newlines dropped with skipped elements so far
        self._shifts: deque[tuple[int, int]] = deque()  # (lxml line from which, newlines dropped before it)
        self._shift = 0
        self._first = b""
        self._nonspace = False  # any byte other than a BOM or whitespace seen
        self._parser = etree.XMLPullParser(
            events=("start", "end"),
            resolve_entities=False,
            no_network=True,
            load_dtd=False,
            huge_tree=True,  # rows up to max_row_bytes, which may exceed libxml2's 10 MB text default
            remove_comments=True,
            remove_pis=True,
            encoding="utf-8",  # dump tables are UTF-8 whatever their declaration says
        )

    # -- feeding -------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        if not data:
            return
        if len(self._first) < 4:
            self._first += data[: 4 - len(self._first)]
            self._check_encoding()
        self.bytes_fed += len(data)
        if not self._nonspace:
            self._nonspace = bool(data.strip(b"\xef\xbb\xbf \t\r\n"))
        self._split(data)

    def close(self) -> None:
        if self.bytes_fed == 0:
            raise IngestError("empty file", path=self.label)
        if self._skipping is not None:
            raise IngestError(f"the file ends inside a <row> longer than {self.max_row_bytes} bytes",
                              path=self.label, line=self._lines_parsed + self._skip_lines + 1)
        if not self._nonspace:
            raise IngestError("empty file (only whitespace)", path=self.label)
        self._parse(self._pending)
        self._pending = b""
        try:
            self._parser.close()
        except etree.XMLSyntaxError as exc:
            raise self._syntax_error(exc, at_end=True) from None
        self._drain()
        if not self._root_seen:
            raise IngestError("no XML root element: this is not a dump table", path=self.label)

    # -- internals -----------------------------------------------------------
    def _check_encoding(self) -> None:
        head = self._first
        if head.startswith((b"\xff\xfe", b"\xfe\xff")) or (len(head) >= 2 and b"\x00" in head[:2]):
            raise IngestError("UTF-16 or UTF-32 text: dump tables are UTF-8", path=self.label, line=1)

    def _split(self, data: bytes) -> None:
        """Give lxml everything up to the last '<' seen; skip any element longer than max_row_bytes."""
        cap = self.max_row_bytes
        if self._skipping is not None:
            j = data.find(b"<")
            if j < 0:
                self._skip(data)
                return
            self._skip(data[:j])
            self._end_skip()
            data = data[j:]
        buf = self._pending + data if self._pending else data
        self._pending = b""
        if len(buf) <= cap:  # no element in here can be too long yet
            k = buf.rfind(b"<")
            if k <= 0:
                self._pending = buf
                return
            self._parse(buf[:k])
            self._pending = buf[k:]
            return
        pos = 0  # bytes before pos are parsed; buf[pos] is '<' (or pos == 0)
        while True:
            nxt = buf.find(b"<", pos + 1)
            if nxt < 0:
                if len(buf) - pos > cap:
                    self._start_skip(buf, pos, len(buf))  # continues in the next chunks
                else:
                    self._pending = buf[pos:]
                return
            if nxt - pos > cap:
                self._start_skip(buf, pos, nxt)
                self._end_skip()
            else:
                self._parse(buf[pos:nxt])
            pos = nxt

    def _start_skip(self, buf: bytes, start: int, stop: int) -> None:
        head = bytes(buf[start:start + 200])
        if not head.startswith(b"<row") or head[4:5] not in (b" ", b"\t", b"\r", b"\n", b"/", b">"):
            raise IngestError(f"an element longer than {self.max_row_bytes} bytes that is not a <row>",
                              path=self.label, line=self._lines_parsed + self._skip_lines + 1)
        self._skip_head = head
        self._skip_line = self._lines_parsed + self._skip_lines + 1
        self._skipping = b""
        self._skip(buf[start:stop])

    def _skip(self, part: bytes) -> None:
        self._skip_lines += part.count(b"\n")
        tail = (self._skipping + part.rstrip(b" \t\r\n"))[-2:] if part.strip() else self._skipping
        self._skipping = tail

    def _end_skip(self) -> None:
        if self._skipping != b"/>":
            raise IngestError(f"a <row> longer than {self.max_row_bytes} bytes that does not end with '/>'",
                              path=self.label, line=self._skip_line)
        self._skipping = None
        self._shifts.append((self._lines_parsed + 1, self._skip_lines))
        if self.on_oversize is None:
            raise IngestError(f"a <row> longer than {self.max_row_bytes} bytes", path=self.label,
                              line=self._skip_line)
        self.rows += 1
        self.on_oversize(self._skip_line, self._skip_head)

    def _parse(self, data: bytes) -> None:
        if not data:
            return
        step = len(data) if self._root_seen else _HEAD_LIMIT
        for i in range(0, len(data), step):
            piece = data[i:i + step]
            try:
                self._parser.feed(piece)
            except etree.XMLSyntaxError as exc:
                error = self._syntax_error(exc)
            else:
                error = None
            if error is not None:
                if not self._root_seen:  # a DTD refusal comes before whatever error followed it
                    root = next((elem for event, elem in self._parser.read_events() if event == "start"), None)
                    if root is not None:
                        self._check_root(root)
                raise error
            self._parsed += len(piece)
            self._lines_parsed += piece.count(b"\n")
            self._drain()
            if not self._root_seen and self._parsed > _HEAD_LIMIT:
                raise IngestError("no root element in the first 64 KiB; not a dump table", path=self.label)

    def _syntax_error(self, exc: etree.XMLSyntaxError, at_end: bool = False) -> IngestError:
        # libxml2 keeps the first, most specific error in the log; the exception
        # itself sometimes only says "no element found" with line 0.
        log = self._parser.error_log
        first = next(iter(log), None) if len(log) else None
        msg = (first.message if first is not None else str(exc.msg or exc)).strip()
        line = (first.line if first is not None else exc.lineno) or None
        if line is not None:
            line += self._skip_lines  # errors are at the current position, after every skipped row
        if "encoding" in msg.lower() or "UTF-8" in msg:
            hint = "bytes that are not valid UTF-8"
        elif "subset" in msg or "doctype" in msg.lower() or "PEReference" in msg or "EntityDecl" in msg:
            hint = "document type declaration (DTD) refused (dump tables never have one)"
        elif "amplification" in msg.lower() or ("entity" in msg.lower() and "not defined" in msg):
            hint = "entity reference refused (dump tables declare no entities)"
        elif at_end or "Premature end" in msg:
            hint = "truncated or malformed XML"
        else:
            hint = "malformed XML"
        return IngestError(f"{hint}: {msg}", path=self.label, line=line)

    def _check_root(self, elem: Any) -> None:
        """On the root's start event the prolog is fully parsed: refuse any DTD, whatever preceded it."""
        self._root_seen = True
        info = elem.getroottree().docinfo
        if info.doctype or info.internalDTD is not None or info.externalDTD is not None:
            raise IngestError(
                "document type declaration (DTD) before this root element refused: dump tables never have one, "
                "and DTD entities "
                "are how entity-expansion (billion laughs) and external-entity (XXE) attacks work",
                path=self.label,
                line=elem.sourceline,
            )
        if self.expected_root and elem.tag != self.expected_root:
            raise IngestError(f"root element is <{elem.tag}>, expected <{self.expected_root}>",
                              path=self.label, line=elem.sourceline)

    def _drain(self) -> None:
        for event, elem in self._parser.read_events():
            if event == "start":
                if not self._root_seen:
                    self._check_root(elem)
                continue
            if elem.tag != "row":
                continue
            line = elem.sourceline
            if self._shifts and line is not None:
                while self._shifts and line >= self._shifts[0][0]:
                    self._shift = self._shifts.popleft()[1]
            self.rows += 1
            self.on_row(elem.attrib, None if line is None else line + self._shift)
            elem.clear(keep_tail=False)
            parent = elem.getparent()
            if parent is not None:
                while elem.getprevious() is not None:
                    del parent[0]


def parse_file(path: Path, on_row: RowCallback, *, root: str | None = None, label: str | None = None,
               max_row_bytes: int = MAX_ROW_BYTES, on_oversize: OversizeCallback | None = None) -> int:
    """Stream one XML file through :class:`RowParser`; returns the number of rows."""
    parser = RowParser(label or str(path), on_row, root=root, max_row_bytes=max_row_bytes, on_oversize=on_oversize)
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            parser.feed(chunk)
    parser.close()
    return parser.rows
