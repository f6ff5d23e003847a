"""Padding-free packing of preference pairs, with each pair's shared prefix computed once.

A batch of B pairs becomes one row of T tokens, T = the sum over pairs of (prefix + chosen tail + rejected tail)
with prefix sharing, or of (chosen + rejected) without it. No padding is computed. Positions restart for every
sequence (the rejected tail continues from the end of the prefix, as in its own padded row), and a mask keeps
every token inside its own sequence: with prefix sharing both tails attend to the prefix and not to each other.
The rewards are read at each sequence's last token, so on a causal decoder the packed forward gives the same
rewards and gradients as TRL's padded one.

Prefix sharing as in "Accelerating Direct Preference Optimization with Prefix Sharing" (arXiv 2410.20305),
here for Bradley-Terry reward models on a 4-bit backbone.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Any

import torch

from .model import score_head, unwrap

logger = logging.getLogger("qrm")

INDEX_KEY = "qrm_reward_index"  # positions of the 2B rewards in the packed row: chosen first, then rejected
SEGMENT_KEY = "qrm_segment"  # pair (or sequence) id per token
BRANCH_KEY = "qrm_branch"  # 0 shared prefix, 1 chosen tail, 2 rejected tail
TOKENS_KEY = "qrm_num_tokens"  # tokens of chosen + rejected as TRL counts them (its num_tokens metric)

# Attention kernels that take the explicit mask prefix sharing needs; flash_attention_2 takes only sequence
# boundaries (from position_ids), which is packing without sharing.
MASKED_ATTENTION = ("sdpa", "eager", "flex_attention", "qrm_sdpa_pairs")
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3", "kernels-community/flash-attn")


def shared_prefix_len(chosen: list[int], rejected: list[int]) -> int:
    """Tokens both sequences start with, leaving each at least its last token (where the reward is read)."""
    n = min(len(chosen), len(rejected)) - 1
    i = 0
    while i < n and chosen[i] == rejected[i]:
        i += 1
    return i


@dataclass
class PairPackingCollator:
    """Collate preference pairs into one packed row (see the module docstring).

    Returns `input_ids` and `position_ids` of shape (1, T), the per-token segment and branch ids that the trainer
    turns into the attention mask on the device, the reward positions, `margin` when present, and the token count.
    """

    prefix_sharing: bool = True
    pad_to_multiple_of: int | None = None  # kernels that like aligned lengths; padding is its own segment
    read_first: bool = False  # encoders pool their first token ([CLS]); decoders are read at the last token

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids: list[int] = []
        pos: list[int] = []
        seg: list[int] = []
        branch: list[int] = []
        chosen_at: list[int] = []
        rejected_at: list[int] = []
        for i, ex in enumerate(examples):
            c, r = list(ex["chosen_ids"]), list(ex["rejected_ids"])
            if self.prefix_sharing and not self.read_first:
                p = shared_prefix_len(c, r)
                ids += c + r[p:]
                pos += [*range(len(c)), *range(p, len(r))]
                seg += [i] * (len(c) + len(r) - p)
                branch += [0] * p + [1] * (len(c) - p) + [2] * (len(r) - p)
                chosen_at.append(len(ids) - (len(r) - p) - 1)
                rejected_at.append(len(ids) - 1)
            else:
                for k, (s, at) in enumerate(((c, chosen_at), (r, rejected_at))):
                    at.append(len(ids) if self.read_first else len(ids) + len(s) - 1)
                    ids += s
                    pos += range(len(s))
                    seg += [2 * i + k] * len(s)
                    branch += [0] * len(s)
        if self.pad_to_multiple_of:
            extra = -len(ids) % self.pad_to_multiple_of
            ids += [0] * extra
            pos += range(extra)
            seg += [-1] * extra  # a segment of its own: attends only to itself, read by nobody
            branch += [0] * extra
        out = {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "position_ids": torch.tensor([pos], dtype=torch.long),
            SEGMENT_KEY: torch.tensor([seg], dtype=torch.long),
            BRANCH_KEY: torch.tensor([branch], dtype=torch.long),
            INDEX_KEY: torch.tensor(chosen_at + rejected_at, dtype=torch.long),
            TOKENS_KEY: torch.tensor(sum(len(ex["chosen_ids"]) + len(ex["rejected_ids"]) for ex in examples)),
        }
        if "margin" in examples[0]:
            out["margin"] = torch.tensor([float(ex["margin"]) for ex in examples], dtype=torch.float)
        return out


def allowed(
    segment: torch.Tensor,
    branch: torch.Tensor,
    causal: bool = True,
    positions: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """(T, T) bool: query i may attend key j. Same sequence, j not after i (causal), j in the prefix or i's branch;
    with a sliding `window`, also pos(i) - pos(j) < window, in position ids: the distance the two tokens have in
    their own padded row (transformers' `sliding_window_overlay`), which the packed row's index does not give."""
    seg, br = segment.view(-1), branch.view(-1)
    same = seg[:, None] == seg[None, :]
    if not causal:
        return same  # encoders: every token of a sequence sees the whole sequence
    idx = torch.arange(seg.numel(), device=seg.device)
    before = idx[None, :] <= idx[:, None]
    visible = (br[None, :] == 0) | (br[None, :] == br[:, None])
    out = same & before & visible
    if window is not None and positions is not None:
        pos = positions.view(-1)
        out &= (pos[:, None] - pos[None, :]) < window
    return out


def sliding_window(config: Any) -> tuple[int | None, bool]:
    """(window, per-layer) of a decoder config: the sliding window its attention layers use, and whether only the
    layers `layer_types` marks `sliding_attention` use it (Gemma 2/3, Qwen2: the model then takes a dict of masks
    by layer type) rather than every layer (Mistral-style: `sliding_window` alone). (None, False): no window."""
    window = getattr(config, "sliding_window", None)
    if not window:
        return None, False
    types = getattr(config, "layer_types", None)
    if types is not None:
        return (window, True) if "sliding_attention" in types else (None, False)
    return window, False


def attention_mask(
    segment: torch.Tensor,
    branch: torch.Tensor,
    implementation: str,
    dtype: torch.dtype,
    causal: bool = True,
    positions: torch.Tensor | None = None,
    window: tuple[int | None, bool] = (None, False),
) -> Any:
    """The mask in the form the model's attention kernel takes (None for varlen flash attention, which applies
    sliding windows itself). With a sliding `window` (see `sliding_window`) and per-layer types, a dict
    `{"full_attention": mask, "sliding_attention": mask}`, which such models take as given."""
    if implementation in VARLEN_ATTENTION:
        if bool((branch != 0).any()):
            raise ValueError(f"prefix sharing needs an explicit mask, which {implementation} cannot take")
        return None  # transformers derives the varlen boundaries from position_ids restarting at 0
    size, per_layer = window
    if size is not None and positions is not None and per_layer:
        return {
            "full_attention": _one_mask(segment, branch, implementation, dtype, causal),
            "sliding_attention": _one_mask(segment, branch, implementation, dtype, causal, positions, size),
        }
    return _one_mask(segment, branch, implementation, dtype, causal, positions, size)


def _one_mask(
    segment: torch.Tensor,
    branch: torch.Tensor,
    implementation: str,
    dtype: torch.dtype,
    causal: bool,
    positions: torch.Tensor | None = None,
    window: int | None = None,
) -> Any:
    if implementation == "flex_attention":
        return _block_mask(segment, branch, causal, positions, window)
    mask = allowed(segment, branch, causal, positions, window)[None, None]
    if implementation == "sdpa":
        return mask  # True = attend
    # eager (and others) add the mask to the scores
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def _block_mask(
    segment: torch.Tensor,
    branch: torch.Tensor,
    causal: bool = True,
    positions: torch.Tensor | None = None,
    window: int | None = None,
) -> Any:
    # FlexAttention skips the blocks this mask empties: compute grows with the sum of squared pair lengths, not T^2.
    from torch.nn.attention.flex_attention import create_block_mask

    seg, br = segment.view(-1), branch.view(-1)
    pos = positions.view(-1) if positions is not None and window is not None else None

    def mask_mod(b: Any, h: Any, q: Any, kv: Any) -> Any:
        if not causal:
            return seg[q] == seg[kv]
        ok = (seg[q] == seg[kv]) & (kv <= q) & ((br[kv] == 0) | (br[kv] == br[q]))
        return ok if pos is None else ok & (pos[q] - pos[kv] < window)

    n = seg.numel()
    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=n, KV_LEN=n, device=seg.device)


PAIR_BLOCKS = "qrm_sdpa_pairs"  # sdpa, one call per pair block: attention cost sum(n_i^2) instead of T^2
BLOCKS_KWARG = "qrm_pair_blocks"  # passed down through the model's **kwargs to the attention function


class _Block:
    """One pair's (or sequence's) slice [start, end) of the packed row and its masks: the full one, and per sliding
    window size the windowed one, built once per forward and reused by every layer of that kind."""

    def __init__(self, start: int, end: int, mask: Any, positions: torch.Tensor | None):
        self.start, self.end, self.mask, self.positions = start, end, mask, positions
        self._windowed: dict[int, Any] = {}

    def mask_for(self, window: int | None) -> Any:
        # Positions in a block never exceed its length, so a window at least that long changes nothing (the common
        # case); deciding on the length needs no device sync.
        if window is None or self.mask is None or self.positions is None or self.end - self.start <= window:
            return self.mask
        if window not in self._windowed:
            pos = self.positions
            self._windowed[window] = self.mask & ((pos[:, None] - pos[None, :]) < window)[None, None]
        return self._windowed[window]


def _pair_blocks(attend: Any) -> Any:
    def forward(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any) -> Any:
        blocks = kwargs.pop(BLOCKS_KWARG, None)
        if blocks is None:  # an ordinary (padded) batch: plain sdpa
            return attend(module, query, key, value, attention_mask, **kwargs)
        # Every transformers attention layer passes its own `sliding_window` (None for full-attention layers); sdpa
        # itself ignores it (the model's mask carries it), so each block's mask applies it here.
        window = kwargs.get("sliding_window")
        # split, not slicing: the backward of a split is one cat, a slice's backward zero-fills the whole tensor
        sizes = [b.end - b.start for b in blocks]
        parts = zip(query.split(sizes, 2), key.split(sizes, 2), value.split(sizes, 2), blocks, strict=True)
        out = [attend(module, q, k, v, b.mask_for(window), **kwargs)[0] for q, k, v, b in parts]
        return torch.cat(out, dim=1), None  # (1, T, heads, head_dim), as sdpa_attention_forward returns it

    return forward


def use_pair_blocks(model: Any) -> bool:
    """Switch an sdpa model to per-pair-block sdpa (same maths; padded batches still run plain sdpa)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    base = unwrap(model)
    if getattr(base.config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(PAIR_BLOCKS, _pair_blocks(sdpa_attention_forward))
    AttentionMaskInterface.register(PAIR_BLOCKS, sdpa_mask)
    base.config._attn_implementation = PAIR_BLOCKS
    return True


def restore_attention(model: Any) -> None:
    """Undo `use_pair_blocks`, so that nothing saved or scored later sees the private kernel name."""
    base = unwrap(model)
    if getattr(base.config, "_attn_implementation", None) == PAIR_BLOCKS:
        base.config._attn_implementation = "sdpa"


def _blocks(segment: torch.Tensor, branch: torch.Tensor, positions: torch.Tensor, causal: bool = True) -> list[_Block]:
    seg, br, pos = segment.view(-1), branch.view(-1), positions.view(-1)
    change = torch.nonzero(seg[1:] != seg[:-1]).view(-1).tolist()  # one host sync per forward, not per layer
    bounds = [0, *(c + 1 for c in change), seg.numel()]
    if not causal:  # a whole block attends to itself: no mask at all (sdpa's fastest path)
        return [_Block(s, e, None, None) for s, e in itertools.pairwise(bounds)]
    return [_Block(s, e, allowed(seg[s:e], br[s:e])[None, None], pos[s:e]) for s, e in itertools.pairwise(bounds)]


def _pooler(base: Any) -> torch.nn.Module | None:
    """The [CLS] pooler of a BERT-style classifier (encoder -> pooler -> dropout -> classifier), else None."""
    body = getattr(base, getattr(base, "base_model_prefix", ""), None)
    pooler = getattr(body, "pooler", None)
    return pooler if pooler is not None and hasattr(base, "classifier") else None


def head_module(model: Any) -> torch.nn.Module | None:
    """The score head of a last-token decoder (`qrm.model.score_head`: under PEFT, its ModulesToSaveWrapper); None
    for a BERT-style encoder, whose rewards are its own logits."""
    return None if is_encoder(model) else score_head(model)


def is_encoder(model: Any) -> bool:
    """A BERT-style classifier: bidirectional, pooled at the first token."""
    base = unwrap(model)
    return _pooler(base) is not None and not base.config.is_decoder


def support(model: Any) -> tuple[bool, bool, str]:
    """(packing, prefix_sharing, why not) for this model: last-token-pooling decoders with a known attention kernel."""
    from transformers.modeling_layers import GenericForSequenceClassification

    base = unwrap(model)
    impl = getattr(base.config, "_attn_implementation", None) or "eager"
    if is_encoder(base):
        # Bidirectional attention: a token of the prompt sees the response, so nothing can be shared.
        ok = impl in MASKED_ATTENTION
        return ok, False, f"{type(base).__name__} is an encoder" + ("" if ok else f" with {impl!r} attention")
    if not isinstance(base, GenericForSequenceClassification):
        return False, False, f"{type(base).__name__} is neither a last-token decoder nor a BERT-style encoder"
    if impl in MASKED_ATTENTION:
        return True, True, ""
    if impl in VARLEN_ATTENTION:
        return True, False, f"{impl} takes sequence boundaries only, not the prefix-sharing mask"
    return False, False, f"attention implementation {impl!r} takes neither a custom mask nor packed positions"


def packed_rewards(model: Any, head: torch.nn.Module | None, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Forward one packed row and return the 2B rewards (chosen first), read at INDEX_KEY."""
    return packed_logits(model, head, inputs)[:, 0]


def packed_logits(model: Any, head: torch.nn.Module | None, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Forward one packed row and return the (2B, n) head outputs (chosen first), read at INDEX_KEY; n is 1, or 2
    with an ODIN length head appended to the score head (qrm/odin.py).

    Decoders: the head runs on every position (as in the padded forward) and a hook reads the 2B positions.
    BERT-style encoders: the pooler is given the 2B [CLS] states, so the model's own logits are the rewards."""
    inner = unwrap(model)
    impl = getattr(inner.config, "_attn_implementation", None) or "eager"
    pooler = _pooler(inner) if is_encoder(inner) else None
    causal = pooler is None
    device = inputs["input_ids"].device
    dtype = next(inner.parameters()).dtype if head is None else next(head.parameters()).dtype
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        dtype = torch.float32
    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
    extra: dict[str, Any] = {}
    positions = inputs["position_ids"]
    if impl == PAIR_BLOCKS:
        extra[BLOCKS_KWARG] = _blocks(inputs[SEGMENT_KEY], inputs[BRANCH_KEY], positions, causal)
        # Any 4D mask makes transformers skip building its own T x T mask; the blocks carry the real ones.
        mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)
    else:
        window = sliding_window(inner.config) if causal else (None, False)
        mask = attention_mask(inputs[SEGMENT_KEY], inputs[BRANCH_KEY], impl, dtype, causal, positions, window)
    index = inputs[INDEX_KEY]
    if pooler is not None:
        # BERT's pooler reads hidden[:, 0]; hand it the [CLS] state of every packed sequence as a batch of 2B.
        hook = pooler.register_forward_pre_hook(lambda _m, args: (args[0][0, index][:, None, :],))
        extra["token_type_ids"] = torch.zeros_like(inputs["input_ids"])  # BERT's buffer stops at 512 positions
    else:
        extra["use_cache"] = False
        captured: list[torch.Tensor] = []
        hook = head.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        out = model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"], attention_mask=mask, **extra)
    finally:
        hook.remove()
    if pooler is not None:
        return out.logits
    return captured[-1][0, index]  # (1, T, n) logits of every position; the 2B read positions matter
