"""ODIN: length-disentangled reward training (Chen et al., "ODIN: Disentangled Reward Mitigates Hacking in RLHF",
ICML 2024, arXiv 2402.07319), with its extra terms in reward units so the default weights work at any reward scale.

The model's ordinary score head is the *quality* head. A second linear head, the *length* head, reads the same
features (the input of the score head: a decoder's last-token state, a BERT encoder's pooled [CLS]). Per batch of B
pairs, with r_Q and r_L the two heads' rewards of the 2B responses, L their response lengths and sg() a value used
without its gradient:

    loss = BT(r_Q + r_L) + odin_length_weight * (ρ(r_Q, L)² sg(σ(r_Q)) - ρ(r_L, L) sg(σ(r_L)))
                         + odin_ortho_weight * cos(W_Q, W_L)² sg(|W_Q| |W_L|)

BT is the Bradley-Terry loss −log σ(chosen − rejected) (minus the margin, plus TRL's reward centering when set) and
ρ the Pearson correlation over the 2B responses of the batch on this process. Differences from the paper's
|ρ(r_Q, L)| − ρ(r_L, L) + |W_Qᵀ W_L|, each measured (README, "Length bias"): a correlation's gradient grows as
1/σ(reward), so with rewards ~0.02 early in training the raw terms outweighed BT 100-fold and BT never learned
(held-out accuracy 0.42-0.45 at weights 1.0); multiplied by the detached σ, a term's gradient on each reward is
O(1/2B), BT's own size. Squares instead of absolute values: |x| has a gradient of full size at 0 that flips sign
with the noise of a 16-response correlation, which under Adam took the heads' steps away from BT (0.573 and 0.550
held-out with |·|, 0.586 squared, MiniLM helpful). Response length = tokens of the response: the sequence's tokens
after the prompt, including the closing EOS/[SEP] (the same count `qrm eval` reports length bias with). Batches are
drawn at random (a length-grouped sampler would leave no length spread inside a batch); at least 4 pairs per batch.

The length head lives beside the adapter in `length_head.safetensors`; the adapter, `qrm merge` and `qrm score`
see an ordinary one-label model whose reward is the quality head. `qrm eval` reports both heads when the file is
there.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import RecipeError
from .files import LENGTH_HEAD_FILE
from .model import score_head, trained_head, unwrap

logger = logging.getLogger("qrm")

LENGTH_HEAD_NAME = "qrm_length_head"  # submodule of the transformers model, outside PEFT's adapter state dict
MIN_ODIN_PAIRS = 4  # 8 responses: fewer make a per-batch correlation mostly noise
RESPONSE_LEN_KEY = "qrm_response_len"  # batch key: response tokens of the 2B sequences, chosen first


def head_weight(head: torch.nn.Module) -> torch.Tensor:
    """The active weight (1, hidden) of a score head, under PEFT's wrapper or bare."""
    return trained_head(head).weight


def length_head(model: Any) -> torch.nn.Linear | None:
    """The length head attached to `model`, or None."""
    return getattr(unwrap(model), LENGTH_HEAD_NAME, None)


def attach_length_head(model: Any) -> torch.nn.Linear:
    """Add a length head beside the score head and make the model's logits (n, 2): [quality, length].

    The head is initialised like a transformers score head (normal, std `initializer_range`) from the current torch
    seed, in the score head's dtype and device, and registered on the model, so the Trainer's optimizer, gradient
    clipping and non-finite guard see it like any trainable weight."""
    inner = unwrap(model)
    head = score_head(model)
    w = head_weight(head)
    lin = torch.nn.Linear(w.shape[1], 1, bias=False, device=w.device, dtype=w.dtype)  # a bias cancels in BT and ρ
    torch.nn.init.normal_(lin.weight, std=float(getattr(inner.config, "initializer_range", 0.02)))
    inner.add_module(LENGTH_HEAD_NAME, lin)
    lin.qrm_hook = head.register_forward_hook(lambda _m, args, out: torch.cat([out, lin(args[0]).to(out.dtype)], -1))
    return lin


def quality_only(model: Any) -> None:
    """Stop appending the length column: the model scores with the quality head alone (the head stays, to save)."""
    lin = length_head(model)
    hook = getattr(lin, "qrm_hook", None)
    if hook is not None:
        hook.remove()
        lin.qrm_hook = None


