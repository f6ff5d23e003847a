"""Scoring: rewards for token ids or texts, from a live model, an adapter directory or a merged export."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

RECIPE_FILE = "qrm_recipe.yaml"
Messages = list[dict[str, Any]]
DEFAULT_MAX_LENGTH = 1024  # TrainingArguments.max_length's default; a recipe at the default omits the key


def autocast_dtype(model: Any) -> torch.dtype | None:
    """The 16-bit dtype to autocast to, or None: the 4-bit model as TRL trains it needs it, an export does not.

    With a bf16 compute dtype TRL trains the 4-bit model under bf16 autocast, with bf16 LoRA and head next to fp32
    norms (or, under FSDP, everything in the bf16 storage dtype): score it the same way. A plain model whose float
    weights share one dtype (a merged export in bf16 or fp32) runs as is, as `transformers.pipeline` and vLLM
    run it."""
    params = list(model.parameters())
    quantized = any(getattr(p, "quant_state", None) is not None for p in params)
    # Packed 4-bit storage may carry a float dtype (bnb_4bit_quant_storage); it says nothing about compute.
    dtypes = {p.dtype for p in params if p.is_floating_point() and getattr(p, "quant_state", None) is None}
    low = [d for d in (torch.bfloat16, torch.float16) if d in dtypes]
    return low[0] if low and (quantized or len(dtypes) > 1) else None


def autocast_for(model: Any) -> contextlib.AbstractContextManager:
    """Autocast context matching how the model was trained (see `autocast_dtype`)."""
    dtype = autocast_dtype(model)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=next(model.parameters()).device.type, dtype=dtype)


@torch.no_grad()
def score_ids(
    model: Any,
    sequences: Sequence[Sequence[int]],
    pad_token_id: int,
    batch_size: int = 16,
    progress: bool = False,
) -> list[float]:
    """Reward of each token sequence; batches are grouped by length so padding stays small."""
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
    """(chosen rewards, rejected rewards) for tokenized pair rows with `chosen_ids` / `rejected_ids`."""
    seqs = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
    rewards = score_ids(model, seqs, pad_token_id, batch_size, progress=progress)
    return rewards[: len(rows)], rewards[len(rows) :]


def tokenize_responses(
    tokenizer: Any, prompts: Sequence[str], responses: Sequence[str], max_length: int
) -> list[list[int] | None]:
    """Token ids of each (prompt, response) exactly as training built them; None where the response alone does
    not fit `max_length` (training drops such pairs; the prompt is cut from the left otherwise)."""
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
    """The max_length training tokenized with (the dataclass default when the resolved recipe omits it)."""
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

        `device` and `dtype` ("auto": as stored) apply to exports; an adapter's 4-bit base goes where training put
        it (the GPU when there is one) and keeps the training dtypes."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = Path(path)
        if (path / "adapter_config.json").is_file():
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
        prompts, responses = self._texts(prompts, responses)
        ids = tokenize_responses(self.tokenizer, prompts, responses, self.max_length)
        bad = [i for i, x in enumerate(ids) if x is None]
        if bad:
            raise ValueError(f"responses {bad[:10]} alone exceed max_length={self.max_length} tokens")
        return ids  # type: ignore[return-value]

    def _texts(
        self, prompts: Sequence[str | Messages], responses: Sequence[str | Messages]
    ) -> tuple[list[str], list[str]]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        if all(isinstance(x, str) for x in (*prompts, *responses)):
            return list(prompts), list(responses)  # type: ignore[arg-type]
        pairs = [self.render(p, r) for p, r in zip(prompts, responses, strict=True)]
        return [p for p, _ in pairs], [r for _, r in pairs]

    def score(self, prompt: str | Messages, response: str | Messages) -> float:
        """Reward of one response to one prompt (strings, or message lists as in `render`)."""
        return self.score_batch([prompt], [response])[0]

    def score_batch(
        self,
        prompts: Sequence[str | Messages],
        responses: Sequence[str | Messages],
        batch_size: int = 16,
        progress: bool = False,
    ) -> list[float]:
        """Rewards of many (prompt, response) pairs, batched by length (strings, or message lists as in `render`)."""
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
    """Rebuild the 4-bit base exactly as the recipe beside the adapter says, and load the adapter and head."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from .model import load_base

    path = Path(path)
    margs, recipe = read_recipe(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    from .model import quiet_load_report

    with quiet_load_report():  # the head missing from a *ForCausalLM / BertModel base comes from the adapter next
        model, _ = load_base(margs, tokenizer, trust_remote_code=bool(recipe.get("trust_remote_code", False)))
    model = PeftModel.from_pretrained(model, str(path), is_trainable=False)
    # Match training numerics: TRL trains the LoRA and head weights in bf16 on a 4-bit base.
    if margs.load_in_4bit and margs.bnb_4bit_compute_dtype != "float32":
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.data = p.data.to(torch.bfloat16)
    keep_training_matmul(model)
    return model, tokenizer, recipe_max_length(recipe)


def keep_training_matmul(model: Any) -> None:
    """Make 4-bit layers compute at inference as they did in training.

    On CPUs with AVX512-BF16, bitsandbytes repacks a Linear4bit on its first no-grad eval forward, rounding the
    block scales to bf16 (bitsandbytes/nn/modules.py, Linear4bit.forward): rewards would then differ from the ones
    training saw, and the weights could no longer be dequantized exactly for a merge."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


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
    from .data import PLAIN_ROLE_NAMES, _conversation_pair

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
    text, out, _ = _conversation_pair(p, r, r, tokenizer)
    return text, out


def policy_device() -> str:
    """The device an RL trainer's policy uses in this process: `cuda:LOCAL_RANK` under accelerate/torchrun (the
    current CUDA device otherwise) when there is a GPU, else the CPU."""
    import os

    if not torch.cuda.is_available():
        return "cpu"
    rank = os.environ.get("LOCAL_RANK")
    return f"cuda:{int(rank) if rank is not None else torch.cuda.current_device()}"


class RewardFunction:
    """A reward model as one of TRL's `reward_funcs`: `fn(prompts, completions, **kwargs) -> list[float | None]`.

    Built by `qrm.reward_function`. Prompts and completions are strings (standard datasets) or message lists
    (conversational datasets), as `GRPOTrainer` / `RLOOTrainer` pass them; conversations are rendered and every
    text tokenized exactly as training did, so the rewards equal `qrm score`'s. A completion that alone exceeds
    the model's max_length gets None (TRL treats it as unscorable) instead of stopping the run."""

    def __init__(self, reward_model: RewardModel, batch_size: int = 16, name: str = "qrm_reward"):
        self.reward_model = reward_model
        self.batch_size = batch_size
        self.__name__ = name

    def __call__(
        self, prompts: Sequence[str | Messages], completions: Sequence[str | Messages], **kwargs: Any
    ) -> list[float | None]:
        rm = self.reward_model
        texts_p, texts_r = rm._texts(prompts, completions)
        ids = tokenize_responses(rm.tokenizer, texts_p, texts_r, rm.max_length)
        keep = [i for i, x in enumerate(ids) if x is not None]
        rewards = score_ids(rm.model, [ids[i] for i in keep], rm.tokenizer.pad_token_id, self.batch_size)
        out: list[float | None] = [None] * len(ids)
        for i, reward in zip(keep, rewards, strict=True):
            out[i] = reward
        return out

    def __repr__(self) -> str:
        return f"RewardFunction({self.__name__!r}, batch_size={self.batch_size})"


