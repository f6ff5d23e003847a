"""Exact resume on a tiny 4-bit Llama: a run killed (SIGKILL) or preempted (SIGTERM/SIGUSR1) at a chosen step and
resumed gives, tensor by tensor, the losses, gradient norms and final adapter of an uninterrupted run.

16 pairs at batch 4 make 4 optimizer steps per epoch. Every run goes through `qrm.train.main`, so whatever sampler
and collator qrm uses are covered; only the runs that must die run in a subprocess (tests/fault_driver.py).
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from conftest import ROOT, hh_rows, write_jsonl
from fault_driver import Fault
from safetensors.torch import load_file
from test_train import ENV, _recipe

import qrm.train as qtrain
from qrm.config import data_fingerprint
from qrm.errors import RecipeError
from qrm.resume import PREEMPTED_EXIT, checkpoint_problem, recipe_changes, resume_checkpoint
from qrm.trainer import SeededLengthGroupedSampler

DROPOUT = ("--disable_dropout", "false", "--lora_dropout", "0.1")  # TRL turns dropout off by default; RNG must matter
# 6 steps over two epochs; a checkpoint every 2 steps.
RECIPE_A = ("--max_steps", "6", "--save_steps", "2", *DROPOUT)
# 2 micro-batches per step (2 steps per epoch), length-grouped order, a checkpoint every step.
RECIPE_B = (
    "--max_steps", "4", "--save_steps", "1", "--gradient_accumulation_steps", "2",
    "--train_sampling_strategy", "group_by_length", *DROPOUT,
)  # fmt: skip


@pytest.fixture(scope="module")
def pairs16(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 HH-RLHF pairs that fit max_length 192 whole, so an epoch is exactly 4 steps of 4 pairs."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    short = [r for r in hh_rows(120) if max(len(tok(r[k])["input_ids"]) for k in ("chosen", "rejected")) < 150]
    return write_jsonl(tmp_path_factory.mktemp("d") / "hh16.jsonl", short[:16])


def _args(model: Path, out: Path, data: Path, *extra: str) -> list[str]:
    return _recipe(model, out, data, "--bnb_4bit_compute_dtype", "float32", "--save_strategy", "steps", *extra)


def _main_in_process(argv: list[str]) -> tuple[int, Any]:
    """`qrm.train.main(argv)` in this process; returns its exit code and the trainer it built."""
    built: list[Any] = []
    build = qtrain.build_trainer

    def capture(*args: Any, **kwargs: Any) -> Any:
        trainer, prepared = build(*args, **kwargs)
        built.append(trainer)
        return trainer, prepared

    qtrain.build_trainer = capture
    try:
        rc = qtrain.main(argv)
    finally:
        qtrain.build_trainer = build
    return rc, (built[0] if built else None)


def _main_with_fault(fault: str, argv: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "tests" / "fault_driver.py"), "--fault", fault, *argv]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)


def _history(out: Path, steps: int) -> dict[str, Any]:
    """Per-step loss, grad norm and learning rate from the last checkpoint's trainer_state.json (logging_steps 1)."""
    state = json.loads((out / f"checkpoint-{steps}" / "trainer_state.json").read_text())
    rows = [h for h in state["log_history"] if "loss" in h]
    return {
        "step": [h["step"] for h in rows],
        **{k: torch.tensor([h[k] for h in rows], dtype=torch.float64) for k in ("loss", "grad_norm", "learning_rate")},
    }


def _assert_same_run(resumed: Path, reference: Path, steps: int) -> None:
    got, want = _history(resumed, steps), _history(reference, steps)
    assert got["step"] == want["step"] == list(range(1, steps + 1))
    for key in ("loss", "grad_norm", "learning_rate"):
        assert torch.equal(got[key], want[key]), f"{key}: {got[key].tolist()} != {want[key].tolist()}"
    a, b = load_file(resumed / "adapter_model.safetensors"), load_file(reference / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any("score" in k for k in a), sorted(a)[-3:]
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} adapter/head tensors differ, e.g. {differ[:3]}"


