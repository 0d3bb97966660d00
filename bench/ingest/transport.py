"""CPU of handing Arrow batches to another process: pickled on a pipe, or as IPC files in shared memory.

    .venv/bin/python bench/ingest/transport.py WORKDIR/data/ingest/<key>/pairs.parquet [--rounds 2]

Cuts the file's rows into whole batches of 20,000 rows (new buffers, as the builder's batches are), sends
them three times over to a receiving process the way :class:`alignflow.tasks.ingest.contract_service.
ContractService` does (a 1 MiB pipe; :class:`~alignflow.tasks.ingest.contract_service.SharedBatches`), the two
ways alternating, and prints the sender's CPU seconds and the receiver's (which include its imports).
"""

from __future__ import annotations

import argparse
import pickle
import resource
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from alignflow.tasks.ingest import contract_service as cs

RECEIVER = r"""
import pickle, resource, sys
from alignflow.tasks.ingest.contract_service import take_shared
rows = 0
while True:
    try:
        message = pickle.load(sys.stdin.buffer)
    except EOFError:
        break
    table = take_shared(message)
    rows += table.num_rows
    del table, message
ru = resource.getrusage(resource.RUSAGE_SELF)
print(rows, ru.ru_utime + ru.ru_stime)
"""


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def send(batches: list[pa.Table], shared: bool) -> tuple[float, float, float]:
    proc = subprocess.Popen([sys.executable, "-c", RECEIVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    cs._widen_pipe(proc.stdin)
    folder = cs.SharedBatches() if shared else None
    cpu, wall = _cpu(), time.perf_counter()
    for batch in batches:
        pickle.dump(folder.put(batch) if folder else batch, proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
        proc.stdin.flush()
    proc.stdin.close()
    out = proc.stdout.read().decode().split()
    proc.wait()
    sender, elapsed = _cpu() - cpu, time.perf_counter() - wall
    if folder:
        folder.close()
    if int(out[0]) != sum(b.num_rows for b in batches):
        raise SystemExit("the receiver did not get every row")
    return sender, float(out[1]), elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("parquet", type=Path)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    table = pq.read_table(args.parquet).combine_chunks()
    batches = [pa.concat_tables([table.slice(i, 10_000), table.slice(i + 10_000, 10_000)]).combine_chunks()
               for i in range(0, table.num_rows, 20_000)] * 3
    print(f"{len(batches)} batches, {sum(b.nbytes for b in batches) / 2**20:,.0f} MiB")
    for _ in range(args.rounds):
        for shared in (False, True):
            sender, receiver, wall = send(batches, shared)
            print(f"{'shared memory' if shared else 'pickled, pipe':>14}: sender {sender:.2f} CPU-s, "
                  f"receiver {receiver:.2f} CPU-s, wall {wall:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
