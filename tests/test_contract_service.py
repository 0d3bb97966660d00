"""The contract worker process: it checks a batch and writes its valid rows as the builder would.

With several ingest workers the builder hands each batch to the contract process and lets go of
it; that process writes the checked rows into the dataset's Parquet file. These tests run the real
worker process and compare what it writes with what the builder writes when it checks a batch
itself (one worker).
"""

from __future__ import annotations

import os
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignflow.data_contracts import validate
from alignflow.tasks.ingest import schema
from alignflow.tasks.ingest.build import CheckedWrite, dataset_writer, rejected_fields, write_valid
from alignflow.tasks.ingest.contract_service import ContractService


def pairs_table(n: int = 6) -> pa.Table:
    rows = [dict(pair_id=f"p{i}", prompt=f"Question {i}?", chosen=f"good answer {i}", rejected=f"bad answer {i}",
                 chosen_score=3.0, rejected_score=1.0, margin=2.0, question_id=str(i), site="s.stackexchange.com",
                 source="stackexchange", split="train", chosen_id=f"a{i}", rejected_id=f"b{i}",
                 chosen_author="user:1", rejected_author="user:2", license="CC BY-SA 4.0") for i in range(n)]
    return pa.Table.from_pylist(rows, schema=schema.SCHEMAS["pairs"])


@pytest.fixture(scope="module")
def service():
    svc = ContractService()  # one worker for the module: each test's batches and files are its own
    yield svc
    svc.close(kill=True)


def test_the_worker_writes_the_checked_rows_as_the_builder_would(service, tmp_path):
    table = pairs_table()
    table = table.set_column(table.column_names.index("rejected"), "rejected",
                             pa.array(["bad answer 0", "bad answer 1", "good answer 2", "bad answer 3",
                                       "bad answer 4", "bad answer 5"]))  # row 2: chosen == rejected
    sizes = [4, 2]
    remote = tmp_path / "remote.parquet"
    ticket = service.submit(table, "pairs", write=CheckedWrite(str(remote), sizes, False), with_json=False)
    result = service.result(ticket)
    assert service.result(service.close_file(str(remote), table.schema)) is None

    local = tmp_path / "local.parquet"
    here = validate(table.to_pandas(), "pairs", with_json=False)
    writer = dataset_writer(local, table.schema)
    written = write_valid(writer, table, here.valid.index.to_numpy(), sizes, False)
    writer.close()

    assert result.written == written == 5
    assert remote.read_bytes() == local.read_bytes()
    assert pq.ParquetFile(remote).metadata.num_row_groups == 2  # one per filled group
    assert result.rejected.index.tolist() == [2]
    assert result.rejected_fields == rejected_fields(table, [2], "pairs") == {
        2: {"id": "p2", "site": "s.stackexchange.com", "source": "stackexchange"}}


def test_a_batch_failing_a_table_rule_is_checked_but_not_written(service, tmp_path):
    table = pairs_table(4)
    table = table.set_column(0, "pair_id", pa.array(["p0", "p0", "p2", "p3"]))  # ids must be unique
    path = tmp_path / "pairs.parquet"
    result = service.result(service.submit(table, "pairs", write=CheckedWrite(str(path), [4], True), with_json=False))
    assert not result.passed and result.written == 0
    service.result(service.close_file(str(path), table.schema))
    assert pq.read_table(path).num_rows == 0 and pq.read_schema(path) == table.schema


