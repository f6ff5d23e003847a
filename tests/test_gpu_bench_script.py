"""benchmarks/gpu_qlora_memory.py end to end on CPU at tiny size: it writes the record the GPU run will write."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

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
    assert res["memory_gib"] == {"oom": None, "sharding": None}  # sharding facts only under FSDP
    g = res["goal"]
    assert g["met"] is None and g["applies"] is False and g["planner_fits"] == p["fits"]

    assert "measured" in proc.stdout and "planned" in proc.stdout and "goal" in proc.stdout
    assert not list(tmp_path.glob("qrm-gpu-bench-work-*"))  # the random checkpoint is removed
    assert (sorted(RESULTS.iterdir()) if RESULTS.is_dir() else []) == before  # --tiny never writes results


def _run_sh(tmp_path: Path, timeout: int = 400, **extra: str) -> tuple[subprocess.CompletedProcess, Path]:
    """benchmarks/gpu/run.sh --dry-run with results in tmp_path/results and `extra` in its environment."""
    out = tmp_path / "results"
    env = {**os.environ, "TMPDIR": str(tmp_path), "QRM_GPU_OUT": str(out), "OMP_NUM_THREADS": "1", **extra}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "datasets-cache"))
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu" / "run.sh"), "--dry-run"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    return proc, out


def test_gpu_check_dry_run_exercises_every_step(tmp_path: Path) -> None:
    """benchmarks/gpu/run.sh --dry-run: preflight, memory, parity, the FSDP accelerate launch (accelerate's own FSDP2
    preparation on an emulated GPU process), serve and the summary, on CPU."""
    started = time.time()
    proc, out = _run_sh(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    names = sorted(p.name for p in out.iterdir())
    assert names[:4] == [
        "gpu-check-cpu.json",
        "gpu-parity-cpu.json",
        "llama-3.1-8b-hh_rlhf_fsdp-cpu.json",
        "llama-3.1-8b-hh_rlhf_qlora-cpu.json",
    ], names
    assert len(names) == 5 and names[4].startswith("serve_cpu-"), names  # no step-file or preflight left behind
    summary = json.loads((out / "gpu-check-cpu.json").read_text())
    steps = [(s["step"], s["status"]) for s in summary["steps"]]
    assert steps == [("preflight", "ok"), ("memory+parity", "ok"), ("fsdp", "ok"), ("serve", "ok")], steps
    assert summary["stopped_at"] is None and summary["preflight"]["problems"] == []
    assert summary["preflight"]["cuda"] is False and summary["preflight"]["versions"]["bitsandbytes"]
    runs = summary["runs"]
    assert runs["llama-3.1-8b-hh_rlhf_qlora-cpu.json"]["launch"] == "no sharding"
    # The FSDP config ran through accelerate launch and accelerate's FSDP2 plugin: every 4-bit weight a bf16 DTensor
    fsdp = runs["llama-3.1-8b-hh_rlhf_fsdp-cpu.json"]
    assert fsdp["launch"] == "FSDP2", fsdp
    sh = fsdp["sharding"]
    assert sh["fsdp_units"] >= 3 and sh["quantized_weights"] > 10, sh
    assert sh["quantized_weights_sharded"] == sh["quantized_weights"] and sh["quantized_storage_dtypes"] == ["bfloat16"]
    assert sh["trainable_dtypes"] == ["bfloat16"]  # accelerate keeps a Params4bit model's trainables as loaded
    for run in runs.values():
        assert math.isfinite(run["train_loss"]) and run["flops_per_token"] > 1e9  # 8B shapes: ~2e10 FLOPs/token
        assert run["mfu"] is None and run["memory_vs_plan"][0]["planned_gib"] > 0  # no CUDA, no made-up numbers
    parity = summary["parity"]
    p, v = parity["packed_prefix_shared_vs_trl_padded"], parity["varlen_packing_vs_trl_padded"]
    assert p["reward_rel_diff"] < 1e-5 and p["grad_max_rel_diff"] < 1e-4 and p["grad_tensors"] > 10
    assert p["packed_tokens"] < p["padded_tokens"] and p["speedup"] > 0
    assert v["ran"] is False and v["why_not"] == "no CUDA (dry run)" and v["reward_rel_diff"] < 1e-5
    assert parity["inference_vs_training_4bit_path"]["sequences"] == 4
    serve = summary["serve"]["summary"]
    assert serve["max_abs_reward_delta"] < 1e-5 and serve["texts_per_s"]["ratio"] > 0
    assert "run.sh: STOPPED" not in proc.stderr
    # a dry run never writes benchmarks/results (other files may appear there meanwhile: other benchmarks)
    assert not [n for n in names if (RESULTS / n).exists() and (RESULTS / n).stat().st_mtime >= started]


def _dummy_wheel(folder: Path) -> Path:
    """A minimal pure-Python wheel (module `qrm_dummy_wheel`), so the install branch runs offline in seconds."""
    import zipfile

    folder.mkdir()
    dist = "qrm_dummy_wheel-0.1.dist-info"
    files = {
        "qrm_dummy_wheel.py": "VALUE = 1\n",
        f"{dist}/METADATA": "Metadata-Version: 2.1\nName: qrm-dummy-wheel\nVersion: 0.1\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{dist}/RECORD"] = "".join(f"{n},,\n" for n in files) + f"{dist}/RECORD,,\n"
    path = folder / "qrm_dummy_wheel-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return path


def test_gpu_check_stops_at_first_failure_and_still_summarizes(tmp_path: Path) -> None:
    """A failing step stops the run with one line naming it and the steps not run; the summary is still written.
    Also the install branch (wheels into a --target dir on PYTHONPATH) and the timeout branch."""
    _dummy_wheel(tmp_path / "wheels")
    site = tmp_path / "site"
    proc, out = _run_sh(
        tmp_path, timeout=120, QRM_GPU_FAIL_AT="preflight", QRM_GPU_PRETEND_MISSING="1",
        QRM_GPU_WHEELS=str(tmp_path / "wheels"), QRM_GPU_SITE=str(site),
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (site / "qrm_dummy_wheel.py").is_file()  # the install branch ran
    stopped = [line for line in proc.stderr.splitlines() if line.startswith("run.sh: STOPPED")]
    assert stopped == ["run.sh: STOPPED at step preflight (exit 1); not run: memory+parity fsdp serve"], stopped
    summary = json.loads((out / "gpu-check-cpu.json").read_text())
    assert [(s["step"], s["status"]) for s in summary["steps"]] == [
        ("preflight", "failed (exit 1)"), ("memory+parity", "not run"), ("fsdp", "not run"), ("serve", "not run"),
    ]  # fmt: skip
    assert summary["stopped_at"] == "preflight" and "STOPPED at step preflight" in proc.stdout
    assert not (out / ".gpu-check-steps.tsv").exists()

    # a step that runs out of its time; and no wheels where the install branch needs them (setup, exit 2)
    (tmp_path / "t").mkdir()
    proc, out = _run_sh(tmp_path / "t", timeout=60, QRM_GPU_FAIL_AT="preflight:timeout")
    assert proc.returncode == 1 and "STOPPED at step preflight (ran out of its 1 s)" in proc.stderr, proc.stderr
    summary = json.loads((out / "gpu-check-cpu.json").read_text())
    assert summary["steps"][0]["status"] == "timeout" and summary["steps"][1]["status"] == "not run"
    (tmp_path / "empty").mkdir()
    proc, _ = _run_sh(tmp_path, timeout=60, QRM_GPU_PRETEND_MISSING="1", QRM_GPU_WHEELS=str(tmp_path / "empty"))
    assert proc.returncode == 2 and "STOPPED at setup" in proc.stderr, proc.stderr


def test_unmet_requirements_names_package_and_version(monkeypatch: pytest.MonkeyPatch) -> None:
    """Preflight's requirement check: wheels install with --no-deps, so it alone catches an image package at a
    version transformers/datasets refuse (e.g. the image's pyarrow below datasets' >=24)."""
    from importlib import metadata

    sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))
    import check

    assert check.unmet_requirements() == []  # this machine has what pyproject.toml pins
    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda n: "1.0" if n.lower() == "pyarrow" else real(n))
    unmet = check.unmet_requirements(("datasets",))
    assert unmet == ["datasets needs pyarrow>=24.0.0, found 1.0"], unmet
    assert check.unmet_requirements(("no-such-dist-qrm",)) == ["no-such-dist-qrm is not installed"]