def resolve(args: Any, sharded: bool) -> None:
    """Check `args.length_debias` against the launch and batch, before anything is loaded or recorded; ODIN's
    batches are drawn at random when the recipe groups them by length (one line says so).

    Args:
        args (`TrainingArguments`): the recipe's training arguments (`train_sampling_strategy` may be set).
        sharded (`bool`): parameters are sharded (FSDP or ZeRO-3).
    """
    method = getattr(args, "length_debias", "none")  # a known method: checked with the recipe (qrm.config)
    if method == "none":
        return
    if sharded:
        # ODIN's length head would be a sharded parameter outside PEFT's state dict, which save_adapter cannot
        # gather; erase edits the score head, which FSDP shards.
        raise RecipeError(f"length_debias: {method} is not supported with FSDP or ZeRO-3 sharding yet; use DDP")
    if method == "erase":
        logger.info("length_debias=erase: plain Bradley-Terry training; the score head is edited once at the end")
        return
    if args.per_device_train_batch_size < MIN_ODIN_PAIRS:
        raise RecipeError(
            f"length_debias: odin correlates rewards with length within each batch and needs "
            f"per_device_train_batch_size >= {MIN_ODIN_PAIRS}, got {args.per_device_train_batch_size}; "
            "use length_debias: erase"
        )
    if args.train_sampling_strategy == "group_by_length":
        # Length-grouped batches leave little length spread inside a batch to decorrelate against.
        args.train_sampling_strategy = "random"
        logger.info("length_debias=odin: batches drawn at random, not grouped by length (needs length spread)")


def setup(model: Any, args: Any) -> torch.nn.Linear | None:
    """Attach the length head when `args.length_debias == "odin"` (before the Trainer is built); None otherwise."""
    if getattr(args, "length_debias", "none") != "odin":
        return None
    lin = attach_length_head(model)
    logger.info(
        "length_debias=odin: length head beside the score head (length weight %g, orthogonality weight %g)",
        args.odin_length_weight,
        args.odin_ortho_weight,
    )
    return lin