def test_a_file_the_worker_cannot_write_fails_its_batch_with_the_reason(service, tmp_path):
    path = tmp_path / "no such folder" / "pairs.parquet"
    ticket = service.submit(pairs_table(3), "pairs", write=CheckedWrite(str(path), [3], True), with_json=False)
    with pytest.raises(OSError, match="no such folder|No such file"):
        service.result(ticket)
    # the worker goes on: a later batch with a writable file is checked and written
    ok = tmp_path / "pairs.parquet"
    assert service.result(service.submit(pairs_table(3), "pairs", write=CheckedWrite(str(ok), [3], True),
                                         with_json=False)).written == 3


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pipe buffer sizes are set with Linux's fcntl")
def test_batches_go_through_a_widened_pipe(service):
    # 8 MiB batches through Linux's default 64 KiB pipe cost about twice the CPU on both sides
    import fcntl

    from alignflow.tasks.ingest.contract_service import PIPE_BYTES

    limit = int(open("/proc/sys/fs/pipe-max-size").read())
    size = fcntl.fcntl(service.proc.stdin.fileno(), getattr(fcntl, "F_GETPIPE_SZ", 1032))
    if limit >= PIPE_BYTES:
        assert size == PIPE_BYTES
    else:  # the system allows less: the default buffer stays
        assert size >= 1 << 16


def test_data_docs_are_written_after_the_verdict_and_before_close_returns(tmp_path):
    """A first batch's Data Docs are written by the worker when it has nothing else to do: the verdict comes
    back first, with where the docs will be; once close() returns they are there, the same pages as the
    docs validate() writes itself; a failure to write them is raised by close()."""
    svc = ContractService()
    try:
        result = svc.result(svc.submit(pairs_table(), "pairs", docs_dir=tmp_path / "docs" / "pairs",
                                       batch_name="pairs-00000", with_json=False))
        later = svc.result(svc.submit(pairs_table(3), "pairs", with_json=False))
    finally:
        svc.close()
    here = validate(pairs_table().to_pandas(), "pairs", docs_dir=tmp_path / "here", batch_name="pairs-00000")
    assert result.passed and later.passed and result.docs_index is not None
    assert result.docs_index == tmp_path / "docs" / "pairs" / "gx" / "uncommitted" / "data_docs" / "local_site" \
        / "index.html"
    assert result.docs_index.is_file()
    pages = sorted(p.relative_to(result.docs_index.parent).parts[:2]
                   for p in result.docs_index.parent.rglob("*.html"))
    assert pages == sorted(p.relative_to(here.docs_index.parent).parts[:2]
                           for p in here.docs_index.parent.rglob("*.html"))

    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the docs folder should be")
    svc = ContractService()
    try:
        assert svc.result(svc.submit(pairs_table(), "pairs", docs_dir=blocked / "pairs", with_json=False)).passed
        with pytest.raises(OSError):
            svc.close()
    finally:
        svc.close(kill=True)


def test_batches_go_through_shared_memory_and_leave_nothing_there(tmp_path):
    """A batch is handed over as an Arrow IPC file in the service's shared-memory folder, which the worker
    unlinks once mapped; the verdict is the one a pickled batch gets, and close() removes the folder."""
    root = tmp_path / "shm"
    root.mkdir()
    svc = ContractService(shared_root=str(root))
    seen = []
    put = svc.shared.put
    svc.shared.put = lambda table: seen.append(put(table)) or seen[-1]
    try:
        table = pairs_table(50)
        table = table.set_column(table.column_names.index("rejected"), "rejected",
                                 pa.array([f"bad answer {i}" if i != 7 else "good answer 7" for i in range(50)]))
        result = svc.result(svc.submit(table, "pairs", with_json=False))
        assert len(seen) == 1 and seen[0][0] == "shared" and seen[0][1].startswith(str(root))
        assert not (root / seen[0][1]).exists()  # unlinked by the worker once mapped
        here = validate(table.to_pandas(), "pairs", with_json=False)
        assert result.passed == here.passed and result.valid.index.tolist() == here.valid.index.tolist()
        assert result.rejected.index.tolist() == here.rejected.index.tolist() == [7]
        assert {k: v for k, v in result.statistics.items() if not k.startswith("seconds")} == \
            {k: v for k, v in here.statistics.items() if not k.startswith("seconds")}
    finally:
        svc.close()
    assert list(root.iterdir()) == []


