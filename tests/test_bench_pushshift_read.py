"""bench/ingest/pushshift_read.py runs both paths of each part on a small month and reports their ratio."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("alignflow.tasks.ingest._fastreddit", reason="built without a C compiler: nothing to compare")


def test_the_bench_measures_both_paths_of_each_part(tmp_path):
    rows = [json.dumps({"id": f"c{i}", "parent_id": "t3_p" if i % 2 else f"t1_c{i - 1}", "link_id": "t3_p",
                        "subreddit": "s", "author": f"u{i % 5}", "body": f"comment {i} &gt; " + "w " * (i % 90),
                        "score": i % 7, "created_utc": 1420070400 + i}) for i in range(6000)]
    month = tmp_path / "RC_2015-01.zst"
    month.write_bytes(zstandard.ZstdCompressor().compress(("\n".join(rows) + "\n").encode()))
    out = tmp_path / "read.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "ingest" / "pushshift_read.py"), "--file", str(month),
                           "--skip-mb", "0", "--chunk-mb", "1", "--chunks", "1", "--rounds", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["lines"] > 1000 and result["decompressed_mib"] > 0.5
    assert result["parse_chunk_us_per_line"]["python_reader"] > 0 and result["parse_chunk_us_per_line"]["c_path"] > 0
    assert result["parse_chunk_ratio"] > 0 and result["decompress_ratio"] > 0
    assert "parse_chunk, us a line" in done.stdout
