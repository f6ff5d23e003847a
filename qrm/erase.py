"""Post-hoc length erasure (`length_debias: erase`): after Bradley-Terry training, the score head is edited once so
that on the training responses the reward no longer correlates with response length. The exported model stays an
ordinary one-label classifier whose weights carry the correction, so vLLM, pipelines and RL clients score the
debiased reward with nothing to add at inference.

With h the score head's input for a response (a decoder's last-token state, a BERT encoder's pooled [CLS]), r = w·h
(+ b) its reward, z the standardised rank of its response length among the training responses, Σ = Cov(h) and
c = Cov(h, z):

    w' = w − β u,    u = (Σ + λI)⁻¹ c,    β = (w·c) / (u·c)

so Cov(w'·h, z) = 0. Among all heads with that property w' changes the training rewards least (it minimises
Var((w' − w)·h); the Lagrange condition puts the change along Σ⁻¹c), so what the reward knows besides length is kept.
u is the least-squares probe of length from the features: the one-concept case of LEACE (Belrose et al., "LEACE:
Perfect linear concept erasure in closed form", NeurIPS 2023, arXiv 2306.03819) applied to the head's output. The
post-hoc approach follows Huang et al., "Post-hoc Reward Calibration: A Case Study on Length Bias" (ICLR 2025,
arXiv 2409.17407), who subtract a length trend from rewards at scoring time; that needs the length beside every
score, so here the trend is read from the features instead. Ranks, not token counts: Spearman is how length bias is
reported, and response lengths are heavy-tailed. λ = 1e-3·tr(Σ)/dim keeps the solve stable when features are
collinear; the head's bias (when it has one) moves so the mean training reward is unchanged.

Training itself is plain Bradley-Terry, so packing, prefix sharing, resume and the non-finite guard are untouched;
the edit runs once at the end, before the end-of-training evaluation, and `length_erase.json` beside the adapter
records it. Under DDP each process scores its share and the sums are all-reduced, so every rank makes the same edit.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import NonFiniteError
from .files import LENGTH_ERASE_FILE
from .model import score_head, trained_head

logger = logging.getLogger("qrm")

# Training pairs the statistics are read from (evenly spaced over the training set): 2x2048 responses estimate a
# covariance of a few thousand features well enough; more only costs scoring time.
ERASE_PAIRS = 2048
RIDGE = 1e-3


@contextlib.contextmanager
def _with_features(model: Any) -> Iterator[None]:
    """Within the block the model's logits are [reward, h...]: the score head's input appended to its output, pooled
    by the model exactly as its reward is (last non-pad token, or BERT's pooled [CLS])."""
    head = score_head(model)
    hook = head.register_forward_hook(lambda _m, args, out: torch.cat([out, args[0].to(out.dtype)], -1))
    try:
        yield
    finally:
        hook.remove()


def _ranks(values: Sequence[float]) -> torch.Tensor:
    """Standardised average ranks (ties share their mean rank) as float64."""
    from scipy.stats import rankdata

    ranks = torch.as_tensor(rankdata(values), dtype=torch.float64)
    return (ranks - ranks.mean()) / ranks.std(unbiased=False).clamp_min(1e-12)


def _sample(rows: Sequence[dict], limit: int) -> list[dict]:
    """At most `limit` rows, evenly spaced (deterministic, the same on every process)."""
    if len(rows) <= limit:
        return list(rows)
    step = len(rows) / limit
    return [rows[int(i * step)] for i in range(limit)]


def _statistics(model: Any, rows: list[dict], pad_token_id: int, batch_size: int) -> dict[str, torch.Tensor]:
    """Sums over this process's share of the responses: n, Σh, Σhhᵀ, Σz, Σhz, Σz², Σr, Σr², Σrz (float64), with z
    the standardised length rank over all the sampled responses; all-reduced across processes."""
    import torch.distributed as dist

    from .reward_model import logits_ids

    lengths = [len(r[k]) - r["prompt_len"] for k in ("chosen_ids", "rejected_ids") for r in rows]
    seqs = [r[k] for k in ("chosen_ids", "rejected_ids") for r in rows]
    z_all = _ranks(lengths)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
    per = -(-len(seqs) // world)
    mine = range(rank * per, min(len(seqs), (rank + 1) * per))
    with _with_features(model):
        logits = logits_ids(model, [seqs[i] for i in mine], pad_token_id, batch_size).double()
    r, h, z = logits[:, 0], logits[:, 1:], z_all[list(mine)]
    stats = {
        "n": torch.tensor([float(len(mine))], dtype=torch.float64),
        "h": h.sum(0),
        "hh": h.T @ h,
        "z": z.sum().reshape(1),
        "hz": h.T @ z,
        "zz": (z * z).sum().reshape(1),
        "r": r.sum().reshape(1),
        "rr": (r * r).sum().reshape(1),
        "rz": (r * z).sum().reshape(1),
    }
    if distributed:
        device = next(model.parameters()).device
        backend_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
        for key, value in stats.items():
            moved = value.to(backend_device)
            dist.all_reduce(moved)
            stats[key] = moved.cpu()
    return stats


def _pearson(sxy: float, sx: float, sy: float, sxx: float, syy: float, n: float) -> float:
    cov, vx, vy = sxy / n - sx * sy / n**2, sxx / n - (sx / n) ** 2, syy / n - (sy / n) ** 2
    return cov / math.sqrt(vx * vy) if vx > 0 and vy > 0 else 0.0


def solve(stats: dict[str, torch.Tensor], weight: torch.Tensor) -> dict[str, Any]:
    """The head edit from the sums of `_statistics`.

    Args:
        stats (`dict[str, torch.Tensor]`): the sums (n, h, hh, z, hz, zz, r, rr, rz).
        weight (`torch.Tensor`): the score head's weight, shape (1, dim).

    Returns:
        `dict` with `delta` (the change of the weight, float64, shape (dim,)), `bias_shift`, `beta`, and the
        training correlations `pearson_rank_before` / `pearson_rank_after` and `reward_change_std` / `reward_std`.
    """
    n = float(stats["n"])
    mean_h, mean_z = stats["h"] / n, float(stats["z"]) / n
    sigma = stats["hh"] / n - torch.outer(mean_h, mean_h)
    c = stats["hz"] / n - mean_h * mean_z
    w = weight.detach().double().reshape(-1).cpu()
    dim = sigma.shape[0]
    lam = RIDGE * float(torch.trace(sigma)) / dim
    u = torch.linalg.solve(sigma + lam * torch.eye(dim, dtype=torch.float64), c)
    uc, wc = float(u @ c), float(w @ c)
    beta = wc / uc if uc > 0 else 0.0
    delta = -beta * u
    before = _pearson(*(float(stats[k]) for k in ("rz", "r", "z", "rr", "zz")), n)
    # Cov(r', z) = Cov(r, z) + delta·c; Var(r') = Var(r) + 2 delta·Σw + deltaᵀΣ delta.
    var_r = float(w @ sigma @ w)
    cov_after = wc + float(delta @ c)
    var_after = var_r + 2 * float(delta @ sigma @ w) + float(delta @ sigma @ delta)
    var_z = float(stats["zz"]) / n - mean_z**2
    after = cov_after / math.sqrt(var_after * var_z) if var_after > 0 and var_z > 0 else 0.0
    return {
        "delta": delta,
        "bias_shift": -float(delta @ mean_h),
        "beta": beta,
        "pearson_rank_before": before,
        "pearson_rank_after": after,
        "reward_std": math.sqrt(max(var_r, 0.0)),
        "reward_change_std": math.sqrt(max(float(delta @ sigma @ delta), 0.0)),
        "responses": int(n),
        "ridge": lam,
    }


def erase_length(
    model: Any, rows: Sequence[dict], pad_token_id: int, batch_size: int, out: str | os.PathLike | None
) -> dict[str, Any]:
    """Edit the trained model's score head in place so the reward is uncorrelated with response-length rank on the
    training responses; write `length_erase.json` into `out` (the main process passes it, the others None).

    Args:
        model (`torch.nn.Module`): the trained reward model (unwrapped; a collective under DDP: call on every rank).
        rows (`Sequence[dict]`): the tokenized training pairs (`chosen_ids`, `rejected_ids`, `prompt_len`).
        pad_token_id (`int`): the tokenizer's pad token.
        batch_size (`int`): sequences per forward.
        out (`str` or `os.PathLike`, *optional*): where the record goes.

    Returns:
        `dict`: the record (without the weight change).
    """
    sample = _sample(rows, ERASE_PAIRS)
    logger.info("length_debias=erase: reading the score head's inputs on %d training pairs", len(sample))
    stats = _statistics(model, sample, pad_token_id, batch_size)
    head = trained_head(score_head(model))
    weight = head.weight
    fix = solve(stats, weight)
    if not all(math.isfinite(fix[k]) for k in ("beta", "bias_shift", "pearson_rank_after")):
        raise NonFiniteError(f"length_debias=erase: the head edit is not finite ({fix['beta']=}); nothing was changed")
    with torch.no_grad():
        weight.add_(fix.pop("delta").to(weight.dtype).to(weight.device).reshape(weight.shape))
        bias = head.bias
        if bias is not None:
            bias.add_(fix["bias_shift"])
    fix["pairs"] = len(sample)
    logger.info(
        "length_debias=erase: score head edited on %d training responses: corr(reward, length rank) %+.3f -> %+.3f "
        "(reward change std %.3g of %.3g)",
        fix["responses"],
        fix["pearson_rank_before"],
        fix["pearson_rank_after"],
        fix["reward_change_std"],
        fix["reward_std"],
    )
    if out is not None:
        Path(out, LENGTH_ERASE_FILE).write_text(json.dumps(fix, indent=2) + "\n", encoding="utf-8")
    return fix