def save_length_head(lin: torch.nn.Linear, folder: str | os.PathLike) -> Path:
    """Write the length head's weight to `folder/length_head.safetensors` (written under a temporary name)."""
    from safetensors.torch import save_file

    path = Path(folder) / LENGTH_HEAD_FILE
    tmp = path.with_name(path.name + ".tmp")
    save_file({"weight": lin.weight.detach().cpu().contiguous()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)
    return path


def load_length_head(model: Any, folder: str | os.PathLike, attach: bool = False) -> torch.nn.Linear:
    """Read `folder/length_head.safetensors` into the model's length head (created when missing, without the
    logits hook unless `attach`); the weight keeps the dtype the model's head has."""
    from safetensors.torch import load_file

    path = Path(folder) / LENGTH_HEAD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {LENGTH_HEAD_FILE} (trained with length_debias: odin?)")
    weight = load_file(str(path))["weight"]
    lin = length_head(model)
    if lin is None:
        lin = attach_length_head(model)
        if not attach:
            quality_only(model)
    if lin.weight.shape != weight.shape:
        raise ValueError(f"{path}: weight of shape {tuple(weight.shape)}, the model needs {tuple(lin.weight.shape)}")
    with torch.no_grad():
        lin.weight.copy_(weight.to(lin.weight.dtype))
    return lin


@contextlib.contextmanager
def length_reward(model: Any) -> Iterator[Any]:
    """Within the block the model's reward is the length head's: the score head's output is replaced by it."""
    lin = length_head(model)
    if lin is None:
        raise ValueError("the model has no length head")
    hook = score_head(model).register_forward_hook(lambda _m, args, out: lin(args[0]).to(out.dtype))
    try:
        yield model
    finally:
        hook.remove()


@dataclass
class ResponseLengthCollator:
    """Wraps a pair collator and adds `RESPONSE_LEN_KEY`: the response tokens of each chosen, then each rejected
    sequence (sequence length minus `prompt_len`, as `qrm eval` counts them)."""

    inner: Any

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(examples)
        lens = [len(ex[k]) - ex["prompt_len"] for k in ("chosen_ids", "rejected_ids") for ex in examples]
        batch[RESPONSE_LEN_KEY] = torch.tensor(lens, dtype=torch.float)
        return batch


def pearson(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Pearson correlation of two 1-D tensors; 0 when either is constant (no NaN, so no false non-finite stop)."""
    xc, yc = x - x.mean(), y - y.mean()
    return (xc * yc).sum() / torch.sqrt((xc * xc).sum() * (yc * yc).sum() + eps)


def odin_objective(
    quality: torch.Tensor,
    length: torch.Tensor,
    response_len: torch.Tensor,
    w_quality: torch.Tensor,
    w_length: torch.Tensor,
    margin: torch.Tensor | None = None,
    length_weight: float = 1.0,
    ortho_weight: float = 1.0,
    center_coefficient: float | None = None,
) -> dict[str, torch.Tensor]:
    """The ODIN loss and its terms for one batch.

    Args:
        quality (`torch.Tensor`): quality-head rewards of the 2B responses, chosen first.
        length (`torch.Tensor`): length-head rewards, same order.
        response_len (`torch.Tensor`): response tokens, same order.
        w_quality (`torch.Tensor`): quality head weight.
        w_length (`torch.Tensor`): length head weight.
        margin (`torch.Tensor`, *optional*): per-pair margin subtracted inside the BT loss, as TRL does.
        length_weight (`float`, *optional*, defaults to `1.0`): weight of |ρ(r_Q, L)| − ρ(r_L, L).
        ortho_weight (`float`, *optional*, defaults to `1.0`): weight of |cos(W_Q, W_L)|.
        center_coefficient (`float`, *optional*): TRL's `center_rewards_coefficient`, applied to the summed reward.

    Returns:
        `dict` with `loss` and the terms `bt`, `corr_quality`, `corr_length`, `ortho` (all fp32 scalars).
    """
    q, lr, n = quality.float(), length.float(), response_len.float()
    total = q + lr
    chosen, rejected = total.chunk(2)
    diff = chosen - rejected if margin is None else chosen - rejected - margin.float()
    bt = -torch.nn.functional.logsigmoid(diff).mean()
    rho_q, rho_l = pearson(q, n), pearson(lr, n)
    wq, wl = w_quality.float().reshape(-1), w_length.float().reshape(-1)
    ortho = torch.abs(torch.nn.functional.cosine_similarity(wq, wl, dim=0))
    # In reward units: a correlation's gradient grows as 1/std(reward), so while rewards are small (~0.02 at the
    # start) the raw terms swamp Bradley-Terry (grad norm 10-36 vs 0.05-0.2) and BT never learns. Scaled by the
    # detached std, each term's gradient on a reward is (z_L - rho z_r) / 2B, the size of BT's sigma(-d) / B at any
    # reward scale; the minimiser is unchanged. The orthogonality term is cos^2 times the detached norms: |cos|'s
    # gradient is 1/|W| and never vanishes (it flips sign at 0), so under Adam it took the heads' steps from BT.
    sd_q, sd_l = q.detach().std(unbiased=False), lr.detach().std(unbiased=False)
    scale = wq.detach().norm() * wl.detach().norm()
    loss = bt + length_weight * (rho_q**2 * sd_q - rho_l * sd_l) + ortho_weight * ortho**2 * scale
    if center_coefficient is not None:
        loss = loss + center_coefficient * torch.mean((chosen + rejected) ** 2)
    return {"loss": loss, "bt": bt, "corr_quality": rho_q, "corr_length": rho_l, "ortho": ortho}


def odin_loss(trainer: Any, model: Any, inputs: dict[str, Any]) -> tuple[Any, Any, Any, dict[str, Any]]:
    """The ODIN loss on packed (qrm's collator) or padded (TRL's) batches.

    Args:
        trainer (`QrmRewardTrainer`): the trainer (its arguments and, for packed batches, its reward head).
        model (`torch.nn.Module`): the model as `compute_loss` gets it.
        inputs (`dict`): the batch, with `RESPONSE_LEN_KEY`.

    Returns:
        `tuple`: (loss, quality-head rewards of the 2B responses (what TRL's metrics are logged for), tokens of the
        batch as TRL counts them, the terms `bt`, `corr_quality`, `corr_length`, `ortho`).
    """
    from .packing import INDEX_KEY, TOKENS_KEY, packed_logits

    response_len = inputs.pop(RESPONSE_LEN_KEY)
    if INDEX_KEY in inputs:
        logits = packed_logits(model, trainer.reward_head(), inputs)
        n_tokens = inputs[TOKENS_KEY]
    else:
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False).logits
        n_tokens = inputs["attention_mask"].sum()
    if logits.shape[-1] != 2:
        raise RuntimeError(f"length_debias=odin expects [quality, length] logits, got {logits.shape[-1]} columns")
    terms = odin_objective(
        logits[:, 0],
        logits[:, 1],
        response_len,
        head_weight(score_head(model)),
        length_head(model).weight,
        inputs.get("margin"),
        trainer.args.odin_length_weight,
        trainer.args.odin_ortho_weight,
        trainer.args.center_rewards_coefficient,
    )
    loss = terms.pop("loss")
    return loss, logits[:, 0], n_tokens, terms


def restore_length_head(model: Any, checkpoint: str | os.PathLike | None) -> None:
    """Before resuming from `checkpoint`, load its length head into `model` (a no-op without a length head or
    checkpoint): the Trainer restores the adapter, optimizer and RNG, qrm the head it keeps outside the adapter."""
    if checkpoint is not None and length_head(model) is not None:
        load_length_head(model, checkpoint)


def with_response_lengths(collator: Any, args: Any, tokenizer: Any) -> Any:
    """The collator to train with: `collator` unchanged without ODIN; with it, wrapped in `ResponseLengthCollator`
    (None, TRL's default, becomes TRL's `DataCollatorForPreference` as RewardTrainer would build it)."""
    if getattr(args, "length_debias", "none") != "odin":
        return collator
    if collator is None:
        from trl.trainer.reward_trainer import DataCollatorForPreference

        collator = DataCollatorForPreference(tokenizer.pad_token_id, pad_to_multiple_of=args.pad_to_multiple_of)
    return ResponseLengthCollator(collator)
