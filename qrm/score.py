"""Scoring: rewards for token ids or texts, from a live model, an adapter directory or a merged export, and the
`qrm score` command (`score_file`: rewards for every row of a file)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from .files import RECIPE_FILE, is_adapter_dir

Messages = list[dict[str, Any]]
DEFAULT_MAX_LENGTH = 1024  # TrainingArguments.max_length's default; a recipe at the default omits the key


@torch.no_grad()
def score_ids(
    model: Any,
    sequences: Sequence[Sequence[int]],
    pad_token_id: int,
    batch_size: int = 16,
    progress: bool = False,
) -> list[float]:
    """Reward of each token sequence; batches are grouped by length so padding stays small.

    Args:
        model (`PreTrainedModel`): a one-label sequence classifier (export, or 4-bit base + adapter).
        sequences (`Sequence[Sequence[int]]`): token ids, each a whole (prompt, response) sequence.
        pad_token_id (`int`): the tokenizer's pad token (never EOS: the reward is read at the last non-pad token).
        batch_size (`int`, *optional*, defaults to `16`): sequences per forward pass.
        progress (`bool`, *optional*, defaults to `False`): show a progress bar.

    Returns:
        `list[float]`: one reward per sequence, in the given order; scored under the autocast training used
        (`qrm.model.autocast_for`)."""
    from .model import autocast_for  # lazily: qrm.model imports TRL (through qrm.config)

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out = [0.0] * len(sequences)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(sequences), desc="scoring", unit="seq")
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            width = max(len(sequences[i]) for i in idx)
            ids = torch.full((len(idx), width), pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                seq = torch.as_tensor(list(sequences[i]), dtype=torch.long)
                ids[row, : len(seq)] = seq
                mask[row, : len(seq)] = 1
            with autocast_for(model):
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            for row, i in enumerate(idx):
                out[i] = float(logits[row, 0].float())
            if bar is not None:
                bar.update(len(idx))
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    return out


def score_pair_rows(
    model: Any, rows: Sequence[dict], pad_token_id: int, batch_size: int = 16, progress: bool = False
) -> tuple[list, list]:
    """(chosen rewards, rejected rewards) for tokenized pair rows with `chosen_ids` / `rejected_ids`.

    Args:
        model (`PreTrainedModel`): as in `score_ids`.
        rows (`Sequence[dict]`): pair rows as `qrm.data.tokenize_pairs` returns them.
        pad_token_id (`int`): the tokenizer's pad token.
        batch_size (`int`, *optional*, defaults to `16`): sequences per forward pass.
        progress (`bool`, *optional*, defaults to `False`): show a progress bar."""
    seqs = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
    rewards = score_ids(model, seqs, pad_token_id, batch_size, progress=progress)
    return rewards[: len(rows)], rewards[len(rows) :]


def tokenize_responses(
    tokenizer: Any, prompts: Sequence[str], responses: Sequence[str], max_length: int
) -> list[list[int] | None]:
    """Token ids of each (prompt, response) exactly as training built them.

    Args:
        tokenizer (`PreTrainedTokenizerBase`): the reward model's tokenizer.
        prompts (`Sequence[str]`): prompt texts.
        responses (`Sequence[str]`): response texts, as many as `prompts`.
        max_length (`int`): training's max_length; the prompt is cut from the left to fit.

    Returns:
        `list`: token ids per pair, or None where the response alone does not fit (training drops such pairs)."""
    from .data import DataError, DataReport, tokenize_pairs

    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if not prompts:
        return []
    pairs = [
        {"prompt": p, "chosen": r, "rejected": r, "row": i}
        for i, (p, r) in enumerate(zip(prompts, responses, strict=True))
    ]
    try:
        rows = tokenize_pairs(pairs, tokenizer, max_length, DataReport(source="score"))
    except DataError:  # every response too long
        rows = []
    out: list[list[int] | None] = [None] * len(pairs)
    for row in rows:
        out[row["row"]] = row["chosen_ids"]
    return out


def read_recipe(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """(ModelArguments, raw recipe mapping) from the qrm_recipe.yaml in `path`.

    Only the model fields are rebuilt: scoring needs nothing else, and the training fields of a resolved recipe
    may hold values (redacted or placeholder strings) that a full re-parse would reject."""
    import yaml

    from .config import ModelArguments

    recipe_file = Path(path) / RECIPE_FILE
    if not recipe_file.is_file():
        raise FileNotFoundError(f"{path}: no {RECIPE_FILE}; was it written by qrm train?")
    recipe = yaml.safe_load(recipe_file.read_text()) or {}
    names = {f.name for f in fields(ModelArguments) if f.init}
    margs = ModelArguments(**{k: v for k, v in recipe.items() if k in names})
    return margs, recipe


def recipe_max_length(recipe: dict[str, Any]) -> int:
    """The max_length training tokenized with (the dataclass default when the resolved recipe omits it).

    Args:
        recipe (`dict`): the mapping `read_recipe` returns."""
    return int(recipe.get("max_length") or DEFAULT_MAX_LENGTH)


def default_device() -> str:
    """Where exports are scored: the GPU when there is one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


