"""DDP for real: `qrm train` on 2 CPU processes (gloo) through `accelerate launch`, against one process.

A 2-process run with 2 pairs per process and a 1-process run with 2 pairs and gradient accumulation 2 see the same 4
pairs per optimizer step, in the same order (accelerate gives rank r the r-th batch of the sampler, accumulation takes
them one after the other) and add the two halves' gradients the same way: DDP averages the 2 ranks' gradients
((g0 + g1) / 2, gloo), accumulation adds g0 / 2 and g1 / 2, and halving is exact in floating point. So losses,
gradient norms and weights are compared bit for bit. Dropout is off (TRL's default) because each rank draws its own.

`accelerate launch` costs ~15 s of imports per process on this 2-core machine, so the launches are few: one
uninterrupted run is the reference for every test, and a second run is preempted, killed and resumed in a chain:
SIGTERM to rank 1 only during step 2 (launched with the FSDP config, which accelerate runs as DDP on CPUs), then
a rerun whose launcher and ranks are all SIGKILLed right after checkpoint-3, then a rerun that finishes.
`--cpu --num_processes 2` is not used: accelerate's simple launcher starts ONE process for it (no mpirun).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import HH_TEST, ROOT, hh_rows, write_jsonl
from safetensors.torch import load_file

STEPS = 6  # 16 pairs, 4 per step: the chain crosses the epoch boundary at step 4
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",  # two processes on two cores
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONPATH": str(ROOT),
}


@pytest.fixture(scope="module")
def data(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """16 training pairs that fit max_length 192 whole, and 11 held-out rows (10 pairs kept, 1 dropped)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    short = [r for r in hh_rows(120) if max(len(tok(r[k])["input_ids"]) for k in ("chosen", "rejected")) < 150]
    d = tmp_path_factory.mktemp("mp-data")
    return write_jsonl(d / "train.jsonl", short[:16]), write_jsonl(d / "eval.jsonl", hh_rows(11, HH_TEST))


def _args(model: Path, data: tuple[Path, Path], out: Path, batch: int) -> list[str]:
    return [
        "--model_name_or_path", str(model), "--dataset", str(data[0]), "--eval_dataset", str(data[1]),
        "--output_dir", str(out), "--max_length", "192", "--per_device_train_batch_size", str(batch),
        "--per_device_eval_batch_size", "4", "--learning_rate", "5.0e-3", "--lora_r", "4", "--lora_alpha", "8",
        "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "3", "--max_steps", str(STEPS),
        "--report_to", "none", "--seed", "0", "--bnb_4bit_compute_dtype", "float32", "--disable_tqdm", "true",
    ]  # fmt: skip


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(argv: list[str], record: Path, config: str = "multi_gpu.yaml", *fault: str) -> subprocess.CompletedProcess:
    """`accelerate launch` 2 processes; with `hang-after-save:K`, SIGKILL the launcher and both ranks once both
    stopped after checkpoint-K (tests/mp_driver.py), as a lost node would."""
    import psutil

    record.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "accelerate_configs" / config),
        "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(_free_port()),
        str(ROOT / "tests" / "mp_driver.py"), "--record", str(record), *fault, *argv,
    ]  # fmt: skip
    out, err = record / "stdout.txt", record / "stderr.txt"
    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.Popen(cmd, stdout=o, stderr=e, text=True, env=ENV, cwd=ROOT, start_new_session=True)
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            if len(list(record.glob("hung-rank*"))) == 2:
                job = psutil.Process(proc.pid)
                for p in [job, *job.children(recursive=True)]:
                    p.send_signal(signal.SIGKILL)
                break
            time.sleep(0.2)
        else:
            if proc.poll() is None:
                proc.kill()
        proc.wait(timeout=60)
    return subprocess.CompletedProcess(cmd, proc.returncode, out.read_text(), err.read_text())


def _records(record: Path) -> dict[int, dict[str, Any]]:
    return {r["rank"]: r for r in (json.loads(p.read_text()) for p in sorted(record.glob("rank*.json")))}


