"""`qrm eval --rewardbench`: RewardBench subset accuracies, section scores weighted as the rewardbench package
weights them, and the RewardBench 2 best-of-N layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import DATA, hh_rows, write_jsonl

from qrm.errors import DataError
from qrm.rewardbench import load_rewardbench, rewardbench_scores

MINI = DATA / "rewardbench_mini.jsonl"


def test_scores_equal_hand_computation() -> None:
    rows = load_rewardbench(MINI)
    # A transparent reward for the test: the number of words; responses over 100 words count as too long.
    words = lambda t: None if len(t.split()) > 100 else float(len(t.split()))  # noqa: E731
    rb = rewardbench_scores(
        [r["subset"] for r in rows],
        [words(r["chosen"]) for r in rows],
        [[words(t) for t in r["rejected"]] for r in rows],
    )
    acc = {name: g["accuracy"] for name, g in rb["subsets"].items()}
    # alpacaeval-easy 3>1, 2>1; mt-bench-med 3>1, 1<2; llmbar-natural 1<2, 3<4; mt-bench-hard 2>1, 2=2 (a tie is
    # wrong); math-prm 3>[1], 3>1; hep-python 7>[2, 3] right, 4>[3, 7] wrong (must beat every rejected); my-extra 2>1.
    assert acc == {
        "alpacaeval-easy": 1.0,
        "alpacaeval-hard": None,  # its only row was too long: skipped, counted
        "hep-python": 0.5,
        "llmbar-natural": 0.0,
        "math-prm": 1.0,
        "mt-bench-hard": 0.5,
        "mt-bench-med": 0.5,
        "my-extra": 1.0,
    }
    assert rb["subsets"]["alpacaeval-hard"]["skipped"] == 1 and rb["subsets"]["my-extra"]["section"] is None
    sections = {k: v["score"] for k, v in rb["sections"].items()}
    # Chat: (1.0 * 100 + 0.5 * 40) / (100 + 40) = 120 / 140 = 0.857143 over the scored pairs, but alpacaeval-hard's
    # pair is unscored: RewardBench scores every pair, so Chat is partial and has no section score.
    # Chat Hard: (0.0 * 100 + 0.5 * 37) / (100 + 37) = 18.5 / 137 = 0.135036.
    # Reasoning: math-prm weighs 984, as much as the six hep-* subsets of 164:
    #   (1.0 * 984 + 0.5 * 164) / (984 + 164) = 1066 / 1148 = 0.928571.
    # Safety: no subset in the file, so no section.
    assert sections == pytest.approx({"Chat": None, "Chat Hard": 0.135036496, "Reasoning": 0.928571429})
    chat = rb["sections"]["Chat"]
    assert chat["partial"] and chat["unscored"] == 1 and chat["partial_accuracy"] == pytest.approx(0.857142857)
    assert rb["sections"]["Chat"]["subsets"] == ["alpacaeval-easy", "mt-bench-med"]
    # A partial section makes the overall score no RewardBench score either.
    assert rb["score"] is None and rb["partial_sections"] == ["Chat"]
    # Every pair scored: the overall is the mean of the three sections = (0.857143 + 0.135036 + 0.928571) / 3.
    full = rewardbench_scores(
        [r["subset"] for r in rows if r["subset"] != "alpacaeval-hard"],
        [words(r["chosen"]) for r in rows if r["subset"] != "alpacaeval-hard"],
        [[words(t) for t in r["rejected"]] for r in rows if r["subset"] != "alpacaeval-hard"],
    )
    assert full["partial_sections"] == [] and full["score"] == pytest.approx(0.640250261)


def test_no_known_subset_gives_no_score() -> None:
    rb = rewardbench_scores(["mine", "mine"], [1.0, 0.0], [[0.0], [1.0]])
    assert rb["sections"] == {} and rb["score"] is None and rb["subsets"]["mine"]["accuracy"] == 0.5


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "p", "chosen": "c", "rejected": "r"}, "row 2: missing field 'subset'"),
        ({"prompt": "p", "chosen": "c", "rejected": [], "subset": "s"}, "row 2: field 'rejected'"),
        ({"prompt": "p", "chosen": ["a", "b"], "rejected": "r", "subset": "s"}, "row 2: field 'chosen' has 2"),
        ({"prompt": 3, "chosen": "c", "rejected": "r", "subset": "s"}, "row 2: field 'prompt'"),
    ],
)
def test_bad_rows_are_named(tmp_path, row, message) -> None:
    path = write_jsonl(tmp_path / "rb.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r", "subset": "s"}, row])
    with pytest.raises(DataError, match=message):
        load_rewardbench(path)


@pytest.fixture(scope="module")
def export(tiny_llama, tmp_path_factory) -> Path:
    """The tiny Llama as a one-label classifier saved like an export, scoring with max_length 64."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    model.config.max_position_embeddings = 96  # the model's own limit, above the training max_length
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "qrm_recipe.yaml").write_text("max_length: 64\n")
    return out


