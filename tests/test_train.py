"""Training for real on tiny models: what changed, what did not, and what reloads in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import HH_TEST, HH_TRAIN, MINILM, ROOT, hh_rows, tiny_run_flags, write_jsonl

from qrm.config import parse_recipe
from qrm.train import build_trainer, train

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}


def _recipe(model: str | Path, out: Path, data: Path, *extra: str) -> list[str]:
    return tiny_run_flags(model, out, data, "--per_device_eval_batch_size", "8", *extra)


@pytest.fixture(scope="module")
def hh_small(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("d") / "hh.jsonl", hh_rows(48))


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("compute", ["bfloat16", "float32"])
def test_tiny_llama_lora_and_head_change_base_does_not(tiny_llama, hh_small, tmp_path, compute):
    args = parse_recipe(
        _recipe(tiny_llama, tmp_path / "o", hh_small, "--max_steps", "4", "--bnb_4bit_compute_dtype", compute)
    )
    trainer, _ = build_trainer(*args)
    model = trainer.model
    quant = [n for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"]
    assert quant, "backbone is not 4-bit"
    heads = [m for n, m in model.named_modules() if n.endswith("score")]
    assert heads and not any("4bit" in type(m).__name__ for m in heads), "the score head was quantized"
    before = _snapshot(model)
    trainer.train()
    after = _snapshot(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_B" in n for n in changed) and any("lora_A" in n for n in changed)
    assert any("modules_to_save" in n and "score" in n for n in changed), "head did not train"
    assert changed <= trainable, f"frozen parameters changed: {sorted(changed - trainable)[:3]}"
    frozen_4bit = [n for n in before if n not in trainable and before[n].dtype == torch.uint8]
    assert frozen_4bit and all(torch.equal(before[n], after[n]) for n in frozen_4bit)


def _score_in_fresh_process(out: Path) -> list[list[float]]:
    # Pairs are tokenized as in training (the prompt is cut to fit the longer response of the pair).
    code = (
        "import json\n"
        "from qrm import RewardModel\n"
        "from qrm.data import DataReport, tokenize_pairs\n"
        "from qrm.reward_model import score_pair_rows\n"
        f"rm = RewardModel.from_pretrained({str(out)!r})\n"
        f"pairs = [json.loads(l) for l in open({str(out / 'verify_pairs.jsonl')!r})]\n"
        "rows = tokenize_pairs(pairs, rm.tokenizer, rm.max_length, DataReport(source='verify'))\n"
        "print('REWARDS' + json.dumps(score_pair_rows(rm.model, rows, rm.tokenizer.pad_token_id)))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    line = next(x for x in res.stdout.splitlines() if x.startswith("REWARDS"))
    return json.loads(line[len("REWARDS") :])


@pytest.mark.parametrize(
    ("model", "compute"), [("tiny_llama", "bfloat16"), ("minilm", "float32")], ids=["llama-bf16", "minilm-fp32"]
)
def test_train_saves_adapter_that_reloads_with_same_rewards(request, hh_small, tmp_path, model, compute):
    path = request.getfixturevalue("tiny_llama") if model == "tiny_llama" else MINILM
    out = tmp_path / "out"
    metrics = train(
        *parse_recipe(
            _recipe(
                path, out, hh_small, "--max_steps", "3", "--eval_fraction", "0.25", "--bnb_4bit_compute_dtype", compute
            )
        )
    )
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "qrm_recipe.yaml",
        "qrm_versions.json",
        "metrics.json",
        "data_report.json",
        "verify_pairs.jsonl",
    ):
        assert (out / name).is_file(), name
    from safetensors import safe_open

    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    head = "score" if model == "tiny_llama" else "classifier"
    assert any(k.split(".")[-2] == head for k in keys), f"head missing from adapter: {keys[-4:]}"
    assert not any("weight_format" in k or "quant" in k for k in keys), "base weights leaked into the adapter"
    report = json.loads((out / "data_report.json").read_text())
    assert report[0]["rows"] == 48 and report[0]["pairs"] == 36 and report[1]["pairs"] == 12
    assert report[0]["kept"] + report[0]["dropped_too_long"] == 36
    assert metrics["train_pairs"] == report[0]["kept"] and metrics["eval_pairs"] == report[1]["kept"] > 0
    saved = [json.loads(line) for line in open(out / "verify_pairs.jsonl")]
    chosen, rejected = _score_in_fresh_process(out)
    assert chosen == pytest.approx([r["chosen_reward"] for r in saved], abs=1e-5)
    assert rejected == pytest.approx([r["rejected_reward"] for r in saved], abs=1e-5)
    assert len({round(x, 6) for x in chosen + rejected}) > 1, "constant rewards: the head reads nothing"


def test_bad_data_fails_before_model_load_with_named_row(tiny_llama, tmp_path):
    import shutil

    # Tokenizer and config, and a weights file that is garbage: reaching the weight loader would fail differently.
    no_weights = tmp_path / "garbage-weights"
    shutil.copytree(tiny_llama, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    (no_weights / "model.safetensors").write_bytes(b"\x00not safetensors" * 64)
    bad = write_jsonl(
        tmp_path / "bad.jsonl",
        [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a", "rejected": None}],
    )
    res = subprocess.run(
        [sys.executable, "-m", "qrm.cli", "train", *_recipe(no_weights, tmp_path / "o", bad)],
        capture_output=True, text=True, env=ENV, timeout=300,
    )  # fmt: skip
    assert res.returncode == 2, res.stderr[-2000:]
    assert "bad.jsonl: row 2: field 'rejected' is missing or null" in res.stderr
    assert not (tmp_path / "o" / "adapter_model.safetensors").exists()


def test_cli_and_accelerate_launch_run_the_same_path(tiny_llama, hh_small, tmp_path):
    common = _recipe(tiny_llama, tmp_path / "x", hh_small, "--max_steps", "2", "--bnb_4bit_compute_dtype", "float32")
    runs = {
        "cli": [sys.executable, "-m", "qrm.cli", "train", *common, "--output_dir", str(tmp_path / "cli")],
        "accelerate": [
            sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no",
            str(ROOT / "scripts" / "train.py"), *common, "--output_dir", str(tmp_path / "accelerate"),
        ],
    }  # fmt: skip
    losses = {}
    for name, cmd in runs.items():
        res = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
        assert res.returncode == 0, f"{name}: {res.stderr[-3000:]}"
        assert "Data: every row accounted for" in res.stdout
        losses[name] = json.loads((tmp_path / name / "metrics.json").read_text())["train_loss"]
    assert losses["cli"] == pytest.approx(losses["accelerate"], rel=1e-5)


@pytest.mark.slow
def test_learns_real_preferences_above_chance(tmp_path):
    """MiniLM (pretrained) in 4 bit, one epoch on 600 HH-RLHF helpful pairs: held-out accuracy clearly above 50 %
    (0.594 on 485 pairs on the CI machine; the bound is ~0.553)."""
    out = tmp_path / "learn"
    metrics = train(
        *parse_recipe(
            [
                "--recipe", str(ROOT / "recipes" / "demo" / "minilm_hh_helpful.yaml"),
                "--dataset", str(HH_TRAIN), "--eval_dataset", str(HH_TEST),
                "--max_pairs", "600", "--max_length", "128", "--output_dir", str(out),
                "--learning_rate", "5.0e-4", "--num_train_epochs", "1",
            ]
        )
    )  # fmt: skip
    n, acc = metrics["eval_pairs"], metrics["eval_accuracy"]
    # One-sided 99 % bound under chance for n ~ 500 pairs is ~0.55.
    assert n > 400 and acc > 0.5 + 2.33 * (0.25 / n) ** 0.5, metrics


def test_bf16_off_with_bf16_compute_turns_autocast_on(tiny_llama, hh_small, tmp_path):
    """A 4-bit recipe with `bf16: false` and a bf16 compute dtype trains under bf16 autocast (TRL casts LoRA and head
    to bf16): the Trainer hands accelerate `mixed_precision`, so setting the bf16 flag alone would leave it off."""
    argv = _recipe(tiny_llama, tmp_path / "o", hh_small, "--max_steps", "1", "--bnb_4bit_compute_dtype", "bfloat16")
    trainer, _ = build_trainer(*parse_recipe([*argv, "--bf16", "false"]))
    assert trainer.accelerator.mixed_precision == "bf16"
    autocast: list[bool] = []
    head = next(m for n, m in trainer.model.named_modules() if n.endswith("score"))
    head.register_forward_pre_hook(lambda _m, _a: autocast.append(torch.is_autocast_enabled("cpu")))
    trainer.train()
    assert autocast and all(autocast), autocast