def test_without_shared_memory_batches_go_on_the_pipe(tmp_path):
    from alignflow.tasks.ingest.contract_service import SharedBatches

    missing = SharedBatches(str(tmp_path / "no such folder"))
    assert missing.dir is None
    table = pairs_table(3)
    assert missing.put(table) is table  # pickled on the pipe, as it is

    full = SharedBatches(str(tmp_path))
    (tmp_path / "gone").mkdir()
    full.dir = str(tmp_path / "gone" / "sub")  # a write that fails (as a full tmpfs would) falls back too
    assert full.put(table) is table
    assert not any((tmp_path / "gone").iterdir())


def test_folders_of_dead_services_are_removed_and_a_dying_builder_leaves_none(tmp_path):
    import subprocess

    from alignflow.tasks.ingest.contract_service import SharedBatches

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    abandoned = tmp_path / f"alignflow-batches-{dead.pid}-x1"
    recent = tmp_path / f"alignflow-batches-{dead.pid}-x2"  # maybe a process this one cannot see: kept a while
    live = tmp_path / f"alignflow-batches-{os.getppid()}-x3"
    for folder in (abandoned, recent, live):
        folder.mkdir()
        (folder / "0.arrow").write_bytes(b"a batch")
    for folder in (abandoned, live):
        os.utime(folder, (time.time() - 2 * 3600,) * 2)
    other = tmp_path / "alignflow-batches-notapid"
    other.mkdir()
    mine = SharedBatches(str(tmp_path))
    assert not abandoned.exists() and recent.exists() and live.exists() and other.exists()
    assert mine.dir is not None
    assert mine.dir.startswith(str(tmp_path / f"alignflow-batches-{os.getpid()}-"))
    mine.close()

    # the builder dies with a batch file the worker never took: the worker removes the folder at end of input
    builder = subprocess.run([sys.executable, "-c", DIES_WITH_A_BATCH, str(tmp_path)], capture_output=True,
                             text=True, timeout=120)
    assert builder.returncode == 0, builder.stderr
    folder = builder.stdout.split()[0]
    for _ in range(600):
        if not os.path.exists(folder):
            break
        time.sleep(0.1)
    assert not os.path.exists(folder)


DIES_WITH_A_BATCH = r"""
import os, sys
from alignflow.tasks.ingest import contract_service
from tests.test_contract_service import pairs_table
svc = contract_service.ContractService(shared_root=sys.argv[1])
svc.result(svc.submit(pairs_table(3), "pairs", with_json=False))
svc.shared.put(pairs_table(3))  # written, never sent
print(svc.shared.dir, svc.proc.pid, flush=True)
os._exit(0)  # no close(): the worker sees the end of its input
"""


def test_a_message_already_in_the_readers_buffer_counts_as_waiting():
    """The contract worker writes Data Docs only while no batch waits: a batch whose bytes the reader took in
    with the message before (the pipe empty, the buffer not) waits too. ``select`` alone saw only the pipe."""
    import io
    import pickle

    from alignflow.tasks.ingest.contract_service import _input_waiting

    r, w = os.pipe()
    stream = io.open(r, "rb", buffering=1 << 16)
    try:
        assert not _input_waiting(stream)  # nothing sent: and the check does not block
        os.write(w, pickle.dumps(("check", 1)) + pickle.dumps(("check", 2)))
        assert _input_waiting(stream)
        assert pickle.load(stream) == ("check", 1)  # the buffered reader took both messages off the pipe
        assert _input_waiting(stream)  # the second waits in the buffer
        assert pickle.load(stream) == ("check", 2)
        assert not _input_waiting(stream)
        assert os.get_blocking(r)  # left as the worker's reads need it
        os.close(w)
        assert _input_waiting(stream)  # the end of input is for the reader to see
    finally:
        stream.close()


