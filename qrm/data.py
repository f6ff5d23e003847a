"""Preference data: load any supported format, validate every row, build (prompt, chosen, rejected) pairs,
tokenize them with left-truncation of the prompt, and count everything that was changed or left out."""

from __future__ import annotations

import logging
import math
import os
import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .config import DataArguments
from .data_files import LOCAL_SUFFIXES, check_text_file, load_rows  # noqa: F401 - public here too
from .errors import DataError
from .formats import (  # noqa: F401 - public here too
    check_declared_format,
    check_rows_share_format,
    detect_format,
    format_needs,
    present_fields,
)

logger = logging.getLogger(__name__)

ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "system": "system",
}
# Plain template for conversations when the tokenizer has none (BERT encoders, base decoders): the HH-RLHF layout,
# so conversational and implicit-prompt data render the same way.
PLAIN_ROLE_NAMES = {"system": "System", "user": "Human", "assistant": "Assistant"}
HH_ASSISTANT = "\n\nAssistant:"
PLAIN_SPACES = (" ", "\n", "\t", "\r")  # a content starting with one of these gets no space after its role marker
HH_HUMAN = "\n\nHuman:"
GRADED_LABELS = {
    "a-is-better": ("a", "better"),
    "a-is-slightly-better": ("a", "slightly"),
    "b-is-better": ("b", "better"),
    "b-is-slightly-better": ("b", "slightly"),
}


@dataclass
class DataReport:
    """What happened to every row on its way to a training pair."""

    source: str
    format: str = ""
    detected: str = ""
    rows: int = 0
    pairs: int = 0
    skipped: Counter = field(default_factory=Counter)
    truncated_prompts: int = 0
    truncated_prompt_tokens: int = 0
    dropped_too_long: int = 0
    tokenized: int = 0
    split: str = ""
    duplicates: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "format": self.format,
            "detected": self.detected,
            "rows": self.rows,
            "pairs": self.pairs,
            "skipped": dict(self.skipped),
            "truncated_prompts": self.truncated_prompts,
            "truncated_prompt_tokens": self.truncated_prompt_tokens,
            "dropped_too_long": self.dropped_too_long,
            "kept": self.tokenized,
            "split": self.split,
            "duplicate_pairs": self.duplicates,
        }

    def lines(self) -> list[str]:
        out = [
            f"{self.source}: {self.rows} rows read as {self.format}{' (' + self.detected + ')' if self.detected else ''}"
        ]
        out.append(f"  pairs formed           {self.pairs}")
        if self.split:
            out.append(f"  split: {self.split}")
        for reason, n in sorted(self.skipped.items()):
            out.append(f"  skipped: {reason:<14} {n}")
        out.append(
            f"  prompt truncated (left) {self.truncated_prompts} pairs, {self.truncated_prompt_tokens} tokens removed"
        )
        out.append(f"  dropped: responses alone exceed max_length {self.dropped_too_long}")
        out.append(f"  kept for training/eval {self.tokenized}")
        if self.duplicates:
            out.append(
                f"  duplicate pairs (kept)  {self.duplicates}: same prompt, chosen and rejected as an earlier row"
            )
        return out


# ----------------------------------------------------------------------------------------------- formats


def _text(row: dict[str, Any], col: str, where: str, i: int, allow_empty: bool = False) -> str:
    if col not in row:
        raise DataError(f"{where}: row {i}: missing field {col!r}")
    v = row[col]
    if v is None:
        # datasets fills a key absent from one JSON row with null, so the two cannot be told apart here.
        raise DataError(f"{where}: row {i}: field {col!r} is missing or null")
    if not isinstance(v, str):
        raise DataError(f"{where}: row {i}: field {col!r} must be a string, got {type(v).__name__}")
    if not allow_empty and not v.strip():
        raise DataError(f"{where}: row {i}: field {col!r} is empty")
    return v


