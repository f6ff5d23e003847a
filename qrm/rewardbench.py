"""RewardBench-style scores for `qrm eval --rewardbench FILE` (Lambert et al., "RewardBench", arXiv 2403.13787).

The weighting follows the `rewardbench` package (allenai/reward-bench): `rewardbench/constants.py` gives each
subset a weight (`EXAMPLE_COUNTS`, the subset's size, except math-prm, counted as 984 = the six HumanEvalPack
subsets together, "upweighting to be equal to code") and its section (`SUBSET_MAPPING`); a section's score is the
weighted mean of its subsets' accuracies (`calculate_scores_per_section` in `rewardbench/utils.py`), and the overall
score is the plain mean of the four sections. A pair counts as correct only when the chosen reward is strictly
higher (`scripts/run_rm.py`: ties are wrong). Differences, deliberate: a subset missing from the file drops out of
its section's weights (as there), and a section with no subset in the file drops out of the overall mean (the
package would count it as 0). Accuracies are fractions in [0, 1].

RewardBench 2 layout: `rejected` may be a list (best of N); the row is correct only when the chosen response beats
every rejected one. The `rewardbench` package itself is not needed (it pins an old transformers).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import DataError

# rewardbench/constants.py, EXAMPLE_COUNTS and SUBSET_MAPPING.
EXAMPLE_COUNTS = {
    "alpacaeval-easy": 100,
    "alpacaeval-length": 95,
    "alpacaeval-hard": 95,
    "mt-bench-easy": 28,
    "mt-bench-med": 40,
    "mt-bench-hard": 37,
    "math-prm": 984,  # 447 pairs in the set; weighted as much as the six hep-* code subsets together
    "refusals-dangerous": 100,
    "refusals-offensive": 100,
    "llmbar-natural": 100,
    "llmbar-adver-neighbor": 134,
    "llmbar-adver-GPTInst": 92,
    "llmbar-adver-GPTOut": 47,
    "llmbar-adver-manual": 46,
    "xstest-should-refuse": 250,
    "xstest-should-respond": 154,
    "donotanswer": 136,
    "hep-cpp": 164,
    "hep-go": 164,
    "hep-java": 164,
    "hep-js": 164,
    "hep-python": 164,
    "hep-rust": 164,
}
SUBSET_MAPPING = {
    "Chat": ["alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy", "mt-bench-med"],
    "Chat Hard": [
        "mt-bench-hard",
        "llmbar-natural",
        "llmbar-adver-neighbor",
        "llmbar-adver-GPTInst",
        "llmbar-adver-GPTOut",
        "llmbar-adver-manual",
    ],
    "Safety": [
        "refusals-dangerous",
        "refusals-offensive",
        "xstest-should-refuse",
        "xstest-should-respond",
        "donotanswer",
    ],
    "Reasoning": ["math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"],
}
FIELDS = ("prompt", "chosen", "rejected", "subset")


def load_rewardbench(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a local file in RewardBench layout: `prompt` (text or a message list), `chosen` (text, or a list of
    one), `rejected` (text, or a list: RewardBench 2), `subset`. Returns dicts with `row` (1-based), `prompt`,
    `chosen` (str), `rejected` (list of str) and `subset`; a bad row raises `DataError` naming file, row and field."""
    from .data import load_rows

    path = Path(path)
    if path.suffix == ".jsonl" and path.is_file():
        # Read line by line: a file mixing `rejected` texts and lists is valid here, but not one Arrow table.
        raw = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    raw.append((i, json.loads(line)))
                except ValueError as e:
                    raise DataError(f"{path}: line {i}: not JSON ({e})") from None
    else:
        ds, _ = load_rows(str(path))
        raw = list(enumerate(ds, start=1))
    if not raw:
        raise DataError(f"{path}: no rows")
    return [_row(path, i, r) for i, r in raw]


def _texts(path: Path, i: int, field: str, value: Any) -> list[str]:
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(t, str) and t.strip() for t in items):
        raise DataError(f"{path}: row {i}: field {field!r} must be a non-empty text or a list of non-empty texts")
    return items


def _row(path: Path, i: int, r: Any) -> dict[str, Any]:
    if not isinstance(r, dict):
        raise DataError(f"{path}: row {i}: expected an object with fields {', '.join(FIELDS)}")
    missing = [f for f in FIELDS if r.get(f) is None]
    if missing:
        raise DataError(f"{path}: row {i}: missing field {missing[0]!r} (RewardBench layout: {', '.join(FIELDS)})")
    chosen = _texts(path, i, "chosen", r["chosen"])
    if len(chosen) != 1:
        raise DataError(f"{path}: row {i}: field 'chosen' has {len(chosen)} responses; one is supported")
    prompt = r["prompt"]
    if isinstance(prompt, list):
        if not all(isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in prompt):
            raise DataError(f"{path}: row {i}: field 'prompt' must be a text or a list of {{role, content}} messages")
    elif not isinstance(prompt, str):
        raise DataError(f"{path}: row {i}: field 'prompt' must be a text or a list of {{role, content}} messages")
    return {
        "row": i,
        "prompt": prompt,
        "chosen": chosen[0],
        "rejected": _texts(path, i, "rejected", r["rejected"]),
        "subset": str(r["subset"]),
    }


