"""Sources that yield nothing are said out loud: a warning naming the missing file, and exit 2 without pairs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from alignflow.config import IngestConfig
from alignflow.flows.cli import app
from alignflow.tasks.ingest.run import execute_ingest, plan_ingest


def _comments_only(folder: Path) -> Path:
    """A comment month without its submissions: two top-level comments and one reply."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        {"id": "c1", "parent_id": "t3_s1", "link_id": "t3_s1", "body": "first", "score": 5,
         "created_utc": 1136073600, "subreddit": "reddit.com", "author": "a"},
        {"id": "c2", "parent_id": "t3_s1", "link_id": "t3_s1", "body": "second", "score": 1,
         "created_utc": 1136073700, "subreddit": "reddit.com", "author": "b"},
        {"id": "c3", "parent_id": "t1_c1", "link_id": "t3_s1", "body": "a reply", "score": 2,
         "created_utc": 1136073800, "subreddit": "reddit.com", "author": "c"},
    ]
    path = folder / "RC_2006-01.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_comment_month_alone_names_the_missing_submissions(tmp_path):
    rc = _comments_only(tmp_path / "in")
    cfg = IngestConfig()
    result = execute_ingest(plan_ingest([rc], tmp_path / "work", cfg), cfg)
    assert result.datasets["pairs"]["rows"] == 0
    warnings = result.report["warnings"]
    assert any("RS_2006-01" in w and "2 top-level comment(s)" in w and "1 repl(ies)" in w for w in warnings)
    assert any("no preference pairs" in w for w in warnings)


@pytest.mark.slow
def test_cli_exits_2_without_pairs_unless_allowed(tmp_path, prefect_harness):
    rc = _comments_only(tmp_path / "in")
    refused = CliRunner().invoke(app, ["ingest", str(rc), "--workdir", str(tmp_path / "w")])
    assert refused.exit_code == 2
    assert "warning:" in refused.output and "RS_2006-01" in refused.output
    assert "--allow-empty" in refused.output.splitlines()[-1]
    allowed = CliRunner().invoke(app, ["ingest", str(rc), "--workdir", str(tmp_path / "w"), "--allow-empty"])
    assert allowed.exit_code == 0, allowed.output
    assert "RS_2006-01" in allowed.output
