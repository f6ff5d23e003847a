"""A trained reward model as one of TRL's `reward_funcs` (`GRPOTrainer`, `RLOOTrainer`): `qrm.reward_function`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .files import dir_kind
from .policy_text import PolicySpecials
from .reward_model import Messages, RewardModel, score_fitting, tokenize_responses


def policy_device() -> str:
    """The device an RL trainer's policy uses in this process: `cuda:LOCAL_RANK` under accelerate/torchrun (the
    current CUDA device otherwise) when there is a GPU, else the CPU."""
    if not torch.cuda.is_available():
        return "cpu"
    rank = os.environ.get("LOCAL_RANK")
    # local rank modulo the visible GPUs, as accelerate places the process (accelerate/state.py, set_device)
    return f"cuda:{int(rank) % torch.cuda.device_count() if rank is not None else torch.cuda.current_device()}"


class RewardFunction:
    """A reward model as one of TRL's `reward_funcs`: `fn(prompts, completions, **kwargs) -> list[float | None]`.

    Built by `qrm.reward_function`. Prompts and completions are strings (standard datasets) or message lists
    (conversational datasets), as `GRPOTrainer` / `RLOOTrainer` pass them; conversations are rendered and every
    text tokenized exactly as training did, so the rewards equal `qrm score`'s. A completion that alone exceeds
    the model's max_length gets None (TRL treats it as unscorable) instead of stopping the run.

    Args:
        reward_model (`RewardModel`): the loaded reward model.
        batch_size (`int`, *optional*, defaults to `16`): sequences per forward pass.
        name (`str`, *optional*, defaults to `"qrm_reward"`): the `__name__` TRL logs the rewards under.
        policy_tokenizer (`PreTrainedTokenizerBase`, `str` or `Path`, *optional*): the policy's tokenizer when it is
            not the reward model's; its special-token texts are removed first (`qrm.policy_text.PolicySpecials`)."""

    def __init__(
        self,
        reward_model: RewardModel,
        batch_size: int = 16,
        name: str = "qrm_reward",
        policy_tokenizer: Any = None,
    ):
        self.reward_model = reward_model
        self.batch_size = batch_size
        self.__name__ = name
        self.policy = None if policy_tokenizer is None else PolicySpecials(policy_tokenizer, reward_model.tokenizer)

    def __call__(
        self, prompts: Sequence[str | Messages], completions: Sequence[str | Messages], **kwargs: Any
    ) -> list[float | None]:
        rm = self.reward_model
        if self.policy is not None:  # the policy's special-token texts the reward tokenizer would read as words
            prompts, completions = self.policy(prompts), self.policy(completions)
        texts_p, texts_r = rm.render_batch(prompts, completions)
        ids = tokenize_responses(rm.tokenizer, texts_p, texts_r, rm.max_length)
        return score_fitting(rm.model, ids, rm.tokenizer.pad_token_id, self.batch_size)

    def __repr__(self) -> str:
        return f"RewardFunction({self.__name__!r}, batch_size={self.batch_size})"


def reward_function(
    model: str | Path | RewardModel,
    batch_size: int = 16,
    device: str | None = None,
    max_length: int | None = None,
    dtype: str | torch.dtype = "auto",
    name: str | None = None,
    policy_tokenizer: Any = None,
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
        policy_tokenizer (`PreTrainedTokenizerBase`, `str` or `Path`, *optional*):
            The policy's tokenizer (or its dir) when it is not the reward model's: its special-token texts that the
            reward tokenizer does not know (`</s>`, `<|im_end|>`, ...) are removed from prompts and completions
            before they are rendered and tokenized, instead of being scored as words.

    Returns:
        `RewardFunction`: called as `fn(prompts, completions, **kwargs)`, returns one reward per completion."""
    if isinstance(model, RewardModel):
        return RewardFunction(model, batch_size, name or "qrm_reward", policy_tokenizer)
    path = Path(model)
    if dir_kind(path) is None:
        raise FileNotFoundError(f"{path}: not a qrm export or adapter dir (no config.json or adapter_config.json)")
    rm = RewardModel.from_pretrained(path, device=device or policy_device(), max_length=max_length, dtype=dtype)
    return RewardFunction(rm, batch_size, name or f"qrm_{path.resolve().name}", policy_tokenizer)
