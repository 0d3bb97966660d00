"""bench/gpu/run.sh in its CPU tiny mode: every row is produced and the table comes last."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_bench_tiny_mode_runs_on_cpu(tmp_path):
    out = tmp_path / "gpu-bench-tiny.json"
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("OUT", None)
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu" / "run.sh"), "--tiny", "--no-peers", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["tiny"] and result["device_type"] == "cpu" and result["matmul_bf16_tflops"] > 0
    rows = {(r["stage"], r.get("model"), r["side"].split(" ")[0]): r for r in result["rows"]}
    for arch in ("tiny-gpt2", "tiny-llama"):
        sft, reward = rows[("sft", arch, "alignflow")], rows[("reward", arch, "alignflow")]
        assert sft["tokens_per_s"] > 0 and sft["tflops"] > 0 and 0 < sft["mfu_vs_matmul"]
        assert reward["pairs_per_s"] > 0 and reward["peak_mib"] > 0
        assert "not run" in rows[("sft", arch, "TRL")]["note"]
    assert rows[("generate", "tiny-gpt2", "alignflow")]["gen_tokens_per_s"] > 0
    ppo = rows[("ppo", "tiny-gpt2", "alignflow")]
    assert ppo.get("episodes_per_s", 0) > 0 or "not measured" in ppo.get("note", "")
    last = proc.stdout.strip().splitlines()
    assert last[-1].startswith("ppo") and any(line.startswith("stage") for line in last[-16:])
