"""bench/run_all.py's report: a stage run alone refreshes its row and keeps the others, each row dated."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run_all():
    spec = importlib.util.spec_from_file_location("bench_run_all", REPO / "bench" / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(stage: str, ours: float, **extra) -> dict:
    return {"stage": stage, "status": "ok", "command": f"bench/{stage}", "seconds": 10.0, "unit": "u",
            "peer": "p", "ours": ours, "peer_value": 1.0, "ratio": ours, "target": 0.3, "target_met": ours >= 0.3,
            "ours_peak_mib": 900, "peer_peak_mib": 20, "versions": None,
            "detail": {"final_loss": [1.0, 1.0]} if stage in ("base", "sft", "reward") else {}, **extra}


PREVIOUS = {"when": "2026-11-27T00:55:20Z", "quick": True,
            "stages": [_row("ingest", 0.01), _row("sft", 1.29), _row("not-a-stage", 9.0)]}


def test_a_stage_run_alone_replaces_its_row_and_keeps_the_others_with_their_dates():
    run_all = _run_all()
    rows = run_all.merge_rows([_row("ingest", 0.25)], PREVIOUS, "2026-12-04T12:00:00Z", quick=False)
    assert [r["stage"] for r in rows] == ["ingest", "sft"]  # stage order; an unknown stage is not carried
    ingest, sft = rows
    assert ingest["ours"] == 0.25 and ingest["when"].startswith("2026-12-04") and ingest["quick"] is False
    assert not ingest.get("carried")
    assert sft["ours"] == 1.29 and sft["carried"] and sft["when"] == PREVIOUS["when"] and sft["quick"] is True


def test_a_carried_row_keeps_its_own_date_over_its_report_date():
    run_all = _run_all()
    previous = {"when": "2026-11-30T00:00:00Z", "quick": False,
                "stages": [_row("sft", 1.3, when="2026-11-20T00:00:00Z", quick=True)]}
    (sft,) = run_all.merge_rows([], previous, "2026-12-04T12:00:00Z", quick=False)
    assert sft["when"] == "2026-11-20T00:00:00Z" and sft["quick"] is True


def test_the_markdown_says_when_and_how_each_row_was_measured_and_what_was_carried():
    run_all = _run_all()
    rows = run_all.merge_rows([_row("ingest", 0.25)], PREVIOUS, "2026-12-04T12:00:00Z", quick=False)
    report = {"when": "2026-12-04T12:00:00Z", "quick": False, "threads": None, "versions": {},
              "machine": {"cpu_count": 2, "cpu_model": "cpu", "memory_gib": 24, "python": "3.11", "load_avg": []},
              "stages": rows}
    text = run_all.markdown(report)
    lines = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert "| 2026-12-04 full |" in lines["ingest"] and "0.25×" in lines["ingest"]
    assert "| 2026-11-27 quick |" in lines["sft"]
    assert "kept from earlier runs (their dates above): sft." in text


def test_no_previous_report_or_an_unreadable_one_carries_nothing(tmp_path):
    run_all = _run_all()
    assert run_all.load_previous(tmp_path / "missing.json") is None
    broken = tmp_path / "report.json"
    broken.write_text("{not json")
    assert run_all.load_previous(broken) is None
    broken.write_text(json.dumps(PREVIOUS))
    assert run_all.load_previous(broken)["when"] == PREVIOUS["when"]
    assert run_all.merge_rows([_row("ingest", 0.3)], None, "2026-12-04T12:00:00Z", quick=True)[0]["quick"] is True


def test_the_ingest_line_gives_the_ceiling_of_most_workers_against_one_when_the_bench_measured_it():
    run_all = _run_all()
    detail = {"ratio_most_over_one_worker": 1.42, "ratio_most_over_one_worker_ceiling": 1.57, "cores": 2,
              "peak_rss_target_mib": 1024,
              "by_workers": {"1": {"mib_per_s": 27.8, "peak_rss_mib": 682, "cpu_seconds": 43.7},
                             "2": {"mib_per_s": 39.6, "peak_rss_mib": 938, "cpu_seconds": 47.0}}}
    machine = {"cpu_count": 2, "cpu_model": "cpu", "memory_gib": 24, "python": "3.11", "load_avg": []}

    def ingest_line(detail: dict) -> str:
        rows = run_all.merge_rows([_row("ingest", 0.31, detail=detail)], None, "2026-12-05T14:00:00Z", quick=False)
        text = run_all.markdown({"when": "2026-12-05T14:00:00Z", "quick": False, "threads": None, "versions": {},
                                 "machine": machine, "stages": rows})
        (line,) = [line for line in text.splitlines() if line.startswith("- ingest:")]
        return line

    line = ingest_line(detail)
    assert "most / one worker 1.42× (target 1.7×; at most 1.57× on 2 cores" in line
    assert "1 worker(s) 43.7 CPU-s, 2 worker(s) 47.0 CPU-s" in line
    # a result from before the bench measured CPU: no bound is made up
    line = ingest_line({k: v for k, v in detail.items() if k != "ratio_most_over_one_worker_ceiling"})
    assert "at most" not in line and "(target 1.7×)" in line