@pytest.fixture(scope="module")
def reference_a(tiny_llama: Path, pairs16: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Recipe A trained without interruption."""
    out = tmp_path_factory.mktemp("ref-a") / "o"
    rc, trainer = _main_in_process(_args(tiny_llama, out, pairs16, *RECIPE_A))
    assert rc == 0 and len(trainer.train_dataset) == 16
    assert any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in trainer.model.modules()), "dropout is off"
    return out


@pytest.fixture(scope="module")
def reference_b(tiny_llama: Path, pairs16: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Recipe B trained without interruption."""
    out = tmp_path_factory.mktemp("ref-b") / "o"
    rc, trainer = _main_in_process(_args(tiny_llama, out, pairs16, *RECIPE_B))
    assert rc == 0
    assert isinstance(trainer.seeded_sampler, SeededLengthGroupedSampler), "length-grouped sampling not in use"
    return out


@pytest.mark.parametrize("kill_after", [2, 4], ids=["mid-epoch", "epoch-boundary"])
def test_sigkill_then_resume_is_bit_identical(tiny_llama, pairs16, reference_a, tmp_path, kill_after):
    out = tmp_path / "o"
    argv = _args(tiny_llama, out, pairs16, *RECIPE_A)
    res = _main_with_fault(f"kill-after-save:{kill_after}", argv)
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    assert (out / f"checkpoint-{kill_after}").is_dir() and not (out / "adapter_model.safetensors").exists()
    rc, _ = _main_in_process(argv)  # the same command again: resume auto
    assert rc == 0
    _assert_same_run(out, reference_a, 6)


def test_sigkill_resume_with_grad_accumulation_and_length_grouping(tiny_llama, pairs16, reference_b, tmp_path):
    out = tmp_path / "o"
    argv = _args(tiny_llama, out, pairs16, *RECIPE_B)
    res = _main_with_fault("kill-after-save:3", argv)  # step 3: first step of the second epoch
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    rc, _ = _main_in_process(argv)
    assert rc == 0
    _assert_same_run(out, reference_b, 4)


def test_sigterm_checkpoints_at_step_boundary_exits_4_and_resumes_exactly(
    tiny_llama, pairs16, reference_a, tmp_path, monkeypatch
):
    out = tmp_path / "o"
    argv = _args(tiny_llama, out, pairs16, *RECIPE_A)
    res = _main_with_fault("signal-at-step:3:TERM", argv)
    assert res.returncode == PREEMPTED_EXIT == 4, res.stderr[-3000:]
    assert "preempted: SIGTERM" in res.stderr
    # Step 3 is not a save step (save_steps 2): this checkpoint exists only because of the signal.
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert checkpoint_problem(str(out / "checkpoint-3")) is None
    assert not (out / "adapter_model.safetensors").exists(), "a preempted run must not look finished"

    loads: list[tuple[str, Any]] = []
    real_load = torch.load

    def spy(f: Any, *args: Any, **kwargs: Any) -> Any:
        loads.append((Path(str(f)).name, kwargs.get("weights_only")))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    rc, _ = _main_in_process(argv)
    monkeypatch.undo()
    assert rc == 0
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth"} <= {name for name, _ in loads}, loads
    assert all(w is True for _, w in loads), f"unpickled without weights_only: {loads}"
    _assert_same_run(out, reference_a, 6)


def test_sigusr1_saves_and_stops_and_gives_the_handler_back(tiny_llama, pairs16, tmp_path):
    out = tmp_path / "o"
    before = signal.getsignal(signal.SIGUSR1)
    build = qtrain.build_trainer

    def with_fault(*args: Any, **kwargs: Any) -> Any:
        trainer, prepared = build(*args, **kwargs)
        trainer.add_callback(Fault("signal-at-step:1:USR1"))
        return trainer, prepared

    qtrain.build_trainer = with_fault
    try:
        rc = qtrain.main(_args(tiny_llama, out, pairs16, "--max_steps", "3", "--save_steps", "10"))
    finally:
        qtrain.build_trainer = build
    assert rc == PREEMPTED_EXIT
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert signal.getsignal(signal.SIGUSR1) is before


def test_resume_refuses_changed_recipe_or_data_unless_forced(tiny_llama, pairs16, tmp_path, capsys):
    out = tmp_path / "o"
    data = write_jsonl(tmp_path / "data.jsonl", hh_rows(16))
    base = _args(tiny_llama, out, data, "--save_steps", "2")
    assert _main_in_process([*base, "--max_steps", "2"])[0] == 0
    capsys.readouterr()

    # What may change on resume: longer training, other cadences, reporting, loaders; the resume switches.
    assert (
        recipe_changes(
            {"learning_rate": 0.005, "max_steps": 2, "save_steps": 2, "output_dir": "/a"},
            {
                "learning_rate": 0.005,
                "max_steps": 8,
                "save_steps": 4,
                "logging_steps": 5,
                "report_to": ["tensorboard"],
                "dataloader_num_workers": 2,
                "resume": "auto",
                "resume_force": True,
                "output_dir": "/b",
            },
        )
        == []
    )
    assert recipe_changes({"seed": 0}, {}) == [("seed", 0, 42)], "a field back at its default is a change too"

    rc, _ = _main_in_process([*base, "--max_steps", "4", "--learning_rate", "2.0e-3"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "checkpoint-2 was trained with learning_rate=0.005, this recipe says 0.002" in err, err
    assert "learning_rate: 0.005" in (out / "qrm_recipe.yaml").read_text(), (
        "a refused resume changed output_dir's provenance"
    )

    write_jsonl(data, hh_rows(17)[1:])  # same path and recipe, different pairs
    rc, _ = _main_in_process([*base, "--max_steps", "4"])
    err = capsys.readouterr().err
    assert rc == 2 and "checkpoint-2 was trained on pairs with sha256" in err, err
    write_jsonl(data, hh_rows(16))

    rc, trainer = _main_in_process([*base, "--max_steps", "4", "--learning_rate", "2.0e-3", "--resume_force", "true"])
    assert rc == 0 and trainer.state.global_step == 4
    assert [h["step"] for h in trainer.state.log_history if "loss" in h] == [1, 2, 3, 4], "did not resume"
    assert "learning_rate: 0.002" in (out / "checkpoint-4" / "qrm_recipe.yaml").read_text()

    # Choosing the checkpoint: never, an explicit path (or its alias resume_from_checkpoint), a damaged one.
    args = SimpleNamespace(output_dir=str(out), save_only_model=False, resume_force=True, resume_from_checkpoint=None)
    ck2, ck4 = str(out / "checkpoint-2"), str(out / "checkpoint-4")
    assert resume_checkpoint(SimpleNamespace(**{**vars(args), "resume": "auto"})) == ck4
    assert resume_checkpoint(SimpleNamespace(**{**vars(args), "resume": "never"})) is None
    assert resume_checkpoint(SimpleNamespace(**{**vars(args), "resume": ck2})) == ck2
    assert resume_checkpoint(SimpleNamespace(**{**vars(args), "resume": "auto", "resume_from_checkpoint": ck2})) == ck2
    with pytest.raises(RecipeError, match="name different checkpoints"):
        resume_checkpoint(SimpleNamespace(**{**vars(args), "resume": ck4, "resume_from_checkpoint": ck2}))
    (out / "checkpoint-2" / "optimizer.pt").unlink()
    with pytest.raises(RecipeError, match=r"optimizer\.pt missing"):
        resume_checkpoint(SimpleNamespace(**{**vars(args), "resume": ck2}))
    with pytest.raises(RecipeError, match="expected auto, never or a checkpoint directory"):
        resume_checkpoint(SimpleNamespace(**{**vars(args), "resume": "yes"}))


def test_provenance_in_every_checkpoint_and_same_seed_same_result(tiny_llama, pairs16, tmp_path):
    outs = [tmp_path / "one", tmp_path / "two"]
    for out in outs:
        assert _main_in_process(_args(tiny_llama, out, pairs16, "--max_steps", "2", "--save_steps", "1"))[0] == 0
    infos = []
    for out in outs:
        info = json.loads((out / "qrm_versions.json").read_text())
        infos.append(info)
        for ck in ("checkpoint-1", "checkpoint-2"):
            for name in ("qrm_recipe.yaml", "qrm_versions.json"):
                assert (out / ck / name).read_bytes() == (out / name).read_bytes(), f"{ck}/{name}"
        assert {"torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate"} <= set(info["versions"])
    a, b = (load_file(out / "adapter_model.safetensors") for out in outs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "same seed, different weights"
    fp = infos[0]["data_fingerprint"]
    assert fp == infos[1]["data_fingerprint"]
    assert fp["train_pairs"] == 16 and len(fp["train_pairs_sha256"]) == 64
    assert fp["source_sha256"] == {str(pairs16): hashlib.sha256(pairs16.read_bytes()).hexdigest()}

    # qrm's own commit: this checkout's HEAD (and whether tracked files differ), or null outside a git checkout.
    git = infos[0]["qrm_git"]
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0 and (ROOT / ".git").exists():
        assert git["commit"] == head.stdout.strip() and isinstance(git["dirty"], bool)
    else:
        assert git is None

    rows = [{"chosen_ids": [1, 2, 3], "rejected_ids": [1, 2, 4]}, {"chosen_ids": [5], "rejected_ids": [6]}]
    same = data_fingerprint(rows)["train_pairs_sha256"]
    assert data_fingerprint([dict(r) for r in rows])["train_pairs_sha256"] == same
    assert data_fingerprint(rows[::-1])["train_pairs_sha256"] != same, "order is part of the data"
    assert data_fingerprint([{**rows[0], "rejected_ids": [1, 2, 5]}, rows[1]])["train_pairs_sha256"] != same
    assert data_fingerprint([{**rows[0], "margin": 1.0}, rows[1]])["train_pairs_sha256"] != same
    assert data_fingerprint(rows, ["org/some-hub-dataset"])["source_sha256"] == {"org/some-hub-dataset": None}
