"""benchmarks/gpu_qlora_memory.py end to end on CPU at tiny size: it writes the record the GPU run will write."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_qlora_memory.py"
RESULTS = ROOT / "benchmarks" / "results"


def test_tiny_run_writes_record_with_planner_numbers(tmp_path: Path) -> None:
    before = sorted(RESULTS.iterdir()) if RESULTS.is_dir() else []
    env = {**os.environ, "TMPDIR": str(tmp_path), "TOKENIZERS_PARALLELISM": "false"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "datasets-cache"))
    out = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--recipe", "recipes/llama-2-13b/hh_rlhf_qlora.yaml", "--out-dir"]
    proc = subprocess.run([*cmd, str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    files = list(out.glob("*.json"))
    assert [f.name for f in files] == ["llama-2-13b-hh_rlhf_qlora-cpu.json"]
    res = json.loads(files[0].read_text())
    expected = {"recipe_id", "device", "launch", "settings", "timing", "train_loss", "memory_gib", "plan"}
    assert expected | {"comparison", "goal", "versions"} <= set(res)
    assert res["device"] == "cpu" and res["launch"] == "no sharding"
    s = res["settings"]
    assert (s["tiny"], s["steps"], s["pairs_per_device"], s["max_length"], s["tokens_per_step"]) == (
        True,
        2,
        1,
        64,
        128,
    )

    # timing: every optimizer step was timed
    t = res["timing"]
    assert len(t["step_times_s"]) == 2 and t["step_time_s"] > 0 and t["tokens_per_s"] > 0 and t["load_s"] > 0
    assert math.isfinite(res["train_loss"])

    # the planner's estimate is for the recipe's REAL shapes (13B) at the benchmark's settings
    p = res["plan"]
    assert 12e9 < p["params"]["causal_lm"] < 14e9
    assert p["tokens_per_micro_batch"] == 128 and p["fsdp"] is False and p["attention"] == s["attention"]
    assert {"weights", "activations", "trainable_grads_optimizer", "cuda_context_nccl"} <= set(p["memory_gb"])
    assert 0 < p["load_peak_gb"] < p["train_peak_gb"] and isinstance(p["fits"], bool)

    # no CUDA: planned numbers in every row, measured ones absent rather than made up
    rows = res["comparison"]
    assert [r["name"] for r in rows] == ["training peak allocated", "training peak device", "loading peak device"]
    assert all(r["planned_gib"] > 0 and r["measured_gib"] is None and r["rel_error"] is None for r in rows)
    assert res["memory_gib"] == {"oom": None}
    g = res["goal"]
    assert g["met"] is None and g["applies"] is False and g["planner_fits"] == p["fits"]

    assert "measured" in proc.stdout and "planned" in proc.stdout and "goal" in proc.stdout
    assert not list(tmp_path.glob("qrm-gpu-bench-work-*"))  # the random checkpoint is removed
    assert (sorted(RESULTS.iterdir()) if RESULTS.is_dir() else []) == before  # --tiny never writes results
