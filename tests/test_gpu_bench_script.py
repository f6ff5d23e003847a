"""benchmarks/gpu_qlora_memory.py end to end on CPU at tiny size: it writes the record the GPU run will write."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
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
    proc = subprocess.run([*cmd, str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
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


def test_gpu_check_dry_run_exercises_every_step(tmp_path: Path) -> None:
    """benchmarks/gpu/run.sh --dry-run: memory, parity, the FSDP accelerate launch and the summary, on CPU."""
    out = tmp_path / "results"
    env = {**os.environ, "TMPDIR": str(tmp_path), "QRM_GPU_OUT": str(out), "OMP_NUM_THREADS": "1"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "datasets-cache"))
    started = time.time()
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu" / "run.sh"), "--dry-run"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "gpu-check-cpu.json",
        "gpu-parity-cpu.json",
        "llama-3.1-8b-hh_rlhf_fsdp-cpu.json",
        "llama-3.1-8b-hh_rlhf_qlora-cpu.json",
    ], names
    summary = json.loads((out / "gpu-check-cpu.json").read_text())
    assert [(s["step"], s["status"]) for s in summary["steps"]] == [("memory+parity", "ok"), ("fsdp", "ok")]
    runs = summary["runs"]
    assert runs["llama-3.1-8b-hh_rlhf_qlora-cpu.json"]["launch"] == "no sharding"
    # The FSDP config was launched through accelerate; on CPU accelerate runs it unsharded, and qrm says so once.
    assert runs["llama-3.1-8b-hh_rlhf_fsdp-cpu.json"]["launch"] == "no sharding"
    warned = [line for line in (proc.stdout + proc.stderr).splitlines() if "running as one unsharded process" in line]
    assert len(warned) == 1, warned
    for run in runs.values():
        assert math.isfinite(run["train_loss"]) and run["flops_per_token"] > 1e9  # 8B shapes: ~2e10 FLOPs/token
        assert run["mfu"] is None and run["memory_vs_plan"][0]["planned_gib"] > 0  # no CUDA, no made-up numbers
    parity = summary["parity"]
    p, v = parity["packed_prefix_shared_vs_trl_padded"], parity["varlen_packing_vs_trl_padded"]
    assert p["reward_rel_diff"] < 1e-5 and p["grad_max_rel_diff"] < 1e-4 and p["grad_tensors"] > 10
    assert p["packed_tokens"] < p["padded_tokens"] and p["speedup"] > 0
    assert v["ran"] is False and v["why_not"] == "no CUDA (dry run)" and v["reward_rel_diff"] < 1e-5
    # a dry run never writes benchmarks/results (other files may appear there meanwhile: other benchmarks)
    assert not [n for n in names if (RESULTS / n).exists() and (RESULTS / n).stat().st_mtime >= started]