def reward_function(
    model: str | Path | RewardModel,
    batch_size: int = 16,
    device: str | None = None,
    max_length: int | None = None,
    dtype: str | torch.dtype = "auto",
    name: str | None = None,
) -> RewardFunction:
    """A reward model as a TRL reward function: `GRPOTrainer(..., reward_funcs=qrm.reward_function(DIR))`.

    Args:
        model (`str`, `Path` or `RewardModel`):
            An export written by `qrm merge`, an adapter dir written by `qrm train`, or a loaded `RewardModel`.
        batch_size (`int`, *optional*, defaults to `16`):
            Sequences per forward pass (grouped by length, as `qrm score` does).
        device (`str`, *optional*):
            Where an export runs; defaults to the policy's device in this process (`cuda:LOCAL_RANK` under
            accelerate, else the current GPU, else the CPU). An adapter's 4-bit base goes where training put it.
        max_length (`int`, *optional*):
            Defaults to the training recipe's; the prompt is cut from the left to fit, as in training.
        dtype (`str` or `torch.dtype`, *optional*, defaults to `"auto"`):
            Dtype of an export's weights ("auto": as stored).
        name (`str`, *optional*):
            The `__name__` TRL logs the rewards under (`rewards/<name>/mean`); defaults to `qrm_<dir name>`.

    Returns:
        `RewardFunction`: called as `fn(prompts, completions, **kwargs)`, returns one reward per completion."""
    if isinstance(model, RewardModel):
        return RewardFunction(model, batch_size, name or "qrm_reward")
    path = Path(model)
    if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{path}: not a qrm export or adapter dir (no config.json or adapter_config.json)")
    rm = RewardModel.from_pretrained(path, device=device or policy_device(), max_length=max_length, dtype=dtype)
    return RewardFunction(rm, batch_size, name or f"qrm_{path.resolve().name}")