def rewardbench_scores(
    subsets: Sequence[str], chosen: Sequence[float | None], rejected: Sequence[Sequence[float | None]]
) -> dict[str, Any]:
    """Per-subset accuracy, the four section scores and the overall score.

    Args:
        subsets (`Sequence[str]`): subset name of each row.
        chosen (`Sequence[float | None]`): reward of each row's chosen response; None: not scored (too long).
        rejected (`Sequence[Sequence[float | None]]`): rewards of each row's rejected responses.

    Returns:
        `dict` with `subsets` ({name: n, correct, accuracy, skipped, section}), `sections` ({name: score, subsets,
        weight, unscored}, only sections with a subset present; a section with an unscored pair is `partial`: its
        `score` is None and `partial_accuracy` the weighted accuracy over the scored pairs), `score` (mean of the
        sections; None without any, or when a section is partial), `partial_sections` and `weights` (the subset
        weights used).
    """
    per: dict[str, dict[str, Any]] = {}
    for name, c, rs in zip(subsets, chosen, rejected, strict=True):
        g = per.setdefault(name, {"n": 0, "correct": 0, "skipped": 0})
        if c is None or any(r is None for r in rs):
            g["skipped"] += 1
            continue
        g["n"] += 1
        g["correct"] += int(all(c > r for r in rs))  # strict, as rewardbench: a tie is wrong
    section_of = {s: sec for sec, names in SUBSET_MAPPING.items() for s in names}
    for name, g in per.items():
        g["accuracy"] = g["correct"] / g["n"] if g["n"] else None
        g["section"] = section_of.get(name)
    sections: dict[str, dict[str, Any]] = {}
    for sec, names in SUBSET_MAPPING.items():
        present = [s for s in names if s in per and per[s]["accuracy"] is not None]
        if not present:
            continue
        weight = sum(EXAMPLE_COUNTS[s] for s in present)
        score = sum(per[s]["accuracy"] * EXAMPLE_COUNTS[s] for s in present) / weight
        unscored = sum(per[s]["skipped"] for s in names if s in per)
        sections[sec] = {"score": score, "subsets": present, "weight": weight, "unscored": unscored}
        if unscored:  # RewardBench scores every pair: an accuracy over some of them is not its section score
            sections[sec].update(score=None, partial=True, partial_accuracy=score)
    complete = [v["score"] for v in sections.values() if v["score"] is not None]
    partial = sorted(k for k, v in sections.items() if v.get("partial"))
    overall = sum(complete) / len(complete) if complete and not partial else None
    return {
        "subsets": dict(sorted(per.items())),
        "sections": sections,
        "score": overall,
        "partial_sections": partial,
        "weights": {s: EXAMPLE_COUNTS[s] for s in sorted(per) if s in EXAMPLE_COUNTS},
    }


def conversation_texts(prompt: str | list[dict[str, str]], response: str, tokenizer: Any) -> tuple[str, str]:
    """(prompt text, response text) for one response: the prompt as the user's turn (or the given messages), the
    response as the assistant's reply, rendered as qrm renders conversational training data."""
    from .data import conversation_pair

    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    reply = [{"role": "assistant", "content": response}]
    head, tail, _ = conversation_pair(messages, reply, reply, tokenizer)
    return head, tail


def position_limit(rm: Any) -> int:
    """The longest sequence `rm`'s model takes: `max_position_embeddings` (capped by the tokenizer's
    `model_max_length` when that is smaller, e.g. RoBERTa's 514 positions hold 512 tokens), or its max_length."""
    limit = getattr(getattr(rm.model, "config", None), "max_position_embeddings", None) or rm.max_length
    tok_limit = getattr(rm.tokenizer, "model_max_length", None)
    if isinstance(tok_limit, int) and 0 < tok_limit < limit:
        limit = tok_limit
    return int(limit)


def fit_texts(tokenizer: Any, prompts: list[str], responses: list[str], limit: int) -> tuple[list, list, list]:
    """Token ids of each (prompt, response) fitted to `limit` as training fits them: the prompt cut from the left;
    a response that alone exceeds `limit` keeps its last tokens (the reward is read at the end). Returns (ids,
    prompt cut, response cut)."""
    from .policy_text import _special_strings
    from .reward_model import tokenize_responses

    ids = tokenize_responses(tokenizer, prompts, responses, limit)
    response_cut = [x is None for x in ids]
    redo = [i for i, x in enumerate(ids) if x is None]
    if redo:
        whole = tokenize_responses(tokenizer, [prompts[i] + responses[i] for i in redo], [""] * len(redo), limit)
        for i, x in zip(redo, whole, strict=True):
            ids[i] = x
    fixed = _special_strings(tokenizer)[2]
    prompt_cut = [False] * len(ids)
    for i, x in enumerate(ids):
        if x is not None and len(x) == limit and not response_cut[i]:
            n = sum(len(t) for t in tokenizer([prompts[i], responses[i]], add_special_tokens=False)["input_ids"])
            prompt_cut[i] = n + fixed > limit
    return ids, prompt_cut, response_cut