def _history(out: Path) -> dict[str, Any]:
    state = json.loads((out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    rows = [h for h in state["log_history"] if "loss" in h]
    return {"step": [h["step"] for h in rows], **{k: [h[k] for h in rows] for k in ("loss", "grad_norm")}}


def _adapter_diff(a_dir: Path, b_dir: Path) -> tuple[int, float]:
    a, b = load_file(a_dir / "adapter_model.safetensors"), load_file(b_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any("score" in k for k in a), sorted(a)[-3:]
    return sum(not torch.equal(a[k], b[k]) for k in a), max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def reference(tiny_llama: Path, data: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Uninterrupted 2-process run (accelerate_configs/multi_gpu.yaml: DDP, gloo on CPUs)."""
    tmp = tmp_path_factory.mktemp("ddp-ref")
    res = _launch(_args(tiny_llama, data, tmp / "o", 2), tmp / "rec")
    assert res.returncode == 0, res.stderr[-4000:]
    return {"out": tmp / "o", "rec": _records(tmp / "rec"), "res": res}


@pytest.fixture(scope="module")
def single(tiny_llama: Path, data: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process, 2 pairs per micro-batch, gradient accumulation 2: the same 4 pairs per optimizer step."""
    import qrm.train as qtrain

    out = tmp_path_factory.mktemp("one") / "o"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each launched process
    try:
        assert qtrain.main([*_args(tiny_llama, data, out, 2), "--gradient_accumulation_steps", "2"]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def test_two_processes_equal_one_process_with_accumulation(reference: dict, single: Path) -> None:
    two, one = _history(reference["out"]), _history(single)
    assert two["step"] == one["step"] == list(range(1, STEPS + 1))
    assert two["loss"] == one["loss"], (two["loss"], one["loss"])  # bit for bit, see the module docstring
    assert two["grad_norm"] == one["grad_norm"]
    assert len(set(two["loss"])) == STEPS, "every step should see other pairs"
    assert _adapter_diff(reference["out"], single) == (0, 0.0)
    # The training saw 16 pairs once per epoch over the 2 ranks (not 16 per rank, as a run that did not split).
    state = json.loads((reference["out"] / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    assert state["epoch"] == pytest.approx(STEPS / 4)
    assert sorted(p.name for p in (reference["out"] / "checkpoint-3").glob("rng_state*")) == [
        "rng_state_0.pth",
        "rng_state_1.pth",
    ], "not two processes"


def test_eval_pairs_scored_once_across_ranks_with_one_process_metrics(reference: dict, single: Path) -> None:
    rec = reference["rec"]
    assert sorted(rec) == [0, 1]
    scored = [pair for r in rec.values() for pair in r["scored"]]
    assert len(scored) == len(set(scored)) == 10, [len(r["scored"]) for r in rec.values()]
    assert all(len(r["scored"]) == 5 for r in rec.values()), "the pairs are split evenly"
    two = json.loads((reference["out"] / "metrics.json").read_text())
    one = json.loads((single / "metrics.json").read_text())
    evals = {k for k in one if k.startswith("eval_")}
    assert {"eval_accuracy", "eval_loss", "eval_pairs"} <= evals
    # The weights are bit-identical (test above), but each rank scores its 5 pairs in batches padded to other widths
    # than one process's 10, so rewards may differ in fp32 rounding: counts exact, the rest to 1e-6 relative, or 1e-7
    # absolute for the mean margin, a difference of rewards ~100x larger than itself (measured off by 7e-9).
    assert two["eval_pairs"] == one["eval_pairs"] == 10 and two["eval_accuracy"] == one["eval_accuracy"]
    for key in sorted(evals - {"eval_pairs", "eval_accuracy"}):
        assert two[key] == pytest.approx(one[key], rel=1e-6, abs=1e-7), key
    verify = [json.loads(line) for line in (reference["out"] / "verify_pairs.jsonl").read_text().splitlines()]
    single_verify = [json.loads(line) for line in (single / "verify_pairs.jsonl").read_text().splitlines()]
    assert [v["prompt"] for v in verify] == [v["prompt"] for v in single_verify]
    deltas = [
        abs(a[k] - b[k])
        for a, b in zip(verify, single_verify, strict=True)
        for k in ("chosen_reward", "rejected_reward")
    ]
    print(f"eval rewards, 2 processes vs 1: max |delta| {max(deltas):.2e}")
    assert max(deltas) <= 1e-6


def test_only_rank0_writes_and_the_data_report_prints_once(reference: dict, single: Path) -> None:
    rec, out = reference["rec"], reference["out"]
    assert rec[0]["rc"] == rec[1]["rc"] == 0
    # Rank 1 writes only its own RNG state (needed to resume it exactly), into the staging dir rank 0 publishes.
    staging = {f"tmp-checkpoint-{s}" for s in (3, STEPS)}
    allowed = staging | {f"{d}/{d[4:]}" for d in staging} | {f"{d}/{d[4:]}/rng_state_1.pth" for d in staging}
    assert set(rec[1]["writes"]) <= allowed, sorted(set(rec[1]["writes"]) - allowed)
    assert any(w.endswith("rng_state_1.pth") for w in rec[1]["writes"])
    assert {"metrics.json", "adapter_model.safetensors", "data_report.json", "verify_pairs.jsonl"} <= {
        Path(w).name for w in rec[0]["writes"]
    }
    # The same files as one process, plus rank 1's RNG state in each checkpoint.
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    ones = {str(p.relative_to(single)) for p in single.rglob("*") if p.is_file()}
    renamed = {f.replace("rng_state.pth", "rng_state_0.pth") for f in ones}
    assert files == renamed | {f"checkpoint-{s}/rng_state_1.pth" for s in (3, STEPS)}
    text = reference["res"].stdout
    assert text.count("-> 16 training pairs, 10 eval pairs") == 1, text[-3000:]
    assert text.count("held-out accuracy:") == 1


@pytest.fixture(scope="module")
def chain(tiny_llama: Path, data: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """SIGTERM to rank 1 in step 2 (FSDP config: DDP on CPUs) -> rerun SIGKILLed with its job after checkpoint-3 ->
    rerun to the end, all into one output dir."""
    tmp = tmp_path_factory.mktemp("chain")
    argv = _args(tiny_llama, data, tmp / "o", 2)
    runs: dict[str, Any] = {}
    runs["term"] = _launch(argv, tmp / "r1", "fsdp.yaml", "--fault", "signal-at-step:2:TERM", "--fault-rank", "1")
    runs["term_rec"] = _records(tmp / "r1")
    runs["term_ckpts"] = sorted(p.name for p in (tmp / "o").glob("checkpoint-*"))
    runs["term_ck2"] = sorted(p.name for p in (tmp / "o" / "checkpoint-2").iterdir())
    runs["kill"] = _launch(argv, tmp / "r2", "multi_gpu.yaml", "--fault", "hang-after-save:3")
    runs["hung_pids"] = [int(f.read_text()) for f in sorted((tmp / "r2").glob("hung-rank*"))]
    runs["kill_ckpts"] = sorted(p.name for p in (tmp / "o").glob("checkpoint-*"))
    runs["kill_done"] = (tmp / "o" / "adapter_model.safetensors").exists()
    runs["final"] = _launch(argv, tmp / "r3")
    runs["out"] = tmp / "o"
    return runs


def test_fsdp_config_on_cpus_warns_once_and_runs_as_ddp(chain: dict) -> None:
    err = chain["term"].stdout + chain["term"].stderr
    warned = [line for line in err.splitlines() if "running as DDP over 2 CPU processes" in line]
    assert len(warned) == 1 and "FSDP2" in warned[0], err[-3000:]
    # The recipe keeps uint8 storage, which check_launch refuses under a real FSDP launch: it was not treated as one.
    assert "bnb_4bit_quant_storage" not in err


def test_sigterm_to_one_rank_all_ranks_checkpoint_the_same_step_and_exit_4(chain: dict) -> None:
    rec = chain["term_rec"]
    assert {r: rec[r]["rc"] for r in rec} == {0: 4, 1: 4}, chain["term"].stderr[-3000:]
    err = chain["term"].stderr
    assert "preempted: SIGTERM: stopped after step 2" in err  # rank 1, which got the signal
    assert "preempted: signal on another process: stopped after step 2" in err  # rank 0, which agreed
    # Step 2 is not a save step (save_steps 3): the checkpoint exists because of the signal, with both ranks' state.
    assert chain["term_ckpts"] == ["checkpoint-2"]
    assert {"rng_state_0.pth", "rng_state_1.pth", "optimizer.pt", "adapter_model.safetensors"} <= set(chain["term_ck2"])


def test_sigkill_job_then_rerun_resumes_bit_identically_and_says_so_once(chain: dict, reference: dict) -> None:
    import psutil

    assert chain["kill"].returncode == -signal.SIGKILL, chain["kill"].stderr[-3000:]
    assert len(chain["hung_pids"]) == 2 and not any(psutil.pid_exists(p) for p in chain["hung_pids"]), "a rank lived"
    assert chain["kill_ckpts"] == ["checkpoint-2", "checkpoint-3"] and not chain["kill_done"]
    assert chain["kill"].stdout.count("resuming from") == 1
    assert f"resuming from {chain['out'] / 'checkpoint-2'}" in chain["kill"].stdout
    final = chain["final"]
    assert final.returncode == 0, final.stderr[-4000:]
    assert final.stdout.count("resuming from") == 1, final.stdout[-3000:]
    assert f"[qrm] resuming from {chain['out'] / 'checkpoint-3'}" in final.stdout
    got, want = _history(chain["out"]), _history(reference["out"])
    assert got == want
    assert _adapter_diff(chain["out"], reference["out"]) == (0, 0.0)


def test_erase_under_ddp_edits_the_head_from_every_rank_s_responses(
    tiny_llama: Path, data: tuple[Path, Path], reference: dict, tmp_path: Path
) -> None:
    """`length_debias: erase` on 2 processes: training is the plain reference's, bit for bit; the head edit uses the
    statistics of all 32 training responses (each rank scores 16, the sums are all-reduced), so the saved reward is
    uncorrelated with length rank over all of them, not only over one rank's share."""
    from scipy.stats import rankdata

    from qrm import RewardModel
    from qrm import data as qdata
    from qrm.config import parse_recipe
    from qrm.files import LENGTH_ERASE_FILE
    from qrm.reward_model import score_pair_rows

    out = tmp_path / "o"
    res = _launch([*_args(tiny_llama, data, out, 2), "--length_debias", "erase"], tmp_path / "rec")
    assert res.returncode == 0, res.stderr[-4000:]
    a, b = load_file(reference["out"] / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    changed = sorted(k for k in a if not torch.equal(a[k], b[k]))
    assert changed and all("score" in k for k in changed), changed
    record = json.loads((out / LENGTH_ERASE_FILE).read_text())
    assert record["responses"] == 32 and abs(record["pearson_rank_after"]) < 1e-6, record
    rm = RewardModel.from_pretrained(out)
    _, _, dargs, targs = parse_recipe(_args(tiny_llama, data, tmp_path / "unused", 2))
    rows = qdata.prepare(dargs, rm.tokenizer, targs.max_length).train
    chosen, rejected = score_pair_rows(rm.model, rows, rm.tokenizer.pad_token_id)
    lengths = [len(r[k]) - r["prompt_len"] for k in ("chosen_ids", "rejected_ids") for r in rows]
    import numpy as np

    assert len(lengths) == 32 and abs(np.corrcoef(chosen + rejected, rankdata(lengths))[0, 1]) < 1e-4


def test_odin_two_processes_equal_one_process_with_accumulation(
    tiny_llama: Path, data: tuple[Path, Path], tmp_path: Path
) -> None:
    """`length_debias: odin` under DDP: each rank's ODIN loss is over its own micro-batch, exactly as one process
    with gradient accumulation sees the same micro-batches one after the other, so adapter and length head match
    bit for bit (4 pairs per micro-batch: ODIN's minimum)."""
    import qrm.train as qtrain
    from qrm.files import LENGTH_HEAD_FILE

    two, one = tmp_path / "two", tmp_path / "one"
    odin = ["--length_debias", "odin", "--max_steps", "2"]
    res = _launch([*_args(tiny_llama, data, two, 4), *odin], tmp_path / "rec")
    assert res.returncode == 0, res.stderr[-4000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each launched process
    try:
        assert qtrain.main([*_args(tiny_llama, data, one, 4), *odin, "--gradient_accumulation_steps", "2"]) == 0
    finally:
        torch.set_num_threads(threads)
    for name in ("adapter_model.safetensors", LENGTH_HEAD_FILE):
        a, b = load_file(two / name), load_file(one / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    logged = json.loads((two / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    assert any("odin_corr_length" in h for h in logged)
