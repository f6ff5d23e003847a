"""The trained reward model as a scorer: `RewardModel` (an adapter dir or a merged export), rewards of token ids
(`score_ids`), texts tokenized exactly as training tokenized them, and `score_fitting`, the one rule for texts that
do not fit (scored as None). Shared by `qrm score`, `qrm eval`, `qrm merge`'s verification, `qrm serve`, RewardBench
and `qrm.reward_function`; no command lives here."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import DataError
from .files import RECIPE_FILE, is_adapter_dir

Messages = list[dict[str, Any]]


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
    return [float(x) for x in logits_ids(model, sequences, pad_token_id, batch_size, progress)[:, 0]]


@torch.no_grad()
def logits_ids(
    model: Any,
    sequences: Sequence[Sequence[int]],
    pad_token_id: int,
    batch_size: int = 16,
    progress: bool = False,
) -> torch.Tensor:
    """All logits columns of each token sequence, pooled as the model pools its reward (`score_ids` reads column 0).

    Args: as `score_ids`.

    Returns:
        `torch.Tensor`: (len(sequences), columns) float32 on the CPU, in the given order."""
    from .model import autocast_for  # lazily: qrm.model imports TRL (through qrm.config)

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out: list[torch.Tensor | None] = [None] * len(sequences)
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
            logits = logits.float().cpu()
            for row, i in enumerate(idx):
                out[i] = logits[row]
            if bar is not None:
                bar.update(len(idx))
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    return torch.stack(out) if out else torch.zeros(0, 1)


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


def tokenize_fitting(pairs: Sequence[dict], tokenizer: Any, max_length: int, report: Any) -> list[dict]:
    """`qrm.data.tokenize_pairs`, but an empty list rather than a `DataError` when no pair fits.

    Args:
        pairs (`Sequence[dict]`): pair rows with `prompt`, `chosen`, `rejected` and `row`.
        tokenizer (`PreTrainedTokenizerBase`): the reward model's tokenizer.
        max_length (`int`): training's max_length; the prompt is cut from the left to fit the longer response.
        report (`qrm.data.DataReport`): counts the pairs dropped.

    Returns:
        `list[dict]`: the tokenized rows of the pairs that fit (each keeps its `row`), in order."""
    from .data import tokenize_pairs

    try:
        return tokenize_pairs(pairs, tokenizer, max_length, report)
    except DataError:  # every pair too long
        return []


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
    from .data import DataReport

    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if not prompts:
        return []
    pairs = [
        {"prompt": p, "chosen": r, "rejected": r, "row": i}
        for i, (p, r) in enumerate(zip(prompts, responses, strict=True))
    ]
    rows = tokenize_fitting(pairs, tokenizer, max_length, DataReport(source="score"))
    out: list[list[int] | None] = [None] * len(pairs)
    for row in rows:
        out[row["row"]] = row["chosen_ids"]
    return out


def score_fitting(
    model: Any,
    sequences: Sequence[Sequence[int] | None],
    pad_token_id: int,
    batch_size: int = 16,
    progress: bool = False,
) -> list[float | None]:
    """`score_ids` for the sequences that fit, None for the rest (those `tokenize_responses` could not fit).

    Args:
        model (`PreTrainedModel`): as in `score_ids`.
        sequences (`Sequence[Sequence[int] | None]`): token ids, or None where the text did not fit.
        pad_token_id (`int`): the tokenizer's pad token.
        batch_size (`int`, *optional*, defaults to `16`): sequences per forward pass.
        progress (`bool`, *optional*, defaults to `False`): show a progress bar.

    Returns:
        `list[float | None]`: one reward per sequence, None where it was None."""
    keep = [i for i, x in enumerate(sequences) if x is not None]
    rewards = score_ids(model, [sequences[i] for i in keep], pad_token_id, batch_size, progress)  # type: ignore[misc]
    out: list[float | None] = [None] * len(sequences)
    for i, reward in zip(keep, rewards, strict=True):
        out[i] = reward
    return out


def default_device() -> str:
    """Where exports are scored: the GPU when there is one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


class RewardModel:
    """A trained reward model ready to score: `RewardModel.from_pretrained(path).score(prompt, response)`.

    `path` is an adapter directory written by `qrm train` (the 4-bit base is loaded as in training) or a merged
    export written by `qrm merge` (loaded in the dtype it was stored in, as `transformers` and vLLM load it).
    Texts are tokenized as in training: prompt and response separately, BOS/EOS added, prompt cut from the left to
    fit max_length (the recipe's, stored beside the weights)."""

    def __init__(self, model: Any, tokenizer: Any, max_length: int | None = None):
        if max_length is None:
            from .config import DEFAULT_MAX_LENGTH  # lazily: qrm.config imports TRL

            max_length = DEFAULT_MAX_LENGTH
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

        from .config import DEFAULT_MAX_LENGTH, read_recipe, recipe_max_length
        from .model import load_adapter_model

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
        from .data import DataReport

        n = len(prompts)
        if not len(chosen) == len(rejected) == n:
            raise ValueError(f"{n} prompts, {len(chosen)} chosen and {len(rejected)} rejected")
        pairs = [
            {"prompt": p, "chosen": c, "rejected": r, "row": i}
            for i, (p, c, r) in enumerate(zip(prompts, chosen, rejected, strict=True))
        ]
        rows = tokenize_fitting(pairs, self.tokenizer, self.max_length, DataReport(source="score"))
        if len(rows) != n:
            kept = {r["row"] for r in rows}
            bad = [i for i in range(n) if i not in kept]
            raise ValueError(f"pairs {bad[:10]}: a response alone exceeds max_length={self.max_length} tokens")
        return score_pair_rows(self.model, rows, self.tokenizer.pad_token_id, batch_size, progress=progress)


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
