"""The Reddit reply walk on a process of its own (tasks/ingest/reply_walker.py): the builder gets the same calls
as from the walk on its own process, the walk's errors and death reach the builder, and it stops with the build."""

from __future__ import annotations

import os
import pickle
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from alignflow.config import load_config
from alignflow.tasks.ingest.reddit_replies import Node, ReplyStore, Submission, write_reply_pairs
from alignflow.tasks.ingest.reply_walker import ReplyWalker, read_record, write_record
from alignflow.tasks.ingest.scoring import configured_split
from flowkit import kill_child_when_seen

CFG = load_config(None, ["ingest.reddit_reply_pairs=true"]).ingest


def comment(cid, parent, score, t, author, link):
    return Node(cid, parent, link, "reddit/test", f"body of {cid}", score, float(t), author, False, "cc-by",
                "RC_test", None)


def make_store(path: Path, parents: int = 150) -> Path:
    """``parents`` top-level comments in 30 threads, each with replies that pair (scores far apart, the better
    one written later), one that does not (a lone reply) and a repeated reply id now and then."""
    store = ReplyStore(path)
    for thread in range(30):
        store.add_submission(Submission(f"s{thread}", "reddit/test", f"title {thread}", "", 40, "name:op"))
    for k in range(parents):
        link = f"s{k % 30}"
        top = f"t{k}"
        store.add_comment(comment(top, f"t3_{link}", 5, 10, "name:top", link), reply=False)
        store.add_comment(comment(f"a{k}", f"t1_{top}", 2, 20, "name:a", link), reply=True)
        store.add_comment(comment(f"b{k}", f"t1_{top}", 30 + k, 30, "name:b", link), reply=True)
        if k % 3 == 0:
            store.add_comment(comment(f"c{k}", f"t1_a{k}", 9, 40, "name:c", link), reply=True)  # a lone reply
        if k % 7 == 0:
            store.add_comment(comment(f"b{k}", f"t1_{top}", 30 + k, 30, "name:b", link), reply=True)  # repeated
    store.close()
    return path


class Recorder:
    """A dataset writer that records what it is given."""

    def __init__(self, name: str, log: list) -> None:
        self.name, self.log = name, log

    def add(self, row: dict) -> None:
        self.log.append((self.name, "add", row))

    def maybe_flush(self) -> None:
        self.log.append((self.name, "maybe_flush"))


class FakeStore:
    def __init__(self) -> None:
        self.counts: Counter = Counter()

    def count(self, source_file: str, key: str, n: int = 1) -> None:
        self.counts[(source_file, key)] += n


class FakeSummary:
    def __init__(self) -> None:
        self.pair_stats: Counter = Counter()


class FakeBuilder:
    """What the reply walk touches of a :class:`Builder`: writers, the store's counts, the report's pair stats."""

    def __init__(self) -> None:
        self.log: list = []
        self.writers = {name: Recorder(name, self.log) for name in ("posts", "pairs", "demos", "prompts")}
        self.store = FakeStore()
        self.summary = FakeSummary()

    def split_of(self, site: str, question_id: str) -> str:
        return configured_split(CFG.split, site, question_id)


def walked_here(path: Path) -> FakeBuilder:
    builder = FakeBuilder()
    store = ReplyStore(path, create=False)
    try:
        write_reply_pairs(store, builder, CFG)
    finally:
        store.db.close()
    return builder


def test_the_walker_hands_the_builder_the_same_calls_in_the_same_order(tmp_path):
    here = walked_here(make_store(tmp_path / "here.sqlite"))
    builder = FakeBuilder()
    walker = ReplyWalker(make_store(tmp_path / "there.sqlite"), CFG, tmp_path / "spool", groups_per_record=7)
    try:
        walker.replay(builder)
    finally:
        walker.close()
    adds = [entry for entry in here.log if entry[1] == "add"]
    assert len([a for a in adds if a[0] == "prompts"]) == 150 and len([a for a in adds if a[0] == "pairs"]) == 150
    assert builder.log == here.log  # rows, their order and every maybe_flush between them
    assert builder.store.counts == here.store.counts and builder.store.counts[("RC_test", "kept:reply")] == 300
    assert builder.store.counts[("RC_test", "skipped:reply_duplicate")] == 22
    assert builder.summary.pair_stats == here.summary.pair_stats
    assert list(builder.summary.pair_stats) == list(here.summary.pair_stats)  # the report's key order too
    assert not (tmp_path / "spool").exists() and not (tmp_path / "spool.partial").exists()


def test_records_are_read_as_they_come_and_a_half_written_one_never(tmp_path):
    path = tmp_path / "spool"
    with open(path, "ab") as out:
        write_record(out, ("groups", [1, 2]))
    alive = threading.Event()
    alive.set()
    with open(path, "rb", buffering=0) as spool:
        assert read_record(spool, alive.is_set) == ("groups", [1, 2])
        data = pickle.dumps(("done", "x"), protocol=pickle.HIGHEST_PROTOCOL)
        with open(path, "ab") as out:
            out.write(len(data).to_bytes(8, "little") + data[:5])  # the writer is in the middle of a record
            out.flush()

            def finish():
                time.sleep(0.2)
                out.write(data[5:])
                out.flush()

            writer = threading.Thread(target=finish)
            writer.start()
            assert read_record(spool, alive.is_set) == ("done", "x")  # waited for the record's last byte
            writer.join()
        with open(path, "ab") as out:
            out.write(len(data).to_bytes(8, "little") + data[:5])  # and then the writer died
        alive.clear()
        assert read_record(spool, alive.is_set) is None