def _number(row: dict[str, Any], col: str, where: str, i: int) -> float:
    if col not in row:
        raise DataError(f"{where}: row {i}: missing field {col!r}")
    v = row[col]
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            raise DataError(f"{where}: row {i}: field {col!r} must be a number, got {v!r}") from None
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise DataError(f"{where}: row {i}: field {col!r} must be a finite number, got {v!r}")
    return float(v)


def _messages(value: Any, col: str, where: str, i: int, sharegpt: bool = False) -> list[dict[str, str]]:
    """Validate a message list ({role, content} or ShareGPT {from, value}) and normalise it to role/content."""
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: row {i}: field {col!r} must be a non-empty list of messages")
    out = []
    rk, ck = ("from", "value") if sharegpt else ("role", "content")
    for j, m in enumerate(value, start=1):  # 1-based, as rows are
        if not isinstance(m, dict) or rk not in m or ck not in m:
            raise DataError(f"{where}: row {i}: field {col!r} message {j} must be an object with {rk!r} and {ck!r}")
        role = ROLE_ALIASES.get(str(m[rk]).lower())
        if role is None:
            raise DataError(f"{where}: row {i}: field {col!r} message {j} has unknown role {m[rk]!r}")
        if not isinstance(m[ck], str) or not m[ck].strip():
            raise DataError(f"{where}: row {i}: field {col!r} message {j} has empty or non-string {ck!r}")
        out.append({"role": role, "content": m[ck]})
    return out


