"""benchmarks/trl_vs_qrm.py: token accounting by hand, the FLOPs formula, one tiny end-to-end run (JSON, table) and both sides'
collators. No timing is asserted: only that the numbers exist, are positive and count what they say."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import trl_vs_qrm as bench
from benchmarks import trl_vs_qrm_results as results
from benchmarks import trl_vs_qrm_trial as trial

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT / "data" / "hh-rlhf-helpful" / "helpful-base.train.jsonl"


def _spec(side: str, model: Path, out: Path, batch: int, steps: int, warmup: int) -> dict:
    flags = bench.recipe_flags(
        str(model), HH, "implicit", max_pairs=4 * batch * steps, max_length=128, batch_size=batch, steps=steps
    )
    return {
        "side": side,
        "device": "cpu",
        "steps": steps,
        "warmup": warmup,
        "flags": [*flags, "--output_dir", str(out)],
    }


def test_counting_collator_counts_trl_padding_by_hand() -> None:
    from trl.trainer.reward_trainer import DataCollatorForPreference

    counter = trial.CountingCollator(DataCollatorForPreference(pad_token_id=0))
    rows = [
        {"chosen_ids": [1, 2, 3, 4], "rejected_ids": [1, 2, 5], "prompt_len": 2},
        {"chosen_ids": [6, 7], "rejected_ids": [6, 8], "prompt_len": 1},
    ]
    batch = counter([{k: r[k] for k in ("chosen_ids", "rejected_ids")} for r in rows])
    # chosen, chosen, rejected, rejected, each padded to the longest (4): 16 tokens computed
    assert batch["input_ids"].shape == (4, 4)
    assert (counter.calls, counter.tokens, counter.shapes) == (1, 16, [[4, 4]])
    unique = sum(trial.unique_tokens(r) for r in rows)
    assert unique == (4 + 3 - 2) + (2 + 2 - 1) == 8
    assert counter.tokens / unique == 2.0
    assert counter.pad_token_id == 0  # attributes come from the wrapped collator
    counter.reset()
    assert (counter.calls, counter.tokens, counter.shapes) == (0, 0, [])


def test_flops_per_token_and_peak_table(tiny_llama: Path) -> None:
    shape = trial.model_flops(str(tiny_llama), lora_r=16, lora_targets=["all-linear"])
    # the fixture: hidden 64, 2 layers, 4 heads of 16, 2 KV heads, MLP 128
    per_layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128
    lora = 16 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 3 * (64 + 128))
    assert shape["n_linear"] == 2 * per_layer and shape["n_lora"] == 2 * lora
    assert (shape["layers"], shape["d_attn"]) == (2, 64)
    assert trial.flops_per_token(shape, 100) == 4 * 2 * per_layer + 6 * 2 * lora + 3 * 2 * 64 * 100
    only_q = trial.model_flops(str(tiny_llama), lora_r=8, lora_targets=["q_proj"])
    assert only_q["n_lora"] == 2 * 8 * (64 + 64)
    assert trial.peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert trial.peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert trial.peak_bf16_flops("NVIDIA H200") == 989e12
    assert trial.peak_bf16_flops("AMD EPYC") is None


def test_synthetic_profile_lengths(minilm_tokenizer, tmp_path: Path) -> None:
    path = bench.write_synthetic(tmp_path / "s.jsonl", minilm_tokenizer, 6, prompt_tokens=(300, 320))
    again = bench.write_synthetic(tmp_path / "t.jsonl", minilm_tokenizer, 6, prompt_tokens=(300, 320))
    assert path.read_text() == again.read_text()  # deterministic
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 6 and set(rows[0]) == {"prompt", "chosen", "rejected"}
    for r in rows:
        n = len(minilm_tokenizer(r["prompt"], add_special_tokens=False)["input_ids"])
        assert 300 <= n <= 340  # the words' token counts plus the Human/Assistant markers
        for resp in (r["chosen"], r["rejected"]):
            assert 10 <= len(minilm_tokenizer(resp, add_special_tokens=False)["input_ids"]) <= 45


def test_trl_side_computes_padding_by_hand(tiny_llama: Path, tmp_path: Path) -> None:
    # One batch of all 3 pairs: TRL computes 2 x 3 rows of the longest sequence.
    res = trial.run_trial(_spec("trl", tiny_llama, tmp_path / "trl", batch=3, steps=1, warmup=0))
    from qrm.config import parse_recipe
    from qrm.data import prepare
    from qrm.model import load_tokenizer

    margs, _, dargs, targs = parse_recipe(_spec("trl", tiny_llama, tmp_path / "x", 3, 1, 0)["flags"])
    rows = prepare(dargs, load_tokenizer(margs), targs.max_length).train[:3]
    longest = max(len(r[k]) for r in rows for k in ("chosen_ids", "rejected_ids"))
    assert res["collator"] == "DataCollatorForPreference"
    assert res["batch_shapes"] == [[6, longest]] and res["computed_tokens"] == 6 * longest
    assert res["real_tokens"] == sum(trial.unique_tokens(r) for r in rows)
    assert res["computed_per_unique"] >= 1.0
    assert res["pairs"] == 3 and res["seconds"] > 0 and res["peak_memory_mib"] > 0


def test_qrm_side_counts_the_qrm_collator(tiny_llama: Path, tmp_path: Path) -> None:
    from qrm.config import parse_recipe
    from qrm.train import build_trainer

    spec = _spec("qrm", tiny_llama, tmp_path / "qrm", batch=2, steps=2, warmup=0)
    trainer, rows = trial.build_side(spec)
    counter = trainer.data_collator
    assert isinstance(counter, trial.CountingCollator)
    ref = _spec("qrm", tiny_llama, tmp_path / "ref", batch=2, steps=2, warmup=0)["flags"]
    reference, _ = build_trainer(*parse_recipe([*ref, "--train_sampling_strategy", "group_by_length"]))
    assert type(counter.inner) is type(reference.data_collator)  # whatever qrm's recipe defaults give
    assert trainer.args.train_sampling_strategy == "group_by_length" and len(trainer.train_dataset) == len(rows) == 4
    trainer.train()
    assert counter.calls == 2 and counter.tokens == sum(a * b for a, b in counter.shapes) > 0


def test_no4bit_side_loads_an_unquantized_base(tiny_llama: Path, tmp_path: Path) -> None:
    import torch

    trainer, rows = trial.build_side(_spec(trial.NO4BIT, tiny_llama, tmp_path / "lora", batch=2, steps=1, warmup=0))
    names = {type(m).__name__ for m in trainer.model.modules()}
    assert "Linear4bit" not in names and isinstance(trainer.data_collator, trial.CountingCollator)
    # on CPU the compute dtype is fp32, so the 16-bit mode keeps fp32 weights (bf16 only with --device cuda)
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32} and len(rows) == 2


@pytest.mark.slow
def test_end_to_end_writes_json_and_table(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.trl_vs_qrm",
        "--backbone",
        str(tiny_llama),
        "--profile",
        "hh",
        "--device",
        "cpu",
    ]
    cmd += ["--repeats", "1", "--steps", "2", "--warmup", "1", "--batch-size", "2", "--max-length", "128"]
    cmd += ["--work-dir", str(tmp_path / "work"), "--out-dir", str(out), "--readme-table"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    files = sorted(out.glob("*.json"))
    slug = results.slug(tiny_llama.name)
    assert [f.name for f in files] == [f"{results.device_slug('cpu', results.machine_info(None))}-{slug}-hh.json"]
    rec = json.loads(files[0].read_text())
    assert {"machine", "settings", "backbone", "profile", "trials", "summary", "warnings"} <= set(rec)
    assert rec["benchmark"] == "qrm-vs-trl" and rec["settings"]["torch_threads"] == 1
    assert rec["command"].startswith("python -m benchmarks.trl_vs_qrm --backbone")
    assert rec["machine"]["cores"] > 0 and rec["machine"]["cpu"] and rec["machine"]["versions"]["trl"]
    assert {"torch", "transformers", "peft", "bitsandbytes"} <= set(rec["machine"]["versions"])
    s = rec["settings"]
    assert (s["batch_size"], s["max_length"], s["steps"], s["warmup"], s["pairs"], s["repeats"]) == (2, 128, 2, 1, 4, 1)
    assert rec["backbone"]["n_linear"] > 0 and rec["backbone"]["n_lora"] > 0

    trials = {t["side"]: t for t in rec["trials"]}
    assert sorted(trials) == ["qrm", "trl"]
    for t in trials.values():
        for key in ("seconds", "pairs_per_s", "real_tokens_per_s", "computed_tokens", "peak_memory_mib"):
            assert t[key] > 0, key
        assert t["pairs"] == 4 and t["batches"] == 2 and len(t["step_times_s"]) == 2
        assert t["computed_tokens"] == sum(a * b for a, b in t["batch_shapes"])
        assert t["flops_per_token"] > 0 and t["mfu"] is None  # no peak for a CPU
    assert trials["trl"]["data"]["fingerprint"] == trials["qrm"]["data"]["fingerprint"]  # the same pairs
    assert trials["trl"]["real_tokens"] == trials["qrm"]["real_tokens"]
    trl = trials["trl"]
    assert trl["collator"] == "DataCollatorForPreference" and trl["computed_per_unique"] >= 1.0
    assert all(shape[0] == 4 for shape in trl["batch_shapes"])  # 2 pairs -> chosen and rejected rows
    assert trl["bf16"] is trials["qrm"]["bf16"] is False
    assert trl["trainable_dtypes"] == trials["qrm"]["trainable_dtypes"] == ["torch.float32"]

    summary = rec["summary"]
    for key in ("pairs_per_s", "real_tokens_per_s", "computed_per_unique", "peak_memory_mib"):
        assert summary["trl"][key] > 0 and summary["qrm"][key] > 0 and summary["ratios"][key] > 0
    assert "| pairs/s TRL → qrm |" in proc.stdout and f"| {slug} | hh | 2 × 128 |" in proc.stdout
    readme = (out / "README.md").read_text()
    assert f"| {slug} | hh | 2 × 128 |" in readme