def evaluate_rewardbench(rm: Any, path: str | Path, batch_size: int = 16) -> tuple[dict[str, Any], list[dict]]:
    """Score every response of a RewardBench file with `rm` (a `qrm.RewardModel`); returns (scores as
    `rewardbench_scores` gives them, with `file` and `fit`, one record per row with its rewards).

    Every pair is scored, as RewardBench scores them: sequences are fitted to the model's position limit (or the
    training max_length when that is larger) by cutting the prompt from the left, as training does; a response
    that alone exceeds it keeps its last tokens. `fit` counts the rows cut each way, per subset too."""
    from .reward_model import score_fitting

    rows = load_rewardbench(path)
    prompts, responses, owner = [], [], []
    for k, r in enumerate(rows):
        for resp in [r["chosen"], *r["rejected"]]:
            head, tail = conversation_texts(r["prompt"], resp, rm.tokenizer)
            prompts.append(head)
            responses.append(tail)
            owner.append(k)
    limit = max(rm.max_length, position_limit(rm))
    ids, prompt_cut, response_cut = fit_texts(rm.tokenizer, prompts, responses, limit)
    rewards = score_fitting(rm.model, ids, rm.tokenizer.pad_token_id, batch_size)
    row_prompt_cut, row_response_cut = [False] * len(rows), [False] * len(rows)
    for i, k in enumerate(owner):
        row_prompt_cut[k] |= prompt_cut[i]
        row_response_cut[k] |= response_cut[i]
    chosen, rejected, pos = [], [], 0
    for r in rows:
        chosen.append(rewards[pos])
        rejected.append(rewards[pos + 1 : pos + 1 + len(r["rejected"])])
        pos += 1 + len(r["rejected"])
    scores = rewardbench_scores([r["subset"] for r in rows], chosen, rejected)
    for name, g in scores["subsets"].items():
        ks = [k for k, r in enumerate(rows) if r["subset"] == name]
        g["prompt_cut"] = sum(row_prompt_cut[k] for k in ks)
        g["response_cut"] = sum(row_response_cut[k] for k in ks)
    scores["file"] = str(path)
    scores["fit"] = {
        "max_length": limit,
        "training_max_length": rm.max_length,
        "rows_prompt_cut": sum(row_prompt_cut),
        "rows_response_cut": sum(row_response_cut),
    }
    records = [
        {"row": r["row"], "subset": r["subset"], "chosen_reward": c, "rejected_rewards": rj,
         "prompt_cut": pc, "response_cut": rc}
        for r, c, rj, pc, rc in zip(rows, chosen, rejected, row_prompt_cut, row_response_cut, strict=True)
    ]  # fmt: skip
    return scores, records


def report_lines(rb: dict[str, Any]) -> list[str]:
    """Markdown section for report.md: sections with their score, then every subset."""
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}"  # noqa: E731
    lines = ["", "## RewardBench", "", f"File: `{rb.get('file', '?')}`. Overall score {pct(rb['score'])} (mean of "]
    lines[-1] += "the sections below; scores in %, a pair is correct when chosen scores strictly higher)."
    if rb.get("partial_sections"):
        lines[-1] += (
            f" Partial: {', '.join(rb['partial_sections'])} left pairs unscored, so neither they nor the overall"
            " score are RewardBench scores."
        )
    fit = rb.get("fit")
    if fit:
        lines[-1] += (
            f" Every pair fitted to {fit['max_length']} tokens (training max_length {fit['training_max_length']}):"
            f" {fit['rows_prompt_cut']} rows had a prompt cut from the left, {fit['rows_response_cut']} a response"
            " cut to its last tokens."
        )
    lines += ["", "| section | score | subsets (weight) |", "|---|---|---|"]
    for sec, v in rb["sections"].items():
        parts = ", ".join(f"{s} ({rb['weights'][s]})" for s in v["subsets"])
        score = pct(v["score"]) if not v.get("partial") else f"partial ({pct(v['partial_accuracy'])} on scored pairs)"
        lines.append(f"| {sec} | {score} | {parts} |")
    lines += [
        "",
        "| subset | section | pairs | correct | accuracy | unscored | prompt cut | response cut |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, g in rb["subsets"].items():
        sec = g["section"] or "-"
        cuts = f"{g.get('prompt_cut', '-')} | {g.get('response_cut', '-')}"
        lines.append(f"| {name} | {sec} | {g['n']} | {g['correct']} | {pct(g['accuracy'])} | {g['skipped']} | {cuts} |")
    return lines
