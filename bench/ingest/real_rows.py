"""A large Stack Exchange site of real rows: the fixture dumps' rows, repeated with their ids shifted apart.

The generated site of ``run.py`` has bodies the project's generator wrote; this one has the bodies, tags, licences,
line endings (CRLF in one, LF in the other) and row order of two real dumps (``tests/fixtures/stackexchange``: conlang.meta 2020 with its
Votes.xml, datascience.meta 2024 without), repeated ``--reps`` times. Each copy's ``Id``, ``ParentId``,
``AcceptedAnswerId`` and ``PostId`` are shifted by 10,000,000 per copy and site, so every copy is a distinct set
of questions, answers and votes; everything else is byte for byte the fixture's. 249 copies make a Posts.xml of
302 MiB, the size of the issue's independent 300 MB check::

    .venv/bin/python bench/ingest/real_rows.py --out SCRATCH            # SCRATCH/real.stackexchange.com
    .venv/bin/python bench/ingest/run.py --site SCRATCH/real.stackexchange.com --workers 2

``--one-line`` writes each table as an XML library does (lxml's declaration, no line end between rows: the
whole table on one line), the same rows byte for byte otherwise. ``--archive`` also packs the two tables into
``SCRATCH/real.stackexchange.com.7z``, a dump as it is published (LZMA2, preset 1: quicker to write than the
dumps' own setting, and as quick to decompress)::

    .venv/bin/python bench/ingest/real_rows.py --out SCRATCH --archive
    .venv/bin/alignflow ingest SCRATCH/real.stackexchange.com.7z --workdir WORK --set ingest.workers=2

The files are written under temporary names and renamed into place once complete.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "stackexchange"
SITES = ("conlang.meta-2020", "datascience.meta-2024")
SITE = "real.stackexchange.com"
SHIFT = 10_000_000  # larger than any id of the fixtures
_ID = re.compile(rb'( (?:Id|ParentId|AcceptedAnswerId|PostId)=")(\d+)(")')


def rows(path: Path) -> list[bytes]:
    """The ``<row .../>`` lines of a dump file, each with its own line ending; none if the file is absent."""
    if not path.is_file():
        return []
    lines = path.read_bytes().splitlines(keepends=True)
    return [line for line in lines if line.lstrip().startswith(b"<row ")]


def shifted(lines: list[bytes], offset: int) -> list[bytes]:
    """``lines`` with every id attribute (the row's and those pointing at posts) raised by ``offset``."""
    def add(m: re.Match) -> bytes:
        return m.group(1) + str(int(m.group(2)) + offset).encode() + m.group(3)

    return [_ID.sub(add, line) for line in lines]


def write_site(out: Path, reps: int, fixtures: Path = FIXTURES, *, one_line: bool = False) -> Path:
    """Write ``out/real.stackexchange.com/{Posts,Votes}.xml`` from ``reps`` copies of the fixtures' rows.
    ``one_line``: each table as an XML library writes it (``<?xml version='1.0' encoding='UTF-8'?>`` and every row
    on one line, no line end between elements), the rows' bytes unchanged."""
    site = out / SITE
    site.mkdir(parents=True, exist_ok=True)
    tables = {"Posts.xml": b"posts", "Votes.xml": b"votes"}
    sources = [{name: rows(fixtures / s / name) for name in tables} for s in SITES]
    for name, tag in tables.items():
        final = site / name
        tmp = site / f".{name}.tmp-{os.getpid()}"
        with open(tmp, "wb") as fh:
            if one_line:
                fh.write(b"<?xml version='1.0' encoding='UTF-8'?>\n<" + tag + b">")
            else:
                fh.write(b'\xef\xbb\xbf<?xml version="1.0" encoding="utf-8"?>\r\n<' + tag + b">\r\n")
            for rep in range(reps):
                for k, source in enumerate(sources):
                    lines = shifted(source[name], (rep * len(SITES) + k) * SHIFT)
                    fh.writelines([line.strip() for line in lines] if one_line else lines)
            fh.write(b"</" + tag + b">" + (b"" if one_line else b"\r\n"))
        os.replace(tmp, final)
    return site


def write_archive(site: Path) -> Path:
    """``site``'s Posts.xml and Votes.xml packed into ``<site>.7z`` beside it (written under a temporary name)."""
    import py7zr

    final = site.with_name(site.name + ".7z")
    tmp = site.with_name(f".{final.name}.tmp-{os.getpid()}")
    with py7zr.SevenZipFile(tmp, "w", filters=[{"id": py7zr.FILTER_LZMA2, "preset": 1}]) as z:
        for name in ("Posts.xml", "Votes.xml"):
            z.write(site / name, arcname=name)
    os.replace(tmp, final)
    return final


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help=f"the folder to write {SITE}/ into")
    ap.add_argument("--reps", type=int, default=249, help="copies of the fixtures' rows (249: 302 MiB of Posts.xml)")
    ap.add_argument("--one-line", action="store_true",
                    help="every row of a table on one line, as an XML library writes it (no line ends between rows)")
    ap.add_argument("--archive", action="store_true", help=f"also pack the tables into {SITE}.7z, as dumps are published")
    args = ap.parse_args(argv)
    if args.reps < 1:
        ap.error("--reps must be at least 1")
    site = write_site(args.out, args.reps, one_line=args.one_line)
    files = sorted(site.glob("*.xml")) + ([write_archive(site)] if args.archive else [])
    for f in files:
        print(f"{f}: {f.stat().st_size / (1 << 20):.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