class RewardModel:
    """A trained reward model ready to score: `RewardModel.from_pretrained(path).score(prompt, response)`.

    `path` is an adapter directory written by `qrm train` (the 4-bit base is loaded as in training) or a merged
    export written by `qrm merge` (loaded in the dtype it was stored in, as `transformers` and vLLM load it).
    Texts are tokenized as in training: prompt and response separately, BOS/EOS added, prompt cut from the left to
    fit max_length (the recipe's, stored beside the weights)."""

    def __init__(self, model: Any, tokenizer: Any, max_length: int = DEFAULT_MAX_LENGTH):
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | None = None,
        max_length: int | None = None,
        dtype: str | torch.dtype = "auto",
    ) -> RewardModel:
        """Load an adapter dir or a merged export.

        Args:
            path (`str` or `Path`): an adapter dir (`qrm train`) or an export (`qrm merge`).
            device (`str`, *optional*, defaults to `None`): where an export runs (the GPU when there is one).
            max_length (`int`, *optional*, defaults to `None`): defaults to the training recipe's (an export
                without a recipe: the model's `max_position_embeddings`).
            dtype (`str` or `torch.dtype`, *optional*, defaults to `"auto"`): an export's weights' dtype ("auto":
                as stored).

        An adapter's 4-bit base goes where training put it (the GPU when there is one) and keeps the training
        dtypes: `device` and `dtype` apply to exports only."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = Path(path)
        if is_adapter_dir(path):
            model, tokenizer, recipe_max = load_adapter_model(path)
        else:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype)
            model.to(device or default_device())
            if (path / RECIPE_FILE).is_file():
                recipe_max = recipe_max_length(read_recipe(path)[1])
            else:
                recipe_max = int(getattr(model.config, "max_position_embeddings", DEFAULT_MAX_LENGTH))
        model.eval()
        return cls(model, tokenizer, max_length or recipe_max)

    def render(self, prompt: str | Messages, response: str | Messages) -> tuple[str, str]:
        """The (prompt, response) texts training would have built.

        Args:
            prompt (`str` or `list[dict]`):
                A prompt text, or the prompt's messages ({"role", "content"}, as TRL passes conversational prompts).
            response (`str` or `list[dict]`):
                A response text, or the completion's messages (`[{"role": "assistant", "content": ...}]`).

        Returns:
            `tuple[str, str]`: strings unchanged; conversations rendered with the tokenizer's chat template, or
            qrm's plain `\\n\\nHuman: ...\\n\\nAssistant: ...` layout without one (see `render_pair`)."""
        return render_pair(self.tokenizer, prompt, response)

    def tokenize(self, prompts: Sequence[str | Messages], responses: Sequence[str | Messages]) -> list[list[int]]:
        """Token ids as training built them (conversations rendered by `render`); raises if a response alone
        exceeds max_length."""
        prompts, responses = self.render_batch(prompts, responses)
        ids = tokenize_responses(self.tokenizer, prompts, responses, self.max_length)
        bad = [i for i, x in enumerate(ids) if x is None]
        if bad:
            raise ValueError(f"responses {bad[:10]} alone exceed max_length={self.max_length} tokens")
        return ids  # type: ignore[return-value]

    def render_batch(
        self, prompts: Sequence[str | Messages], responses: Sequence[str | Messages]
    ) -> tuple[list[str], list[str]]:
        """`render` for many pairs: (prompt texts, response texts); raises `ValueError` if the counts differ."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        if all(isinstance(x, str) for x in (*prompts, *responses)):
            return list(prompts), list(responses)  # type: ignore[arg-type]
        pairs = [self.render(p, r) for p, r in zip(prompts, responses, strict=True)]
        return [p for p, _ in pairs], [r for _, r in pairs]

    def score(self, prompt: str | Messages, response: str | Messages) -> float:
        """Reward of one response to one prompt.

        Args:
            prompt (`str` or `list[dict]`): a text, or messages as in `render`.
            response (`str` or `list[dict]`): a text, or messages as in `render`."""
        return self.score_batch([prompt], [response])[0]

    def score_batch(
        self,
        prompts: Sequence[str | Messages],
        responses: Sequence[str | Messages],
        batch_size: int = 16,
        progress: bool = False,
    ) -> list[float]:
        """Rewards of many (prompt, response) pairs, batched by length.

        Args:
            prompts (`Sequence[str | list[dict]]`): texts, or messages as in `render`.
            responses (`Sequence[str | list[dict]]`): as many texts or message lists.
            batch_size (`int`, *optional*, defaults to `16`): sequences per forward pass.
            progress (`bool`, *optional*, defaults to `False`): show a progress bar."""
        seqs = self.tokenize(prompts, responses)
        return score_ids(self.model, seqs, self.tokenizer.pad_token_id, batch_size, progress=progress)

    def score_pairs(
        self,
        prompts: Sequence[str],
        chosen: Sequence[str],
        rejected: Sequence[str],
        batch_size: int = 16,
        progress: bool = False,
    ) -> tuple[list[float], list[float]]:
        """(chosen rewards, rejected rewards) for preference pairs, tokenized as training tokenized pairs (the
        shared prompt cut from the left to fit the longer response)."""
        from .data import DataError, DataReport, tokenize_pairs

        n = len(prompts)
        if not len(chosen) == len(rejected) == n:
            raise ValueError(f"{n} prompts, {len(chosen)} chosen and {len(rejected)} rejected")
        pairs = [
            {"prompt": p, "chosen": c, "rejected": r, "row": i}
            for i, (p, c, r) in enumerate(zip(prompts, chosen, rejected, strict=True))
        ]
        try:
            rows = tokenize_pairs(pairs, self.tokenizer, self.max_length, DataReport(source="score"))
        except DataError:
            rows = []
        if len(rows) != n:
            kept = {r["row"] for r in rows}
            bad = [i for i in range(n) if i not in kept]
            raise ValueError(f"pairs {bad[:10]}: a response alone exceeds max_length={self.max_length} tokens")
        return score_pair_rows(self.model, rows, self.tokenizer.pad_token_id, batch_size, progress=progress)


def load_adapter_model(path: str | Path) -> tuple[Any, Any, int]:
    """Rebuild the 4-bit base exactly as the recipe beside the adapter says, and load the adapter and head.

    Args:
        path (`str` or `Path`): an adapter dir written by `qrm train`.

    Returns:
        `tuple`: (the `PeftModel`, with LoRA and head in the training dtypes, its tokenizer, training's max_length)."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from .model import load_base

    path = Path(path)
    margs, recipe = read_recipe(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    from .model import cast_as_trained, quiet_load_report

    with quiet_load_report():  # the head missing from a *ForCausalLM / BertModel base comes from the adapter next
        model, _ = load_base(margs, tokenizer, trust_remote_code=bool(recipe.get("trust_remote_code", False)))
        model = PeftModel.from_pretrained(model, str(path), is_trainable=False)
    cast_as_trained(model, margs)  # LoRA and head in the dtype TRL trained them in
    return model, tokenizer, recipe_max_length(recipe)


def _messages(value: Any, what: str) -> Messages:
    """A message list with qrm's role names and string contents (TRL's typed text parts joined)."""
    from .data import ROLE_ALIASES

    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(m, dict) and "role" in m for m in value):
        raise ValueError(f"{what}: expected a string or a list of {{'role', 'content'}} messages, got {value!r:.80}")
    out = []
    for m in value:
        content = m.get("content") or ""
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            content = "".join(part.get("text", "") for part in content if part.get("type") == "text")
        out.append({**m, "role": ROLE_ALIASES.get(str(m["role"]).lower(), m["role"]), "content": content})
    return out


def render_pair(tokenizer: Any, prompt: str | Messages, response: str | Messages) -> tuple[str, str]:
    """(prompt text, response text) as qrm's data pipeline renders a conversational pair.

    Args:
        tokenizer (`PreTrainedTokenizerBase`):
            The reward model's tokenizer; its chat template renders, or qrm's plain layout when it has none.
        prompt (`str` or `list[dict]`):
            A text, or messages with qrm's role aliases (`human`, `gpt`, ...) and TRL's typed text parts allowed. A
            prompt that ends with an assistant message (continue final message) has it joined to the response.
        response (`str` or `list[dict]`):
            A text (when `prompt` is one), or the completion's messages.

    Returns:
        `tuple[str, str]`: the prompt rendered with the generation prompt, and the rest of the conversation."""
    from .data import PLAIN_ROLE_NAMES, conversation_pair

    if isinstance(prompt, str) and isinstance(response, str):
        return prompt, response
    if isinstance(prompt, str) or isinstance(response, str):
        raise ValueError("prompt and response must both be strings or both be message lists")
    p, r = _messages(prompt, "prompt"), _messages(response, "response")
    if p and p[-1]["role"] == "assistant":
        if r and r[0]["role"] == "assistant":
            r = [{**r[0], "content": p[-1]["content"] + r[0]["content"]}, *r[1:]]
        else:
            r = [p[-1], *r]
        p = p[:-1]
    if not p or not r:
        raise ValueError("a conversational prompt and response each need at least one message")
    if not getattr(tokenizer, "chat_template", None):
        bad = sorted({m["role"] for m in p + r} - set(PLAIN_ROLE_NAMES))
        if bad:
            raise ValueError(
                f"role(s) {bad}: qrm's plain layout (the tokenizer has no chat template) knows only "
                f"{sorted(PLAIN_ROLE_NAMES)}"
            )
    text, out, _ = conversation_pair(p, r, r, tokenizer)
    return text, out


# ------------------------------------------------------------------------------------------------ qrm score

SCORE_FORMATS = ("auto", "responses", "explicit", "implicit", "conversational", "sharegpt", "ratings")


def score_file(
    model: str | Path,
    data: str | Path,
    out: str | Path | None = None,
    batch_size: int = 16,
    prompt_column: str = "prompt",
    response_column: str = "response",
    dataset_format: str = "auto",
    chosen_column: str = "chosen",
    rejected_column: str = "rejected",
    max_length: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score every row of `data` with `model` and write one JSON line per row (`qrm score`).

    Args:
        model (`str` or `Path`): an export (`qrm merge`) or adapter dir (`qrm train`).
        data (`str` or `Path`): a jsonl/json/csv/parquet file.
        out (`str` or `Path`, *optional*, defaults to `None`): the JSONL file to write; stdout when None.
        batch_size (`int`, *optional*, defaults to `16`): sequences per forward pass.
        prompt_column (`str`, *optional*, defaults to `"prompt"`): prompt column of rows scored one by one.
        response_column (`str`, *optional*, defaults to `"response"`): response column of rows scored one by one.
        dataset_format (`str`, *optional*, defaults to `"auto"`): `auto`, `responses`, or a pair format of
            `qrm.data`; rows without the prompt and response columns are read as preference pairs.
        chosen_column (`str`, *optional*, defaults to `"chosen"`): preferred response of a pair.
        rejected_column (`str`, *optional*, defaults to `"rejected"`): dispreferred response of a pair.
        max_length (`int`, *optional*, defaults to `None`): defaults to the training recipe's.
        progress (`bool`, *optional*, defaults to `True`): show a progress bar.

    Returns:
        `dict`: `rows`, `scored`, `skipped`, `mode` (`responses` or `pairs`) and `out`. Rows are numbered from 1 as
        in qrm's data errors: a response row gets {"row", "reward"}, a pair {"row", "chosen_reward",
        "rejected_reward", "margin"}; a row that could not be scored gets "skipped" with the reason."""
    from .config import DataArguments
    from .data import DataError, load_rows

    ds, where = load_rows(str(data))
    rows = list(ds)
    if not rows:
        raise DataError(f"{where}: the file holds no rows")
    dargs = DataArguments(
        dataset=str(data),
        dataset_format=dataset_format,
        prompt_column=prompt_column,
        chosen_column=chosen_column,
        rejected_column=rejected_column,
    )
    mode, prompt_column, response_column = _score_mode(rows, dargs, where, response_column)
    rm = RewardModel.from_pretrained(model, max_length=max_length)
    if mode == "responses":
        lines = _score_responses(rm, rows, where, (prompt_column, response_column), batch_size, progress)
    else:
        lines = _score_pairs(rm, rows, dargs, where, batch_size, progress)
    text = "".join(json.dumps(line) + "\n" for line in lines)
    if out is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    skipped = sum(1 for line in lines if "skipped" in line)
    return {"rows": len(rows), "scored": len(rows) - skipped, "skipped": skipped, "mode": mode, "out": out}


def _score_mode(rows: list[dict], dargs: Any, where: str, response_column: str) -> tuple[str, str, str]:
    """("responses" or "pairs", prompt column, response column): rows with both columns are responses, a ratings
    file is scored answer by answer, anything else is read as preference pairs."""
    from .data import detect_format

    fmt, prompt_column, columns = dargs.dataset_format, dargs.prompt_column, set(rows[0])
    if fmt in ("auto", "responses") and {prompt_column, response_column} <= columns:
        return "responses", prompt_column, response_column
    if fmt in ("auto", "ratings"):
        fmt = fmt if fmt != "auto" else detect_format(list(columns), rows[0], dargs, where)[0]
        if fmt == "ratings":  # one answer per row: score each answer rather than best-vs-worst pairs
            return "responses", prompt_column if prompt_column in columns else "question", dargs.response_column
    return "pairs", prompt_column, response_column


def _score_responses(
    rm: RewardModel, rows: list[dict], where: str, columns: tuple[str, str], batch_size: int, progress: bool
) -> list[dict[str, Any]]:
    from .data import DataError

    for i, row in enumerate(rows, start=1):
        for col in columns:
            if not isinstance(row.get(col), str):
                raise DataError(f"{where}: row {i}: field {col!r} must be a string, got {row.get(col)!r}")
    prompts, responses = [row[columns[0]] for row in rows], [row[columns[1]] for row in rows]
    ids = tokenize_responses(rm.tokenizer, prompts, responses, rm.max_length)
    keep = [i for i, x in enumerate(ids) if x is not None]
    rewards = score_ids(rm.model, [ids[i] for i in keep], rm.tokenizer.pad_token_id, batch_size, progress)
    by_row = dict(zip(keep, rewards, strict=True))
    skipped = {"reward": None, "skipped": f"response exceeds max_length={rm.max_length}"}
    return [{"row": i + 1, "reward": by_row[i]} if i in by_row else {"row": i + 1, **skipped} for i in range(len(rows))]


def _score_pairs(
    rm: RewardModel, rows: list[dict], dargs: Any, where: str, batch_size: int, progress: bool
) -> list[dict[str, Any]]:
    from .data import DataError, build_pairs, tokenize_pairs

    pairs, report = build_pairs(rows, dargs, where, rm.tokenizer)
    try:
        tok = tokenize_pairs(pairs, rm.tokenizer, rm.max_length, report)
    except DataError:
        tok = []
    chosen, rejected = score_pair_rows(rm.model, tok, rm.tokenizer.pad_token_id, batch_size, progress)
    by_row = {r["row"]: (c, rj) for r, c, rj in zip(tok, chosen, rejected, strict=True)}
    paired = {p["row"] for p in pairs}
    lines: list[dict[str, Any]] = []
    for i in range(1, len(rows) + 1):
        if i in by_row:
            c, rj = by_row[i]
            lines.append({"row": i, "chosen_reward": c, "rejected_reward": rj, "margin": c - rj})
        else:
            why = f"response exceeds max_length={rm.max_length}" if i in paired else "not a usable pair"
            lines.append({"row": i, "chosen_reward": None, "rejected_reward": None, "skipped": why})
    return lines


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="qrm score",
        description="Score (prompt, response) rows or preference pairs with an export or adapter dir; JSONL out.",
    )
    ap.add_argument("--model", required=True, help="Export dir (qrm merge) or adapter dir (qrm train).")
    ap.add_argument("--data", required=True, help="jsonl/json/csv/parquet file.")
    ap.add_argument("--out", default=None, help="Output JSONL (default: stdout).")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--prompt-column", default="prompt")
    ap.add_argument(
        "--response-column", default="response", help="Rows with prompt and response columns are scored one by one."
    )
    ap.add_argument("--chosen-column", default="chosen")
    ap.add_argument("--rejected-column", default="rejected")
    ap.add_argument(
        "--format",
        default="auto",
        help="auto, responses, or a pair format of qrm.data (explicit, implicit, conversational, sharegpt, ratings).",
    )
    ap.add_argument("--max-length", type=int, default=None, help="Default: the training recipe's max_length.")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--force", action="store_true", help="Replace an existing --out file.")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """`qrm score`: write one JSON line of rewards per input row; returns the exit status (2 on bad input)."""
    args = _parser().parse_args(argv)
    from .cli import FlagError, check_flags, check_model_dir, check_out_path, user_error
    from .data import DataError

    try:
        check_flags("qrm score", batch_size=args.batch_size, max_length=args.max_length)
        if args.format not in SCORE_FORMATS:
            raise FlagError(f"--format {args.format}: expected one of {', '.join(SCORE_FORMATS)}")
        check_model_dir("--model", args.model)
        check_out_path("--out", args.out, {"--data": args.data, "--model": args.model})
        if args.out and Path(args.out).is_dir():
            raise FlagError(f"--out {args.out}: is a directory; give the path of the JSONL file to write")
        if args.out and Path(args.out).exists() and not args.force:
            raise FlagError(f"--out {args.out}: exists; pass --force to replace it")
        same = ("out", "batch_size", "prompt_column", "response_column", "chosen_column", "rejected_column")
        kwargs = {k: getattr(args, k) for k in (*same, "max_length")}
        summary = score_file(args.model, args.data, dataset_format=args.format, progress=not args.no_progress, **kwargs)
    except (DataError, FileNotFoundError, ValueError) as e:
        return user_error("qrm score", e)
    print(
        f"scored {summary['scored']} of {summary['rows']} rows ({summary['mode']})"
        + (f", {summary['skipped']} skipped" if summary["skipped"] else "")
        + (f" -> {summary['out']}" if summary["out"] else ""),
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
