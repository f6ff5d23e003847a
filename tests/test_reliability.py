"""Reliability on a tiny 4-bit Llama: non-finite steps, atomic checkpoints, no Hub token on disk."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import hh_rows, write_jsonl
from test_train import _recipe
from transformers import TrainerCallback

import qrm.train as qtrain
from qrm.config import parse_recipe
from qrm.errors import NonFiniteError
from qrm.resume import last_good_checkpoint
from qrm.trainer import QrmRewardTrainer

TOKEN = "hf_FAKEFAKEFAKEFAKEFAKEFAKEFAKEFAKE12"


@pytest.fixture(scope="module")
def hh_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("d") / "hh.jsonl", hh_rows(48))


def _build(model: Path, out: Path, data: Path, *extra: str) -> Any:
    args = parse_recipe(_recipe(model, out, data, "--max_steps", "4", "--bnb_4bit_compute_dtype", "float32", *extra))
    trainer, _ = qtrain.build_trainer(*args)
    assert isinstance(trainer, QrmRewardTrainer), type(trainer)
    return trainer


def _poison(trainer: Any, step: int) -> None:
    """Make the loss NaN on optimizer step `step` (1-based), as a diverged run would."""
    orig = trainer.compute_loss

    def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
        out = orig(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if trainer.state.global_step == step - 1:
            return (out[0] * math.nan, out[1]) if return_outputs else out * math.nan
        return out

    trainer.compute_loss = compute_loss


def _trainable(trainer: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


class _Snap(TrainerCallback):
    def __init__(self, trainer: Any, step: int) -> None:
        self.trainer, self.step, self.weights = trainer, step, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.weights = _trainable(self.trainer)


def test_nan_stops_before_optimizer_step_and_keeps_last_good_checkpoint(tiny_llama, hh_small, tmp_path):
    out = tmp_path / "o"
    trainer = _build(tiny_llama, out, hh_small, "--save_strategy", "steps", "--save_steps", "2")
    _poison(trainer, 3)
    snap = _Snap(trainer, 2)
    trainer.add_callback(snap)
    with pytest.raises(NonFiniteError, match="global step 3"):
        trainer.train()
    after = _trainable(trainer)
    assert all(torch.isfinite(w).all() for w in after.values())
    assert all(torch.equal(after[n], snap.weights[n]) for n in after), "the NaN step reached the weights"
    assert last_good_checkpoint(out) == str(out / "checkpoint-2")
    assert not list(out.glob("tmp-checkpoint-*")), "staging dir left behind"


def test_skip_mode_counts_and_logs_nan_not_zero(tiny_llama, hh_small, tmp_path):
    trainer = _build(tiny_llama, tmp_path / "o", hh_small)
    trainer.nonfinite_guard.skip = True
    _poison(trainer, 2)
    snap = _Snap(trainer, 1)
    trainer.add_callback(snap)
    skipped_after: dict[str, torch.Tensor] = {}

    class _AtStep2(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                skipped_after.update(_trainable(trainer))

    trainer.add_callback(_AtStep2())
    trainer.train()
    assert trainer.nonfinite_guard.skipped == 1 and trainer.nonfinite_guard.skipped_steps == [2]
    assert all(torch.equal(skipped_after[n], snap.weights[n]) for n in skipped_after), "skipped step moved weights"
    final = _trainable(trainer)
    assert all(torch.isfinite(w).all() for w in final.values())
    assert any(not torch.equal(final[n], snap.weights[n]) for n in final), "training stopped after the skip"
    losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    assert math.isnan(losses[2]), f"skipped step logged as {losses[2]}"
    assert all(math.isfinite(losses[s]) for s in (1, 3, 4))
    assert trainer.state.log_history[-1]["nonfinite_skipped"] == 1


def test_atomic_checkpoints_no_token_and_damaged_newest_is_skipped(tiny_llama, hh_small, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = tmp_path / "o"
    trainer = _build(tiny_llama, out, hh_small, "--save_strategy", "steps", "--save_steps", "2", "--hub_token", TOKEN)
    assert trainer.args.hub_token == TOKEN
    seen: list[tuple[str, bool]] = []
    save_rng = trainer._save_rng_state

    def spy(output_dir: str) -> None:
        # Mid-save: files go to staging and checkpoint-N must not exist yet.
        seen.append((Path(output_dir).parent.name, (out / Path(output_dir).name).exists()))
        save_rng(output_dir)

    trainer._save_rng_state = spy
    trainer.train()
    assert seen == [("tmp-checkpoint-2", False), ("tmp-checkpoint-4", False)]
    trainer.save_model(str(out))
    assert trainer.args.hub_token == TOKEN, "the token must stay usable in memory"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(("checkpoint", "tmp-"))) == [
        "checkpoint-2",
        "checkpoint-4",
    ]
    # The Trainer's pickled arguments are replaced by JSON (never read back on resume).
    assert (out / "checkpoint-4" / "training_args.json").is_file() and (out / "training_args.json").is_file()
    assert not list(out.rglob("training_args.bin"))
    leaks = [p for p in out.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
    assert not leaks, f"token written to {leaks}"

    assert last_good_checkpoint(out) == str(out / "checkpoint-4")
    adapter = out / "checkpoint-4" / "adapter_model.safetensors"
    data = adapter.read_bytes()
    adapter.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="qrm"):
        assert last_good_checkpoint(out) == str(out / "checkpoint-2")
    assert any("checkpoint-4" in r.message and "adapter_model.safetensors" in r.message for r in caplog.records)


def test_no_secret_in_any_byte_no_pickle_and_no_remote_code(tiny_llama, hh_small, tmp_path, monkeypatch, capfd):
    """A full run (checkpoints, per-step logging and evaluation, final reports) with a token in HF_TOKEN, another
    in the login file and a third as `hub_token` in the recipe: none reaches any file under output_dir or the log."""
    import huggingface_hub.constants
    import transformers

    env_token, login_token = TOKEN.replace("FAKE", "ENVV"), TOKEN.replace("FAKE", "LOGN")
    monkeypatch.setenv("HF_TOKEN", env_token)
    login = tmp_path / "hf" / "token"
    login.parent.mkdir()
    login.write_text(login_token)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(login))
    remote_code: list[tuple[str, Any]] = []
    for cls in (transformers.AutoConfig, transformers.AutoTokenizer, transformers.AutoModelForSequenceClassification):

        def spy(*args: Any, _load: Any = cls.from_pretrained, _name: str = cls.__name__, **kwargs: Any) -> Any:
            remote_code.append((_name, kwargs.get("trust_remote_code")))
            return _load(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)

    out = tmp_path / "o"
    argv = _recipe(
        tiny_llama, out, hh_small, "--max_steps", "2", "--bnb_4bit_compute_dtype", "float32", "--hub_token", TOKEN,
        "--save_strategy", "steps", "--save_steps", "1", "--eval_fraction", "0.25", "--eval_strategy", "steps",
        "--eval_steps", "1",
    )  # fmt: skip
    assert qtrain.main(argv) == 0
    files = [p for p in out.rglob("*") if p.is_file()]
    names = {p.relative_to(out).as_posix() for p in files}
    for must in ("checkpoint-2/trainer_state.json", "checkpoint-2/rng_state.pth", "checkpoint-2/qrm_recipe.yaml",
                 "checkpoint-2/training_args.json", "qrm_versions.json", "metrics.json", "eval/report.md", "README.md"):  # fmt: skip
        assert must in names, f"{must} not written, so not searched: {sorted(names)}"
    history = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    assert any("eval_loss" in h for h in history) and any("loss" in h for h in history)
    for token in (TOKEN, env_token, login_token):
        leaks = [p.relative_to(out).as_posix() for p in files if token.encode() in p.read_bytes()]
        assert not leaks, f"token written to {leaks}"
    logged = capfd.readouterr()
    assert not any(t in logged.out + logged.err for t in (TOKEN, env_token, login_token)), "token in the log"
    pickles = sorted(n for n in names if n.endswith((".bin", ".pkl", ".pickle")))
    assert not pickles, f"pickles written: {pickles}"  # weights are safetensors; optimizer/rng .pt load weights_only

    assert {name for name, _ in remote_code} == {"AutoConfig", "AutoTokenizer", "AutoModelForSequenceClassification"}
    assert all(flag is False for _, flag in remote_code), remote_code


def test_metrics_file_nulls_nested_nan_and_inf(tmp_path: Path) -> None:
    nested = {"a": math.nan, "b": {"c": math.inf, "d": [1.0, -math.inf]}, "e": 2, "f": "x"}
    qtrain.write_metrics(tmp_path / "metrics.json", nested)
    text = (tmp_path / "metrics.json").read_text()
    assert json.loads(text) == {"a": None, "b": {"c": None, "d": [1.0, None]}, "e": 2, "f": "x"}
    assert "NaN" not in text and "Infinity" not in text