def test_a_prestarted_worker_yields_the_cores_until_a_service_adopts_it(monkeypatch):
    """While the command starts up, the worker loading its libraries runs at PRESTART_NICE (where its priority
    can be given back); the service that adopts it gives it this process's priority before any batch."""
    from alignflow.tasks.ingest import contract_service
    from alignflow.tasks.processes import may_raise_priority

    monkeypatch.setattr(contract_service, "_PRESTARTED", [])
    own = os.getpriority(os.PRIO_PROCESS, 0)
    contract_service.prestart()
    (proc,) = contract_service._PRESTARTED
    yielding = os.getpriority(os.PRIO_PROCESS, proc.pid)
    assert yielding == (max(own, contract_service.PRESTART_NICE) if may_raise_priority() else own)
    service = ContractService()
    try:
        assert service.proc is proc  # adopted, not started again
        assert os.getpriority(os.PRIO_PROCESS, proc.pid) == own
        assert not contract_service._YIELDING
    finally:
        service.close()


def test_without_the_right_to_raise_it_back_a_prestarted_worker_keeps_this_priority(monkeypatch):
    from alignflow.tasks.ingest import contract_service

    monkeypatch.setattr(contract_service, "_PRESTARTED", [])
    monkeypatch.setattr(contract_service, "may_raise_priority", lambda: False)
    own = os.getpriority(os.PRIO_PROCESS, 0)
    contract_service.prestart()
    (proc,) = contract_service._PRESTARTED
    try:
        assert os.getpriority(os.PRIO_PROCESS, proc.pid) == own
        assert proc.pid not in contract_service._YIELDING
    finally:
        contract_service._stop_prestarted()


def test_whether_a_priority_can_be_raised_back_follows_rlimit_nice_then_cap_sys_nice(monkeypatch, tmp_path):
    import resource

    from alignflow.tasks import processes

    own = os.getpriority(os.PRIO_PROCESS, 0)
    monkeypatch.setattr(resource, "getrlimit", lambda which: (20 - own, 20 - own))
    assert processes.may_raise_priority()  # the limit reaches this process's own nice value
    monkeypatch.setattr(resource, "getrlimit", lambda which: (0, 0))  # the default limit: no lowering at all
    status = tmp_path / "status"
    real_open = open

    def fake_open(path, *args, **kwargs):
        return real_open(status if path == "/proc/self/status" else path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", fake_open)
    status.write_text("Name:\tpython\nCapEff:\t0000000000800000\n")  # CAP_SYS_NICE (bit 23) alone
    assert processes.may_raise_priority()
    status.write_text("Name:\tpython\nCapEff:\t00000000a80425fb\n")  # a container's root: no CAP_SYS_NICE
    assert not processes.may_raise_priority()


def test_a_batch_the_builder_keeps_becomes_the_shared_memory_file_the_worker_reads(tmp_path):
    """A KeptBatch (a dataset the builder writes itself) is the builder's table until the sender has written
    it to shared memory; then it is a mapping of that file, equal to the table and holding none of its
    buffers, and it stays readable after the worker has unlinked the file. Without shared memory it stays the
    builder's table."""
    from alignflow.tasks.ingest.contract_service import KeptBatch, kept_table

    root = tmp_path / "shm"
    root.mkdir()
    table = pairs_table(40)
    svc = ContractService(shared_root=str(root))
    try:
        kept = KeptBatch(table)
        result = svc.result(svc.submit(kept, "pairs", with_json=False))
        assert result.passed and len(result.valid) == 40
        mapped = kept_table(kept)
        assert mapped is not table and mapped.equals(table)
        original = {b.address for c in table.columns for chunk in c.chunks for b in chunk.buffers() if b}
        shared = {b.address for c in mapped.columns for chunk in c.chunks for b in chunk.buffers() if b}
        assert not original & shared, "the kept batch still holds the builder's buffers"
        assert [list(folder.iterdir()) for folder in root.iterdir()] == [[]]  # the worker unlinked the file
    finally:
        svc.close()
    assert kept_table(kept).to_pylist() == table.to_pylist()

    svc = ContractService(shared_root=str(tmp_path / "no such folder"))
    try:
        kept = KeptBatch(table)
        assert svc.result(svc.submit(kept, "pairs", with_json=False)).passed
        assert kept_table(kept) is table
    finally:
        svc.close()
    assert kept_table(table) is table