def test_an_error_in_the_walk_is_raised_in_the_builder(tmp_path):
    path = make_store(tmp_path / "broken.sqlite", parents=3)
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE comments")
    walker = ReplyWalker(path, CFG, tmp_path / "spool")
    with pytest.raises(sqlite3.OperationalError, match="comments"):
        walker.replay(FakeBuilder())
    walker.close()
    assert not (tmp_path / "spool").exists()


def test_a_walker_that_dies_is_an_error_naming_its_exit_status(tmp_path):
    walker = ReplyWalker(make_store(tmp_path / "r.sqlite"), CFG, tmp_path / "spool")
    walker.proc.kill()
    builder = FakeBuilder()
    with pytest.raises(RuntimeError, match=r"reply walk's process ended without finishing \(exit status -9\)"):
        walker.replay(builder)
    assert builder.log == [] and not builder.store.counts  # nothing half-added
    walker.close()


def test_a_walker_that_dies_before_it_reads_its_work_is_the_same_error(tmp_path, monkeypatch):
    # a walker killed as soon as it starts (the whole-ingest kill test's race) breaks the pipe its work goes through
    import subprocess

    from alignflow.tasks.ingest import reply_walker

    popen = subprocess.Popen

    def dead_on_arrival(cmd, **kwargs):
        proc = popen([cmd[0], "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"], **kwargs)
        proc.wait()  # gone before the work is written
        return proc

    monkeypatch.setattr(reply_walker.subprocess, "Popen", dead_on_arrival)
    with pytest.raises(RuntimeError, match=r"reply walk's process ended without finishing \(exit status -9\)"):
        ReplyWalker(make_store(tmp_path / "r.sqlite"), CFG, tmp_path / "spool")
    assert not (tmp_path / "spool").exists()


def test_the_walk_stops_when_the_build_that_started_it_is_gone(tmp_path):
    # a walker told another pid than its parent's sees "its" builder gone at its first check (64 parents in)
    walker = ReplyWalker(make_store(tmp_path / "r.sqlite"), CFG, tmp_path / "spool", builder_pid=os.getpid() + 10**6)
    with pytest.raises(RuntimeError, match="the build that started the Reddit reply walk .* is gone"):
        walker.replay(FakeBuilder())
    walker.close()


def test_close_stops_a_running_walker_and_removes_its_spool(tmp_path):
    walker = ReplyWalker(make_store(tmp_path / "r.sqlite", parents=3), CFG, tmp_path / "spool")
    walker.close()
    assert walker.proc.returncode is not None and not (tmp_path / "spool").exists()
    walker.close()  # twice is fine


def test_lower_priority_raises_a_childs_nice_value_and_never_lowers_it():
    import subprocess
    import sys

    from alignflow.tasks.processes import lower_priority

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        start = os.getpriority(os.PRIO_PROCESS, child.pid)
        assert lower_priority(child.pid, start + 5) and os.getpriority(os.PRIO_PROCESS, child.pid) == start + 5
        assert lower_priority(child.pid, start + 1)  # asking for less leaves it where it is
        assert os.getpriority(os.PRIO_PROCESS, child.pid) == start + 5
    finally:
        child.kill()
        child.wait()
    assert lower_priority(child.pid, start + 5) is False  # gone: nothing to do, no error


# --------------------------------------------------------------------------- through ingest


def _ingest(month, work: Path, workers: int):
    from alignflow.tasks.ingest.run import execute_ingest, plan_ingest

    cfg = load_config(None, ["ingest.reddit_reply_pairs=true", f"ingest.workers={workers}"]).ingest
    return execute_ingest(plan_ingest([str(month.rs), str(month.rc)], work, cfg), cfg)


def test_a_killed_walker_fails_the_ingest_and_leaves_nothing_a_rerun_trusts(tmp_path):
    import threading

    from alignflow.tasks.ingest.synthetic_reddit import generate_month

    month = generate_month(tmp_path / "month", rc_bytes=400_000, seed=11)
    reference = {k: v["digest"] for k, v in _ingest(month, tmp_path / "one", workers=1).datasets.items()}
    killed: list[int] = []
    work = tmp_path / "two"
    killer = threading.Thread(target=kill_child_when_seen, args=("reply_walker import serve", killed),
                              kwargs={"timeout": 120, "poll": 0.01})
    killer.start()
    with pytest.raises(RuntimeError, match="reply walk's process ended without finishing"):
        _ingest(month, work, workers=2)
    killer.join()
    assert killed
    base = work / "data" / "ingest"
    assert [p.name for p in base.iterdir()] == []  # no dataset folder, no temporary folder left
    rerun = _ingest(month, work, workers=2)
    assert {k: v["digest"] for k, v in rerun.datasets.items()} == reference
    assert rerun.report["pairs"]["reply:kept"] > 0
