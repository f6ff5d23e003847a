"""ODIN length-disentangled training (`length_debias: odin`): the loss, the trained heads, resume, export and eval."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import hh_rows, tiny_run_flags, write_jsonl

from qrm.config import parse_recipe
from qrm.odin import LENGTH_HEAD_FILE, length_head, length_reward, odin_objective, pearson
from qrm.train import build_trainer, train


def _recipe(model: str | Path, out: Path, data: Path, *extra: str) -> list[str]:
    return tiny_run_flags(model, out, data, "--bnb_4bit_compute_dtype", "float32", *extra, max_length=160)


def test_objective_equals_hand_computation() -> None:
    # Two pairs; responses in the order chosen 1, chosen 2, rejected 1, rejected 2.
    quality = torch.tensor([1.0, 3.0, 0.0, 2.0])
    length = torch.tensor([0.0, 0.0, 1.0, 1.0])
    n_tokens = torch.tensor([10.0, 30.0, 20.0, 40.0])
    w_q, w_l = torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 2.0]])
    out = odin_objective(quality, length, n_tokens, w_q, w_l, length_weight=0.5, ortho_weight=2.0)
    # Sums: chosen 1+0, 3+0; rejected 0+1, 2+1 -> margins 0 and 0 -> BT = log 2 = 0.693147.
    assert out["bt"].item() == pytest.approx(math.log(2), abs=1e-6)
    # Quality centred: -0.5, 1.5, -1.5, 0.5; lengths centred: -15, 5, -5, 15.
    # rho = (7.5 + 7.5 + 7.5 + 7.5) / sqrt(5 * 500) = 30 / 50 = 0.6.
    assert out["corr_quality"].item() == pytest.approx(0.6, abs=1e-6)
    # Length head centred: -0.5, -0.5, 0.5, 0.5 -> (7.5 - 2.5 - 2.5 + 7.5) / sqrt(1 * 500) = 10 / 22.3607 = 0.447214.
    assert out["corr_length"].item() == pytest.approx(0.4472136, abs=1e-6)
    # |cos([3, 4], [0, 2])| = 8 / (5 * 2) = 0.8.
    assert out["ortho"].item() == pytest.approx(0.8, abs=1e-6)
    # In reward units: rho_q^2 * std(q) - rho_l * std(l) with population stds sqrt(1.25) and 0.5, and cos^2 times
    # the norms 5 * 2: 0.693147 + 0.5 * (0.36 * 1.118034 - 0.447214 * 0.5) + 2 * 0.64 * 10 = 13.582590.
    assert out["loss"].item() == pytest.approx(13.5825898, abs=1e-5)
    # A margin of 1 and -1: BT = (log(1 + e) + log(1 + e^-1)) / 2 = (1.313262 + 0.313262) / 2 = 0.813262.
    with_margin = odin_objective(quality, length, n_tokens, w_q, w_l, margin=torch.tensor([1.0, -1.0]))
    assert with_margin["bt"].item() == pytest.approx(0.8132617, abs=1e-6)


def test_constant_lengths_give_zero_correlation_and_finite_gradients() -> None:
    # A batch whose responses all have one length must not stop the run as non-finite.
    x = torch.tensor([0.3, -0.1, 0.7, 0.2], requires_grad=True)
    rho = pearson(x, torch.full((4,), 12.0))
    rho.backward()
    assert rho.item() == 0.0 and torch.isfinite(x.grad).all()


def _independent_loss(trainer, rows: list[dict]) -> float:
    """ODIN's loss from padded, one-sequence-at-a-time rewards and numpy (not the training code path)."""
    from qrm.reward_model import score_pair_rows

    model, pad = trainer.model, trainer.processing_class.pad_token_id
    qc, qr = score_pair_rows(model, rows, pad, 1)  # the logits' first column: the quality head
    with length_reward(model):
        lc, lr = score_pair_rows(model, rows, pad, 1)
    q, ln = np.array(qc + qr), np.array(lc + lr)
    n = np.array([len(r[k]) - r["prompt_len"] for k in ("chosen_ids", "rejected_ids") for r in rows], dtype=float)
    margins = (q + ln)[: len(rows)] - (q + ln)[len(rows) :]
    bt = np.mean(np.logaddexp(0.0, -margins))
    rho_q, rho_l = np.corrcoef(q, n)[0, 1], np.corrcoef(ln, n)[0, 1]
    inner = model.get_base_model()
    wq = inner.score.modules_to_save["default"].weight.detach().double().numpy().ravel()
    wl = length_head(model).weight.detach().double().numpy().ravel()
    norms = np.linalg.norm(wq) * np.linalg.norm(wl)
    cos = abs(wq @ wl) / norms
    return float(bt + 1.0 * (rho_q**2 * q.std() - rho_l * ln.std()) + 1.0 * cos**2 * norms)