def split_implicit(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split two full texts into (shared prompt, chosen response, rejected response).

    The prompt ends at the last `\\n\\nAssistant:` inside the common prefix (HH-RLHF), else at the last whitespace
    of the common prefix, so no word is cut in two."""
    n = len(os.path.commonprefix([chosen, rejected]))  # noqa: RUF071 - a character prefix, not a path
    cut = chosen.rfind(HH_ASSISTANT, 0, n)
    if cut >= 0:
        cut += len(HH_ASSISTANT)
    else:
        cut = n
        if n < len(chosen) and n < len(rejected):
            while cut > 0 and not chosen[cut - 1].isspace():
                cut -= 1
    return chosen[:cut], chosen[cut:], rejected[cut:]


def plain_turn(role: str, content: str) -> str:
    """One message in qrm's plain layout: `\\n\\n<Role>:`, one space, the content. A content that already starts
    with whitespace gets no second space, so the generation prompt (`\\n\\nAssistant:`) followed by a completion
    that starts with a space renders exactly as that completion's assistant turn."""
    sep = "" if content[:1] in PLAIN_SPACES else " "
    return f"\n\n{PLAIN_ROLE_NAMES[role]}:{sep}{content}"


def render_messages(messages: list[dict[str, str]], tokenizer: Any, add_generation_prompt: bool) -> str:
    """Render with the tokenizer's chat template, or the plain `\\n\\nHuman: ...\\n\\nAssistant: ...` layout
    (`plain_turn`)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    text = "".join(plain_turn(m["role"], m["content"]) for m in messages)
    return text + (HH_ASSISTANT if add_generation_prompt else "")


def _drop_rendered_bos(text: str, tokenizer: Any) -> str:
    """A chat template that writes `{{ bos_token }}` (Llama 3, Gemma, qrm's exported plain template) renders the BOS
    the tokenizer adds itself: drop the text copy, so the ids hold one BOS."""
    bos = getattr(tokenizer, "bos_token", None)
    if not bos or not text.startswith(bos):
        return text
    prefix, _ = special_tokens(tokenizer)
    return text[len(bos) :] if prefix[:1] == [tokenizer.bos_token_id] else text


def conversation_pair(
    prompt: list[dict[str, str]], chosen: list[dict[str, str]], rejected: list[dict[str, str]], tokenizer: Any
) -> tuple[str, str, str]:
    """Render a conversational pair as training sees it: (prompt text with the generation prompt, chosen text,
    rejected text), each response being what the full conversation adds after the prompt.

    Args:
        prompt (`list[dict]`): the earlier turns (`role`, `content`).
        chosen (`list[dict]`): the chosen assistant turn(s).
        rejected (`list[dict]`): the rejected assistant turn(s).
        tokenizer (`PreTrainedTokenizerBase`): its chat template, or qrm's plain HH layout when it has none."""
    prompt_text = render_messages(prompt, tokenizer, add_generation_prompt=True)
    out = []
    for resp in (chosen, rejected):
        full = render_messages(prompt + resp, tokenizer, add_generation_prompt=False)
        if full.startswith(prompt_text):
            out.append(full[len(prompt_text) :])
        else:  # templates that rewrite earlier turns (e.g. drop reasoning) cannot be split cleanly
            out.append(render_messages(resp, tokenizer, add_generation_prompt=False))
    if getattr(tokenizer, "chat_template", None) is None:
        # The plain layout renders "\n\nAssistant: text": drop the role marker already at the end of the prompt.
        out = [o.removeprefix(HH_ASSISTANT) for o in out]
    return _drop_rendered_bos(prompt_text, tokenizer), out[0], out[1]


def build_pairs(
    rows: Iterable[dict[str, Any]], args: DataArguments, where: str, tokenizer: Any
) -> tuple[list[dict], DataReport]:
    """Validate rows and turn them into pairs {prompt, chosen, rejected[, margin]}; raises DataError on bad rows."""
    rows = list(rows)
    report = DataReport(source=where, rows=len(rows))
    if not rows:
        raise DataError(f"{where}: the file holds no rows")
    fmt = args.dataset_format
    if fmt == "auto":
        fmt, why = detect_format(present_fields(rows[0]), rows[0], args, where)
        report.detected = f"auto: {why}"
        check_rows_share_format(rows, fmt, why, args, where)
    else:
        check_declared_format(fmt, rows[0], args, where)
    report.format = fmt
    pairs: list[dict] = []
    if fmt == "ratings":
        pairs = _ratings_pairs(rows, args, where, report)
    else:
        graded = fmt == "explicit" and (
            args.preference_column is not None
            or ({args.completion_a_column, args.completion_b_column, "preference"} <= set(rows[0]))
        )
        for i, row in enumerate(rows, start=1):
            if graded:
                pair = _graded_pair(row, args, where, i, report)
            elif fmt == "explicit":
                pair = {
                    "prompt": _text(row, args.prompt_column, where, i),
                    "chosen": _text(row, args.chosen_column, where, i),
                    "rejected": _text(row, args.rejected_column, where, i),
                }
            elif fmt == "implicit":
                pair = _implicit_pair(row, args, where, i, report)
            elif fmt in ("conversational", "sharegpt"):
                pair = _conversational_pair(row, args, where, i, fmt == "sharegpt", tokenizer)
            else:
                raise DataError(f"{where}: unknown dataset_format {fmt!r}")
            if pair is None:
                continue
            if args.margin_column:
                pair["margin"] = _number(row, args.margin_column, where, i)
            if pair["chosen"] == pair["rejected"]:
                report.skipped["identical"] += 1
                continue
            pair["row"] = i
            pairs.append(pair)
    seen: set[tuple] = set()
    for pair in pairs:
        key = (pair["prompt"], pair["chosen"], pair["rejected"], pair.get("margin"))
        report.duplicates += key in seen
        seen.add(key)
    report.pairs = len(pairs)
    if not pairs:
        raise DataError(f"{where}: no usable pair left ({report.rows} rows; skipped {dict(report.skipped)})")
    return pairs, report


def _implicit_pair(row: dict[str, Any], args: DataArguments, where: str, i: int, report: DataReport) -> dict | None:
    """Split an implicit-prompt row; a split that cannot be right is an error, or a counted drop with
    `drop_bad_implicit_pairs`."""
    chosen = _text(row, args.chosen_column, where, i)
    rejected = _text(row, args.rejected_column, where, i)
    p, c, r = split_implicit(chosen, rejected)
    problem = None
    hh = HH_HUMAN in chosen or HH_ASSISTANT in chosen
    if not p.strip():
        problem = "no shared prompt", "chosen and rejected share no common start to use as the prompt"
    elif not c or not r or (not hh and (not c.strip() or not r.strip())):
        # HH-RLHF itself has empty replies ("Assistant: " then nothing: 3 of the bundled 1,500 pairs), kept as
        # data; a text that stops at the prompt's "Assistant:" has no reply at all.
        col = args.chosen_column if not c.strip() else args.rejected_column
        problem = (
            "empty response",
            (
                f"field {col!r} is the shared prompt alone (or the start of the other text), so its response would be "
                "empty"
            ),
        )
    elif hh and not p.endswith(HH_ASSISTANT):
        problem = "differing turn", "chosen and rejected already differ inside the first Human turn"
    elif HH_HUMAN in c or HH_HUMAN in r:
        problem = "differing turn", "chosen and rejected differ in an earlier turn, not only in the last response"
    if problem is None:
        return {"prompt": p, "chosen": c, "rejected": r}
    if getattr(args, "drop_bad_implicit_pairs", False):
        report.skipped[f"implicit: {problem[0]}"] += 1
        return None
    raise DataError(
        f"{where}: row {i}: {problem[1]} (dataset_format implicit); fix the row, use explicit prompt/chosen/rejected "
        "columns, or set drop_bad_implicit_pairs: true to drop and count such rows"
    )


def _conversational_pair(
    row: dict[str, Any], args: DataArguments, where: str, i: int, sharegpt: bool, tokenizer: Any
) -> dict[str, Any]:
    if sharegpt:
        prompt = _messages(row.get(args.conversations_column), args.conversations_column, where, i, sharegpt=True)
        chosen = _messages(row.get(args.chosen_column), args.chosen_column, where, i, sharegpt=True)
        rejected = _messages(row.get(args.rejected_column), args.rejected_column, where, i, sharegpt=True)
    else:
        for col in (args.chosen_column, args.rejected_column):
            if col not in row or row[col] is None:
                raise DataError(f"{where}: row {i}: missing field {col!r}")
        chosen = _messages(row[args.chosen_column], args.chosen_column, where, i)
        rejected = _messages(row[args.rejected_column], args.rejected_column, where, i)
        if row.get(args.prompt_column) is not None:
            prompt = _messages(row[args.prompt_column], args.prompt_column, where, i)
        else:  # implicit conversational: the shared leading messages are the prompt
            k = 0
            while k < min(len(chosen), len(rejected)) - 1 and chosen[k] == rejected[k]:
                k += 1
            prompt, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
            if not prompt:
                raise DataError(f"{where}: row {i}: chosen and rejected share no leading messages to use as prompt")
    if prompt[-1]["role"] == "assistant":
        raise DataError(f"{where}: row {i}: the prompt must end with a user turn, not an assistant turn")
    for col, resp in ((args.chosen_column, chosen), (args.rejected_column, rejected)):
        if resp[0]["role"] != "assistant":
            raise DataError(f"{where}: row {i}: field {col!r} must start with an assistant message")
    p, c, r = conversation_pair(prompt, chosen, rejected, tokenizer)
    return {"prompt": p, "chosen": c, "rejected": r}


def _graded_pair(row: dict[str, Any], args: DataArguments, where: str, i: int, report: DataReport) -> dict | None:
    col = args.preference_column or "preference"
    if col not in row:
        raise DataError(f"{where}: row {i}: missing field {col!r}")
    label = row[col]
    if label is None:
        report.skipped["unlabelled"] += 1
        return None
    label = str(label).strip().lower()
    if label == "tie":
        report.skipped["tie"] += 1
        return None
    if label not in GRADED_LABELS:
        raise DataError(
            f"{where}: row {i}: field {col!r} has unknown label {label!r}; expected one of "
            f"{[*GRADED_LABELS, 'tie', None]}"
        )
    winner, strength = GRADED_LABELS[label]
    a = _text(row, args.completion_a_column, where, i)
    b = _text(row, args.completion_b_column, where, i)
    chosen, rejected = (a, b) if winner == "a" else (b, a)
    margin = args.better_margin if strength == "better" else args.slightly_better_margin
    return {
        "prompt": _text(row, args.prompt_column, where, i),
        "chosen": chosen,
        "rejected": rejected,
        "margin": margin,
    }


def _ratings_pairs(rows: list[dict[str, Any]], args: DataArguments, where: str, report: DataReport) -> list[dict]:
    """Best against worst answer of each question, when their scores differ by at least `min_score_gap`."""
    qcol = args.prompt_column if args.prompt_column in rows[0] else "question"
    by_q: dict[str, list[tuple[float, str, int]]] = {}
    for i, row in enumerate(rows, start=1):
        q = _text(row, qcol, where, i)
        a = _text(row, args.response_column, where, i)
        s = _number(row, args.score_column, where, i)
        by_q.setdefault(q, []).append((s, a, i))
    pairs = []
    for q, answers in by_q.items():
        if len(answers) < 2:
            report.skipped["single answer"] += 1
            continue
        best = max(answers, key=lambda x: x[0])
        worst = min(answers, key=lambda x: x[0])
        if best[0] - worst[0] < args.min_score_gap:
            report.skipped["score gap"] += 1
            continue
        if best[1] == worst[1]:
            report.skipped["identical"] += 1
            continue
        pairs.append({"prompt": q, "chosen": best[1], "rejected": worst[1], "row": best[2]})
    return pairs


# ----------------------------------------------------------------------------------------------- tokenization


def special_tokens(tokenizer: Any) -> tuple[list[int], list[int]]:
    """Token ids the tokenizer puts before and after a single sequence ([BOS] / [CLS] ... [SEP] / [EOS])."""
    probe = tokenizer("x", add_special_tokens=True)["input_ids"]
    core = tokenizer("x", add_special_tokens=False)["input_ids"]
    for start in range(len(probe) - len(core) + 1):
        if probe[start : start + len(core)] == core:
            return probe[:start], probe[start + len(core) :]
    return [], []


def tokenize_pairs(pairs: list[dict], tokenizer: Any, max_length: int, report: DataReport) -> list[dict]:
    """Tokenize prompt and responses separately, join them, and fit `max_length` by cutting the prompt's start.

    The reward is read at the last token, so each sequence ends with EOS (decoders) or the tokenizer's own
    closing token ([SEP] for BERT). Only a pair whose responses alone do not fit is dropped, and counted."""
    prefix, suffix = special_tokens(tokenizer)
    eos = tokenizer.eos_token_id
    closing = [] if (suffix or eos is None) else [eos]
    fixed = len(prefix) + len(suffix) + len(closing)
    # verbose=False: the pieces are fitted to max_length below, so transformers' "Token indices sequence length is
    # longer than the specified maximum sequence length" warning about an unfitted piece is noise.
    enc = lambda texts: tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]  # noqa: E731
    prompts = enc([p["prompt"] for p in pairs])
    chosen = enc([p["chosen"] for p in pairs])
    rejected = enc([p["rejected"] for p in pairs])
    out = []
    for pair, p, c, r in zip(pairs, prompts, chosen, rejected, strict=True):
        if c and c[-1] == eos:  # chat templates already close the turn with EOS
            c = c[:-1]
        if r and r[-1] == eos:
            r = r[:-1]
        budget = max_length - fixed - max(len(c), len(r))
        if budget < 0:
            report.dropped_too_long += 1
            continue
        if len(p) > budget:
            report.truncated_prompts += 1
            report.truncated_prompt_tokens += len(p) - budget
            p = p[len(p) - budget :] if budget else []
        head = prefix + p
        row = {
            "chosen_ids": head + c + closing + suffix,
            "rejected_ids": head + r + closing + suffix,
            "prompt_len": len(head),
            # Read by length-grouped sampling (train_sampling_strategy: group_by_length).
            "length": len(head) + max(len(c), len(r)) + len(closing) + len(suffix),
            # Text kept beside the ids for verification and reports; the trainer drops unused columns.
            "prompt": pair["prompt"],
            "chosen": pair["chosen"],
            "rejected": pair["rejected"],
            "row": pair.get("row", -1),
        }
        if "margin" in pair:
            row["margin"] = pair["margin"]
        out.append(row)
    report.tokenized = len(out)
    if not out:
        raise DataError(f"{report.source}: every pair's responses alone exceed max_length={max_length}")
    return out


# ----------------------------------------------------------------------------------------------- entry point


@dataclass
class PreparedData:
    train: list[dict]
    eval: list[dict] | None
    reports: list[DataReport]

    def summary(self) -> str:
        lines = ["Data: every row accounted for"]
        for r in self.reports:
            lines += r.lines()
        lines.append(f"  -> {len(self.train)} training pairs, {len(self.eval) if self.eval else 0} eval pairs")
        return "\n".join(lines)


def prepare(args: DataArguments, tokenizer: Any, max_length: int) -> PreparedData:
    """Load, validate, split and tokenize; everything that can fail on the data fails here, before the model."""
    rows, where = load_rows(args.dataset, args.dataset_split)
    pairs, report = build_pairs(rows, args, where, tokenizer)
    reports = [report]
    eval_pairs = None
    if args.eval_dataset:
        erows, ewhere = load_rows(args.eval_dataset, args.eval_dataset_split)
        eval_pairs, erep = build_pairs(erows, args, ewhere, tokenizer)
        if erep.format != report.format:
            raise DataError(
                f"{ewhere}: eval data reads as {erep.format!r} but the training data {where} as {report.format!r}; "
                "both files must be in one format (set dataset_format, or give an eval file of the same format)"
            )
        reports.append(erep)
    elif args.eval_fraction > 0:
        order = list(range(len(pairs)))
        random.Random(args.split_seed).shuffle(order)
        n_eval = max(1, round(len(pairs) * args.eval_fraction))
        held = set(order[:n_eval])
        eval_pairs = [pairs[k] for k in sorted(held)]
        pairs = [pairs[k] for k in range(len(pairs)) if k not in held]
        if not pairs:
            raise DataError(
                f"{where}: eval_fraction={args.eval_fraction} holds out {n_eval} of {n_eval} pairs and leaves no "
                "training pair; lower eval_fraction or add data"
            )
        report.pairs = len(pairs)
        report.split = f"eval_fraction={args.eval_fraction}: {n_eval} pairs held out (seed {args.split_seed})"
    if args.max_pairs is not None and len(pairs) > args.max_pairs:
        report.skipped[f"over max_pairs={args.max_pairs}"] += len(pairs) - args.max_pairs
        pairs = pairs[: args.max_pairs]
        report.pairs = len(pairs)
    train = tokenize_pairs(pairs, tokenizer, max_length, report)
    evaluation = None
    if eval_pairs is not None:
        erep = reports[1] if len(reports) > 1 else DataReport(source=f"{where} (held-out split)", rows=len(eval_pairs))
        erep.pairs = len(eval_pairs)
        if len(reports) == 1:
            erep.format = report.format
            reports.append(erep)
        evaluation = tokenize_pairs(eval_pairs, tokenizer, max_length, erep)
    return PreparedData(train=train, eval=evaluation, reports=reports)


def to_dataset(rows: list[dict]) -> Any:
    import datasets

    return datasets.Dataset.from_list(rows)
