"""Errors for bad input: each names the file and where in it."""

from __future__ import annotations


class IngestError(Exception):
    """Input that cannot be ingested. The message names file, position and field.

    Raised for problems that make the rest of a file untrustworthy (truncated
    or malformed XML, non-UTF-8 bytes, a DTD, a bad archive, a missing column).
    Row-level problems that can be skipped are quarantined instead.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        line: int | None = None,
        row_id: str | None = None,
        field: str | None = None,
    ) -> None:
        self.path = path
        self.line = line
        self.row_id = row_id
        self.field = field
        message = " ".join(message.split())  # one line, whatever a library's message held
        self.reason = message
        where = []
        if path:
            where.append(str(path))
        if line is not None:
            where.append(f"line {line}")
        if row_id is not None:
            where.append(f"row Id={row_id}")
        if field:
            where.append(f"field {field}")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class BadRow(Exception):
    """One input row that cannot be used; readers turn it into an IngestError or a quarantine entry."""

    def __init__(self, reason: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.field = field
