"""Streaming, hardened reading of Stack Exchange dump XML.

A dump table is ``<posts>`` (or ``<votes>``) holding one ``<row .../>`` per
record, every field an attribute. :class:`RowParser` is a push parser: feed it
bytes from anywhere (a file, a 7z member being decompressed, a pipe) and it
calls ``on_row(attrib, line)`` once per ``<row>``, then forgets the element, so
memory stays flat whatever the size of the file.

Refused, never expanded: any document with a DTD (``<!DOCTYPE``), which is
where entity definitions (billion laughs) and external entities (XXE) live.
Errors name the file and the line.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lxml import etree

from .errors import IngestError

CHUNK = 1 << 20  # bytes per read; lxml parses each chunk incrementally
_ROOT_START = re.compile(rb"<[A-Za-z_]")
_HEAD_LIMIT = 1 << 16  # a prolog longer than this is not a dump table

RowCallback = Callable[[Any, int | None], None]


class RowParser:
    """Push parser for one dump table; calls ``on_row(attrib, line)`` per ``<row>``."""

    def __init__(self, label: str, on_row: RowCallback, *, root: str | None = None) -> None:
        self.label = label
        self.on_row = on_row
        self.expected_root = root
        self.rows = 0
        self.bytes_fed = 0
        self._head: bytes | None = b""  # prolog bytes held back until the root tag is seen
        self._root_checked = False
        self._parser = etree.XMLPullParser(
            events=("end",),
            tag="row",
            resolve_entities=False,
            no_network=True,
            load_dtd=False,
            huge_tree=True,  # real bodies exceed libxml2's 10 MB text-node default
            remove_comments=True,
            remove_pis=True,
        )

    # -- feeding -------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        if not data:
            return
        self.bytes_fed += len(data)
        if self._head is not None:
            self._head += data
            match = _ROOT_START.search(self._head)
            if match is None:
                if len(self._head) > _HEAD_LIMIT:
                    self._check_prolog(self._head)
                    raise IngestError("no root element in the first 64 KiB; not a dump table", path=self.label)
                return
            self._check_prolog(self._head[: match.start()])
            data, self._head = self._head, None
        try:
            self._parser.feed(data)
        except etree.XMLSyntaxError as exc:
            raise self._syntax_error(exc) from None
        self._drain()

    def close(self) -> None:
        if self.bytes_fed == 0:
            raise IngestError("empty file", path=self.label)
        if self._head is not None:
            self._check_prolog(self._head)
            stripped = self._head.lstrip(b"\xef\xbb\xbf \t\r\n")
            raise IngestError(
                "no XML root element (the file holds only a prolog or whitespace)"
                if stripped
                else "empty file (only whitespace)",
                path=self.label,
            )
        try:
            self._parser.close()
        except etree.XMLSyntaxError as exc:
            raise self._syntax_error(exc, at_end=True) from None
        self._drain()

    # -- internals -----------------------------------------------------------
    def _check_prolog(self, prolog: bytes) -> None:
        if b"<!DOCTYPE" in prolog.upper() or b"<!ENTITY" in prolog.upper():
            line = prolog[: prolog.upper().find(b"<!")].count(b"\n") + 1
            raise IngestError(
                "document type declaration (DTD) refused: dump tables never have one, and DTD entities "
                "are how entity-expansion (billion laughs) and external-entity (XXE) attacks work",
                path=self.label,
                line=line,
            )

    def _syntax_error(self, exc: etree.XMLSyntaxError, at_end: bool = False) -> IngestError:
        # libxml2 keeps the first, most specific error in the log; the exception
        # itself sometimes only says "no element found" with line 0.
        log = self._parser.error_log
        first = next(iter(log), None) if len(log) else None
        msg = (first.message if first is not None else str(exc.msg or exc)).strip()
        line = (first.line if first is not None else exc.lineno) or None
        if "encoding" in msg.lower() or "UTF-8" in msg:
            hint = "bytes that are not valid UTF-8"
        elif at_end or "Premature end" in msg:
            hint = "truncated or malformed XML"
        else:
            hint = "malformed XML"
        return IngestError(f"{hint}: {msg}", path=self.label, line=line)

    def _drain(self) -> None:
        for _event, elem in self._parser.read_events():
            if not self._root_checked:
                self._root_checked = True
                parent = elem.getparent()
                root_tag = parent.tag if parent is not None else None
                if self.expected_root and root_tag != self.expected_root:
                    raise IngestError(
                        f"root element is <{root_tag}>, expected <{self.expected_root}>",
                        path=self.label,
                        line=elem.sourceline,
                    )
            self.rows += 1
            self.on_row(elem.attrib, elem.sourceline)
            elem.clear(keep_tail=False)
            parent = elem.getparent()
            if parent is not None:
                while elem.getprevious() is not None:
                    del parent[0]


def parse_file(path: Path, on_row: RowCallback, *, root: str | None = None, label: str | None = None) -> int:
    """Stream one XML file through :class:`RowParser`; returns the number of rows."""
    parser = RowParser(label or str(path), on_row, root=root)
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            parser.feed(chunk)
    parser.close()
    return parser.rows
