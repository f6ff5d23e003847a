"""Every format, every bad-row error, and every count of qrm.data, on real data subsets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import DATA, HH_TRAIN, ROOT, hh_rows, write_jsonl

from qrm.config import DataArguments
from qrm.data import DataReport, build_pairs, load_rows, prepare, split_implicit, tokenize_pairs
from qrm.errors import DataError


def pairs_of(path: Path, tokenizer, **kw):
    args = DataArguments(dataset=str(path), **kw)
    rows, where = load_rows(str(path))
    return build_pairs(rows, args, where, tokenizer)


# ------------------------------------------------------------------------------------------ formats


def test_implicit_hh_split_keeps_dialogue_and_counts_identical(minilm_tokenizer):
    pairs, rep = pairs_of(HH_TRAIN, minilm_tokenizer)
    assert rep.format == "implicit" and "auto" in rep.detected
    assert rep.rows == 1800 and rep.skipped["identical"] == 1 and rep.pairs == 1799
    raw = hh_rows(5)
    for pair, row in zip(pairs, raw, strict=False):
        assert pair["prompt"].endswith("\n\nAssistant:")
        assert pair["prompt"] + pair["chosen"] == row["chosen"]
        assert pair["prompt"] + pair["rejected"] == row["rejected"]


def test_split_implicit_without_markers_cuts_at_word_boundary():
    p, c, r = split_implicit("Q: the answer is blue", "Q: the answer is black")
    assert (p, c, r) == ("Q: the answer is ", "blue", "black")


def test_explicit_with_renamed_columns_and_margin(tmp_path, minilm_tokenizer):
    path = write_jsonl(
        tmp_path / "x.jsonl",
        [{"q": "2+2?", "good": "4", "bad": "5", "m": 1.5}, {"q": "Sky?", "good": "blue", "bad": "green", "m": 0}],
    )
    pairs, rep = pairs_of(
        path,
        minilm_tokenizer,
        dataset_format="explicit",
        prompt_column="q",
        chosen_column="good",
        rejected_column="bad",
        margin_column="m",
    )
    assert rep.pairs == 2
    assert pairs[0] == {"prompt": "2+2?", "chosen": "4", "rejected": "5", "margin": 1.5, "row": 1}


def test_conversational_explicit_and_implicit_render_plain_template(tmp_path, minilm_tokenizer):
    u = {"role": "user", "content": "Hi there"}
    rows = [
        {
            "prompt": [u],
            "chosen": [{"role": "assistant", "content": "Hello!"}],
            "rejected": [{"role": "assistant", "content": "Go away."}],
        },
        {
            "chosen": [u, {"role": "assistant", "content": "Hello!"}],
            "rejected": [u, {"role": "assistant", "content": "No."}],
        },
    ]
    for k, row in enumerate(rows):
        path = write_jsonl(tmp_path / f"c{k}.jsonl", [row])
        pairs, rep = pairs_of(path, minilm_tokenizer)
        assert rep.format == "conversational"
        # BERT has no chat template: the documented plain HH layout is used.
        assert pairs[0]["prompt"] == "\n\nHuman: Hi there\n\nAssistant:"
        assert pairs[0]["chosen"] == " Hello!"


def test_conversational_uses_chat_template_when_present(tmp_path, tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}</s>{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    row = {
        "prompt": [{"role": "user", "content": "Hi"}],
        "chosen": [{"role": "assistant", "content": "Yo"}],
        "rejected": [{"role": "assistant", "content": "No"}],
    }
    pairs, _ = pairs_of(write_jsonl(tmp_path / "t.jsonl", [row]), tok)
    assert pairs[0]["prompt"] == "<user>Hi</s><assistant>"
    assert pairs[0]["chosen"] == "Yo</s>"


def test_sharegpt_real_subset(minilm_tokenizer):
    pairs, rep = pairs_of(DATA / "sharegpt_dpo_en_demo.json", minilm_tokenizer)
    assert rep.format == "sharegpt" and rep.rows == 40 and rep.pairs + sum(rep.skipped.values()) == 40
    raw = json.loads((DATA / "sharegpt_dpo_en_demo.json").read_text())
    assert raw[0]["chosen"]["value"] in pairs[0]["chosen"]
    assert raw[0]["conversations"][-1]["value"] in pairs[0]["prompt"]


def test_graded_preferences_map_to_margins_and_count_ties(minilm_tokenizer):
    pairs, rep = pairs_of(DATA / "tulu1_graded.jsonl", minilm_tokenizer, slightly_better_margin=0.25)
    raw = [json.loads(line) for line in open(DATA / "tulu1_graded.jsonl")]
    labels = [r["preference"] for r in raw]
    assert rep.skipped["tie"] == labels.count("tie")
    assert rep.pairs == sum(lab not in ("tie", None) for lab in labels)
    first = next(i for i, r in enumerate(raw) if r["preference"] == "b-is-slightly-better")
    pair = next(p for p in pairs if p["row"] == first + 1)
    assert pair["chosen"] == raw[first]["completion_b"] and pair["margin"] == 0.25


def test_ratings_best_vs_worst_with_min_gap(minilm_tokenizer):
    import csv

    rows = list(csv.DictReader(open(DATA / "tulu2_ratings.csv")))
    pairs, rep = pairs_of(DATA / "tulu2_ratings.csv", minilm_tokenizer, min_score_gap=1.0)
    assert rep.format == "ratings"
    by_q: dict[str, list] = {}
    for r in rows:
        by_q.setdefault(r["question"], []).append((float(r["feedback"]), r["answer"]))
    expected = {q for q, a in by_q.items() if max(a)[0] - min(a)[0] >= 1.0}
    assert rep.pairs == len(expected) and rep.skipped["score gap"] == len(by_q) - len(expected)
    for p in pairs:
        scores = dict((a, s) for s, a in by_q[p["prompt"]])
        assert scores[p["chosen"]] == max(s for s, _ in by_q[p["prompt"]])
        assert scores[p["rejected"]] == min(s for s, _ in by_q[p["prompt"]])


def test_csv_and_parquet_load(tmp_path, minilm_tokenizer):
    import datasets

    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}] * 3
    datasets.Dataset.from_list(rows).to_parquet(tmp_path / "x.parquet")
    datasets.Dataset.from_list(rows).to_csv(tmp_path / "x.csv", index=False)
    for name in ("x.parquet", "x.csv"):
        assert pairs_of(tmp_path / name, minilm_tokenizer)[1].pairs == 3


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "p", "chosen": "c"}, "row 2: field 'rejected' is missing or null"),
        ({"prompt": "p", "chosen": None, "rejected": "r"}, "row 2: field 'chosen' is missing or null"),
        ({"prompt": "p", "chosen": "c", "rejected": "   "}, "row 2: field 'rejected' is empty"),
    ],
)
def test_bad_rows_name_file_row_field(tmp_path, minilm_tokenizer, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"}, row])
    with pytest.raises(DataError, match=rf"bad\.jsonl: {message}"):
        pairs_of(path, minilm_tokenizer, dataset_format="explicit")


def test_non_string_field_named_even_when_arrow_cannot_load(tmp_path, minilm_tokenizer):
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [{"prompt": "p", "chosen": "c", "rejected": "r"}, {"prompt": "p", "chosen": ["x"], "rejected": "r"}],
    )
    with pytest.raises(DataError, match=r"mixed\.jsonl: row 2: field 'chosen'"):
        pairs_of(path, minilm_tokenizer, dataset_format="explicit")


def test_non_string_field_of_consistent_type(tmp_path, minilm_tokenizer):
    path = write_jsonl(tmp_path / "num.jsonl", [{"prompt": "p", "chosen": 1, "rejected": 2}])
    with pytest.raises(DataError, match=r"num\.jsonl: row 1: field 'chosen' must be a string, got int"):
        pairs_of(path, minilm_tokenizer, dataset_format="explicit")


def test_malformed_messages(tmp_path, minilm_tokenizer):
    row = {
        "prompt": [{"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant"}],
        "rejected": [{"role": "assistant", "content": "x"}],
    }
    path = write_jsonl(tmp_path / "msg.jsonl", [row])
    with pytest.raises(
        DataError, match=r"msg\.jsonl: row 1: field 'chosen' message 1 must be an object with 'role' and 'content'"
    ):
        pairs_of(path, minilm_tokenizer)


def test_unknown_grade_and_bad_margin(tmp_path, minilm_tokenizer):
    g = write_jsonl(
        tmp_path / "g.jsonl", [{"prompt": "p", "completion_a": "a", "completion_b": "b", "preference": "a-wins"}]
    )
    with pytest.raises(DataError, match=r"g\.jsonl: row 1: field 'preference' has unknown label 'a-wins'"):
        pairs_of(g, minilm_tokenizer)
    m = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r", "margin": "big"}])
    with pytest.raises(DataError, match=r"m\.jsonl: row 1: field 'margin' must be a number"):
        pairs_of(m, minilm_tokenizer, margin_column="margin")


def test_no_pair_left_is_an_error(tmp_path, minilm_tokenizer):
    path = write_jsonl(tmp_path / "same.jsonl", [{"prompt": "p", "chosen": "x", "rejected": "x"}] * 3)
    with pytest.raises(DataError, match=r"no usable pair left.*'identical': 3"):
        pairs_of(path, minilm_tokenizer)


def test_missing_file_and_bad_suffix(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_rows(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unsupported file type"):
        load_rows(str(tmp_path / "x.txt"))


# ------------------------------------------------------------------------------------------ tokenization


def test_left_truncation_keeps_responses_and_counts(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    long_prompt = " ".join(f"word{i}" for i in range(400))
    pairs = [
        {"prompt": long_prompt, "chosen": " short answer", "rejected": " other answer"},
        {"prompt": "hi", "chosen": " fine", "rejected": " " + "very long " * 200},
        {"prompt": "hi", "chosen": " a", "rejected": " b"},
    ]
    rep = DataReport(source="t")
    rows = tokenize_pairs(pairs, tok, 64, rep)
    assert rep.truncated_prompts == 1 and rep.dropped_too_long == 1 and rep.tokenized == 2
    first = rows[0]
    assert len(first["chosen_ids"]) <= 64 and len(first["rejected_ids"]) <= 64
    assert first["chosen_ids"][0] == tok.bos_token_id and first["chosen_ids"][-1] == tok.eos_token_id
    answer = tok(" short answer", add_special_tokens=False)["input_ids"]
    assert first["chosen_ids"][-1 - len(answer) : -1] == answer
    # The kept prompt is the END of the original prompt.
    kept = first["chosen_ids"][1 : first["prompt_len"]]
    assert tok.decode(kept).strip().endswith("word399")
    assert first["chosen_ids"][: first["prompt_len"]] == first["rejected_ids"][: first["prompt_len"]]


def test_prepare_counts_match_and_eval_fraction_is_seeded(minilm_tokenizer):
    args = DataArguments(dataset=str(HH_TRAIN), eval_fraction=0.1, max_pairs=300)
    a = prepare(args, minilm_tokenizer, 128)
    b = prepare(args, minilm_tokenizer, 128)
    rep = a.reports[0]
    assert [r["row"] for r in a.eval] == [r["row"] for r in b.eval]
    assert len(a.eval) + a.reports[1].dropped_too_long == 180
    assert rep.pairs == 300 and len(a.train) == 300 - rep.dropped_too_long
    assert not {r["row"] for r in a.train} & {r["row"] for r in a.eval}
    assert "Data: every row accounted for" in a.summary()


# ------------------------------------------------------------------------------------------ meaning checks


def test_duplicates_are_counted_and_kept(tmp_path, minilm_tokenizer):
    row = {"prompt": "p", "chosen": "good", "rejected": "bad"}
    path = write_jsonl(tmp_path / "d.jsonl", [row, {**row, "chosen": "fine"}, row, row])
    pairs, rep = pairs_of(path, minilm_tokenizer)
    assert len(pairs) == 4 and rep.duplicates == 2
    assert rep.as_dict()["duplicate_pairs"] == 2 and any("duplicate pairs (kept)  2" in x for x in rep.lines())


def test_bad_implicit_rows_are_errors_or_counted_drops(tmp_path, minilm_tokenizer):
    hh = "\n\nHuman: {h}\n\nAssistant: {a}"
    rows = [
        {"chosen": hh.format(h="Hi", a="Hello"), "rejected": hh.format(h="Hi", a="Go away")},  # fine
        {"chosen": "Alpha beta", "rejected": "Gamma"},  # no shared prompt
        {"chosen": hh.format(h="Hi", a="a") + hh.format(h="Q", a="x"), "rejected": hh.format(h="Hi", a="b") + "y"},
        {"chosen": "The answer is blue", "rejected": "The answer is blue and green"},  # empty chosen response
        {"chosen": hh.format(h="Hi", a="Sure"), "rejected": hh.format(h="Hi", a="")},  # a real empty HH reply
    ]
    path = write_jsonl(tmp_path / "i.jsonl", rows)
    with pytest.raises(DataError, match=r"i\.jsonl: row 2: chosen and rejected share no common start"):
        pairs_of(path, minilm_tokenizer)
    pairs, rep = pairs_of(path, minilm_tokenizer, drop_bad_implicit_pairs=True)
    assert [p["row"] for p in pairs] == [1, 5] and pairs[1]["rejected"] == " "
    assert dict(rep.skipped) == {
        "implicit: no shared prompt": 1,
        "implicit: differing turn": 1,
        "implicit: empty response": 1,
    }


def test_eval_fraction_that_leaves_no_training_pair(tmp_path, minilm_tokenizer):
    path = write_jsonl(tmp_path / "one.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match="leaves no training pair"):
        prepare(DataArguments(dataset=str(path), eval_fraction=0.5), minilm_tokenizer, 64)


def test_demo_recipe_data_prep_prints_no_sequence_length_warning(monkeypatch):
    """`qrm train` on the demo MiniLM recipe: HH prompts run past MiniLM's 512 positions before qrm cuts them to
    max_length, and transformers' "longer than the specified maximum sequence length" warning must not show."""
    import logging

    from qrm.config import parse_recipe
    from qrm.model import load_tokenizer

    monkeypatch.chdir(ROOT)  # the recipe names its data relative to the checkout
    margs, _, dargs, targs = parse_recipe(["--recipe", str(ROOT / "recipes" / "demo" / "minilm_hh_helpful.yaml")])
    tok = load_tokenizer(margs)  # a fresh tokenizer: transformers warns once per instance
    # transformers' loggers print through their own handler, not the root logger: listen where they print.
    seen: list[str] = []
    listener = logging.Handler()
    listener.emit = lambda record: seen.append(record.getMessage())
    logging.getLogger("transformers").addHandler(listener)
    try:
        prepared = prepare(dargs, tok, targs.max_length)
        assert prepared.reports[0].truncated_prompts > 0  # prompts longer than max_length were there, and were cut
        assert max(len(r["chosen_ids"]) for r in prepared.train) <= targs.max_length
        assert not [m for m in seen if "maximum sequence length" in m]
        # The same tokenizer, called plainly on one long prompt, does warn: the check above can see the warning.
        tok(prepared.train[0]["prompt"] * 40)
        assert [m for m in seen if "maximum sequence length" in m]
    finally:
        logging.getLogger("transformers").removeHandler(listener)
