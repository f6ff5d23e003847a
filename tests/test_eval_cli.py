"""`qrm eval` end to end on a tiny trained model: numbers recomputed from the rewards it reports."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from conftest import hh_rows, write_jsonl
from test_train import ENV, _recipe

from qrm.config import parse_recipe
from qrm.train import train


def test_qrm_eval_report_matches_its_rewards(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "hh.jsonl", hh_rows(40))
    out = tmp_path / "model"
    train(*parse_recipe(_recipe(tiny_llama, out, data, "--max_steps", "3", "--bnb_4bit_compute_dtype", "float32")))
    held = write_jsonl(tmp_path / "held.jsonl", hh_rows(70)[40:])
    res = subprocess.run(
        [sys.executable, "-m", "qrm.cli", "eval", "--model", str(out), "--data", str(held), "--probes"],
        capture_output=True, text=True, env=ENV, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    report = out / "eval-held"
    metrics = json.loads((report / "metrics.json").read_text())
    rewards = [json.loads(line) for line in open(report / "rewards.jsonl")]
    margins = [r["chosen_reward"] - r["rejected_reward"] for r in rewards]
    assert metrics["n_pairs"] == len(rewards) == metrics["extra"]["data"]["kept"]
    acc = sum(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins) / len(margins)
    assert math.isclose(metrics["accuracy"], acc, abs_tol=1e-12)
    bt = sum(math.log1p(math.exp(-m)) for m in margins) / len(margins)
    assert math.isclose(metrics["bt_loss"], bt, rel_tol=1e-6)
    for png in ("reliability.png", "length_bias.png", "reward_hist.png"):
        assert (report / png).stat().st_size > 5000
    probes = metrics["extra"]["probes"]
    assert set(probes) == {"concise_vs_wrong_long", "polite_vs_sycophantic", "correct_vs_padded"}
    assert all(v["n"] >= 20 for v in probes.values())
    assert f"accuracy {metrics['accuracy']:.3f}" in res.stdout
    # A second run refuses to overwrite the report.
    again = subprocess.run(
        [sys.executable, "-m", "qrm.cli", "eval", "--model", str(out), "--data", str(held)],
        capture_output=True, text=True, env=ENV, timeout=600,
    )  # fmt: skip
    assert again.returncode == 2 and "--force" in again.stderr