def test_cli_writes_rewardbench_into_metrics_and_report(export, tmp_path) -> None:
    from qrm.evaluate import main

    data = write_jsonl(tmp_path / "hh.jsonl", hh_rows(6))
    out = tmp_path / "eval"
    argv = ["--model", str(export), "--data", str(data), "--rewardbench", str(MINI), "--out", str(out)]
    assert main(argv) == 0
    m = json.loads((out / "metrics.json").read_text())
    rb = m["rewardbench"]
    assert "accuracy" in m and set(rb) >= {"subsets", "sections", "score"}
    # Recompute every subset's accuracy from the written rewards: correct = chosen above every rejected.
    records = [json.loads(line) for line in (out / "rewardbench_rewards.jsonl").read_text().splitlines()]
    assert len(records) == 14
    by: dict[str, list[int]] = {}
    for r in records:
        if r["chosen_reward"] is None:
            continue
        by.setdefault(r["subset"], []).append(int(all(r["chosen_reward"] > x for x in r["rejected_rewards"])))
    assert {k: sum(v) / len(v) for k, v in by.items()} == {
        k: g["accuracy"] for k, g in rb["subsets"].items() if g["accuracy"] is not None
    }
    # Every pair scored, as RewardBench scores them: fitted to the model's 96 positions (above max_length 64); the
    # 300-word response alone does not fit, so it keeps its last 96 tokens and is counted.
    assert all(r["chosen_reward"] is not None and None not in r["rejected_rewards"] for r in records)
    assert rb["fit"] == {"max_length": 96, "training_max_length": 64, "rows_prompt_cut": 0, "rows_response_cut": 1}
    assert rb["subsets"]["alpacaeval-hard"]["skipped"] == 0 and rb["subsets"]["alpacaeval-hard"]["response_cut"] == 1
    assert rb["partial_sections"] == [] and rb["score"] is not None
    report = (out / "report.md").read_text()
    assert "## RewardBench" in report and "| Chat Hard |" in report and "| hep-python |" in report
    assert "1 a response cut to its last tokens" in report
    # Alone (no --data), the RewardBench scores are the report.
    out2 = tmp_path / "eval2"
    assert main(["--model", str(export), "--rewardbench", str(MINI), "--out", str(out2)]) == 0
    assert json.loads((out2 / "metrics.json").read_text())["rewardbench"]["score"] == rb["score"]


def test_cli_names_a_bad_row_before_loading_the_model(export, tmp_path, capsys) -> None:
    from qrm.evaluate import main

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "c", "subset": "s"}])
    assert main(["--model", str(export), "--rewardbench", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "row 1: missing field 'rejected'" in capsys.readouterr().err


def test_long_prompt_is_cut_from_the_left_as_in_training(export, tmp_path) -> None:
    """A pair over the position limit keeps both responses whole and loses the prompt's start, as training does;
    its rewards equal `RewardModel` scoring the kept prompt tail."""
    from qrm.reward_model import RewardModel, tokenize_responses
    from qrm.rewardbench import evaluate_rewardbench

    rm = RewardModel.from_pretrained(export, device="cpu")
    prompt = " ".join(hh_rows(1)[0]["chosen"].split()[:150])
    path = write_jsonl(tmp_path / "rb.jsonl", [
        {"prompt": prompt, "chosen": "Yes, gladly.", "rejected": "No.", "subset": "llmbar-natural"},
        {"prompt": "Hi?", "chosen": "Hello there.", "rejected": "Go away.", "subset": "llmbar-natural"},
    ])  # fmt: skip
    rb, records = evaluate_rewardbench(rm, path)
    assert rb["fit"]["rows_prompt_cut"] == 1 and rb["subsets"]["llmbar-natural"]["prompt_cut"] == 1
    assert [r["prompt_cut"] for r in records] == [True, False] and rb["sections"]["Chat Hard"]["score"] is not None
    from qrm.rewardbench import conversation_texts

    head, tail = conversation_texts(prompt, "Yes, gladly.", rm.tokenizer)
    ids = tokenize_responses(rm.tokenizer, [head], [tail], 96)[0]
    assert len(ids) == 96 and ids[0] == rm.tokenizer.bos_token_id  # BOS kept, the prompt's start cut
    assert records[0]["chosen_reward"] == pytest.approx(_score(rm, ids), abs=1e-6)


def _score(rm, ids) -> float:
    from qrm.reward_model import score_ids

    return score_ids(rm.model, [ids], rm.tokenizer.pad_token_id)[0]
