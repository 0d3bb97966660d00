"""Seconds per test file from a JUnit XML report, written to tests/file_durations.json (see conftest.py).

    python tests/file_durations.py REPORT.xml
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

OUT = Path(__file__).with_name("file_durations.json")


def per_file(report: Path) -> dict[str, float]:
    totals: dict[str, float] = defaultdict(float)
    for case in ET.parse(report).getroot().iter("testcase"):
        module = case.get("classname", "")  # tests.test_x or tests.test_x.TestClass
        parts = module.split(".")
        while parts and not parts[-1].startswith("test_"):
            parts.pop()
        if parts:
            totals["/".join(parts) + ".py"] += float(case.get("time", 0.0))
    return {path: round(sec, 1) for path, sec in sorted(totals.items(), key=lambda kv: -kv[1])}


if __name__ == "__main__":
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_file():
        print("usage: python tests/file_durations.py REPORT.xml (a JUnit XML report of the whole suite)", file=sys.stderr)
        sys.exit(2)
    OUT.write_text(json.dumps(per_file(Path(sys.argv[1])), indent=1) + "\n")
    print(f"wrote {OUT} ({len(json.loads(OUT.read_text()))} files)")