@pytest.mark.parametrize("packing", ["true", "false"])
def test_trainer_loss_on_a_fixed_batch(tiny_llama, tmp_path, packing) -> None:
    data = write_jsonl(tmp_path / "hh.jsonl", hh_rows(12))
    args = parse_recipe(_recipe(tiny_llama, tmp_path / "o", data, "--length_debias", "odin", "--packing", packing))
    trainer, prepared = build_trainer(*args)
    rows = prepared.train[:4]
    batch = trainer.data_collator([dict(r) for r in rows])
    if packing == "true":
        assert "qrm_reward_index" in batch and bool((batch["qrm_branch"] != 0).any()), "not packed with sharing"
    trainer.model.eval()  # no dropout, so both paths see one function
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch).item()
    assert loss == pytest.approx(_independent_loss(trainer, rows), abs=1e-4)


@pytest.fixture(scope="module")
def odin_run(tiny_llama, tmp_path_factory) -> dict:
    """4 ODIN steps on a tiny Llama, packed with prefix sharing, saving checkpoints at steps 2 and 4."""
    tmp = tmp_path_factory.mktemp("odin")
    data = write_jsonl(tmp / "hh.jsonl", hh_rows(30))
    extra = ("--length_debias", "odin", "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2")
    argv = _recipe(tiny_llama, tmp / "a", data, "--eval_fraction", "0.3", *extra)
    metrics = train(*parse_recipe(argv))
    return {"out": tmp / "a", "data": data, "argv": argv, "metrics": metrics, "tmp": tmp}


def test_resume_restores_the_length_head_exactly(odin_run) -> None:
    a, tmp = odin_run["out"], odin_run["tmp"]
    assert (a / "checkpoint-2" / LENGTH_HEAD_FILE).is_file() and (a / LENGTH_HEAD_FILE).is_file()
    b = tmp / "b"
    b.mkdir()
    shutil.copytree(a / "checkpoint-2", b / "checkpoint-2")
    argv = [x if x != str(a) else str(b) for x in odin_run["argv"]]
    train(*parse_recipe(argv))  # resume: auto continues from checkpoint-2
    from safetensors.torch import load_file

    for name in (LENGTH_HEAD_FILE, "adapter_model.safetensors"):
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
    head2 = load_file(str(a / "checkpoint-2" / LENGTH_HEAD_FILE))["weight"]
    assert not torch.equal(head2, load_file(str(a / LENGTH_HEAD_FILE))["weight"]), "the length head did not train"


def test_export_and_score_carry_the_quality_head_only(odin_run, tmp_path) -> None:
    from qrm import RewardModel
    from qrm.export import merge
    from qrm.odin import load_length_head

    adapter, export = odin_run["out"], tmp_path / "export"
    merge(adapter, export)
    assert not (export / LENGTH_HEAD_FILE).exists()
    assert json.loads((export / "config.json").read_text()).get("num_labels", 1) == 1
    pairs = [json.loads(line) for line in (adapter / "verify_pairs.jsonl").read_text().splitlines()]
    args = ([p["prompt"] for p in pairs], [p["chosen"] for p in pairs], [p["rejected"] for p in pairs])
    got_c, got_r = RewardModel.from_pretrained(export).score_pairs(*args)
    # verify_pairs.jsonl holds the trained model's quality-head rewards (written at the end of training).
    want = [p["chosen_reward"] for p in pairs] + [p["rejected_reward"] for p in pairs]
    np.testing.assert_allclose(got_c + got_r, want, atol=1e-4)
    rm = RewardModel.from_pretrained(adapter)
    load_length_head(rm.model, adapter)
    with length_reward(rm.model):
        len_c, len_r = rm.score_pairs(*args)
    summed = np.array(want) + np.array(len_c + len_r)
    assert np.abs(summed - np.array(got_c + got_r)).max() > 1e-3, "the export scores with the length head too"


def test_eval_reports_both_heads(odin_run, tmp_path) -> None:
    from qrm.evaluate import main

    out = tmp_path / "eval"
    assert main(["--model", str(odin_run["out"]), "--data", str(odin_run["data"]), "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["heads"]) == {"quality", "length", "sum"}
    assert m["heads"]["quality"]["accuracy"] == m["accuracy"]
    assert m["heads"]["quality"]["length_reward_spearman"] == m["length_reward_spearman"]
    assert m["heads"]["length"]["length_reward_spearman"] != m["length_reward_spearman"]
    assert "## ODIN heads" in (out / "report.md").read_text()


def test_unknown_method_is_refused_before_anything_loads(tiny_llama, tmp_path) -> None:
    from qrm.errors import RecipeError

    data = write_jsonl(tmp_path / "hh.jsonl", hh_rows(4))
    with pytest.raises(RecipeError, match="length_debias='odn' must be none, erase or odin"):
        parse_recipe(_recipe(tiny_llama, tmp_path / "o", data, "--length_debias", "odn"))
    with pytest.raises(RecipeError, match="odin_ortho_weight"):
        parse_recipe(_recipe(tiny_llama, tmp_path / "o", data, "--odin_ortho_weight", "-1"))
