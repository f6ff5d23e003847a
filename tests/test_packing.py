"""Packed and prefix-shared forwards against TRL's padded forward: same rewards, same gradients, same training."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import MINILM, ROOT, hh_rows, write_jsonl
from test_train import _recipe
from trl.trainer.reward_trainer import DataCollatorForPreference

from qrm.config import LoraArguments, ModelArguments, parse_recipe
from qrm.packing import (
    BRANCH_KEY,
    INDEX_KEY,
    SEGMENT_KEY,
    PairPackingCollator,
    allowed,
    head_module,
    packed_rewards,
    shared_prefix_len,
    support,
    use_pair_blocks,
)
from qrm.train import build_trainer


def test_collator_layout_by_hand() -> None:
    pairs = [
        {"chosen_ids": [1, 2, 3, 4], "rejected_ids": [1, 2, 5]},  # prefix [1, 2]
        {"chosen_ids": [7, 8], "rejected_ids": [7, 8, 9]},  # chosen is a prefix of rejected: share only [7]
    ]
    shared = PairPackingCollator(prefix_sharing=True)(pairs)
    assert shared["input_ids"].tolist() == [[1, 2, 3, 4, 5, 7, 8, 8, 9]]
    assert shared["position_ids"].tolist() == [[0, 1, 2, 3, 2, 0, 1, 1, 2]]
    assert shared[BRANCH_KEY].tolist() == [[0, 0, 1, 1, 2, 0, 1, 2, 2]]
    assert shared[INDEX_KEY].tolist() == [3, 6, 4, 8]  # chosen of both pairs, then rejected
    assert shared["qrm_num_tokens"].item() == 4 + 3 + 2 + 3
    plain = PairPackingCollator(prefix_sharing=False)(pairs)
    assert plain["input_ids"].tolist() == [[1, 2, 3, 4, 1, 2, 5, 7, 8, 7, 8, 9]]
    assert plain["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1, 0, 1, 2]]
    assert plain[INDEX_KEY].tolist() == [3, 8, 6, 11]
    padded = PairPackingCollator(prefix_sharing=True, pad_to_multiple_of=8)(pairs)
    assert padded["input_ids"].shape[1] == 16 and padded[INDEX_KEY].tolist() == [3, 6, 4, 8]


def test_mask_keeps_tails_apart() -> None:
    out = PairPackingCollator(prefix_sharing=True)([{"chosen_ids": [1, 2, 3, 4], "rejected_ids": [1, 2, 5, 6]}])
    m = allowed(out[SEGMENT_KEY], out[BRANCH_KEY]).int().tolist()
    # rows: prefix 1, prefix 2, chosen 3, chosen 4, rejected 5, rejected 6
    assert m == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],
        [1, 1, 0, 0, 1, 1],
    ]
    assert shared_prefix_len([1, 2], [1, 2]) == 1  # identical sequences still keep a token each


def _model(path: Path | str, compute: str, attn: str):
    from qrm.model import load_model, load_tokenizer

    margs = ModelArguments(model_name_or_path=str(path), bnb_4bit_compute_dtype=compute, attn_implementation=attn)
    tok = load_tokenizer(margs)
    torch.manual_seed(0)
    model = load_model(
        margs, LoraArguments(lora_r=4, lora_alpha=8, lora_dropout=0.0), tok, gradient_checkpointing=False
    )
    model.config.pad_token_id = tok.pad_token_id
    with torch.no_grad():  # LoRA B starts at zero; make the adapters and the head matter
        for _n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return model, tok


def _pairs(tok, n: int = 6) -> list[dict]:
    from qrm.config import DataArguments
    from qrm.data import DataReport, build_pairs, tokenize_pairs

    rows = hh_rows(n)
    pairs, _report = build_pairs(rows, DataArguments(dataset="x", dataset_format="implicit"), "hh", tok)
    return tokenize_pairs(pairs, tok, 192, DataReport(source="hh"))


def _padded_rewards(model, tok, rows) -> torch.Tensor:
    batch = DataCollatorForPreference(pad_token_id=tok.pad_token_id)(rows)
    return model(**batch, use_cache=False).logits.squeeze(-1)


def _grads(model, loss) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _bt(rewards: torch.Tensor) -> torch.Tensor:
    c, r = rewards.chunk(2)
    return -torch.nn.functional.logsigmoid(c - r).mean()


@pytest.mark.parametrize(
    ("compute", "attn", "share", "tol"),
    [
        ("float32", "sdpa", True, 1e-5),
        ("float32", "qrm_sdpa_pairs", True, 1e-5),
        ("float32", "qrm_sdpa_pairs", False, 1e-5),
        ("float32", "sdpa", False, 1e-5),
        ("float32", "eager", True, 1e-5),
        ("bfloat16", "sdpa", True, 3e-2),  # bf16 autocast: different summation order rounds differently
    ],
)
def test_packed_forward_matches_padded(tiny_llama, compute, attn, share, tol) -> None:
    model, tok = _model(tiny_llama, compute, "sdpa" if attn == "qrm_sdpa_pairs" else attn)
    if attn == "qrm_sdpa_pairs":
        assert use_pair_blocks(model)
    if compute == "bfloat16":
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(torch.bfloat16)  # as TRL trains a 4-bit model
    rows = _pairs(tok)
    head = head_module(model)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if compute == "bfloat16" else torch.autocast("cpu", enabled=False)
    with ctx:
        ref = _padded_rewards(model, tok, rows)
        ref_grads = _grads(model, _bt(ref))
        packed = packed_rewards(model, head, PairPackingCollator(prefix_sharing=share)(rows))
        got_grads = _grads(model, _bt(packed))
    assert ref.abs().max() > 0.05, "rewards too small for the comparison to mean anything"
    scale = ref.abs().max().item()
    assert torch.allclose(packed.float(), ref.float(), atol=tol * scale, rtol=0), (packed, ref)
    assert ref_grads.keys() == got_grads.keys() and len(ref_grads) > 4
    for n, g in ref_grads.items():
        err = (got_grads[n].float() - g.float()).abs().max() / g.float().abs().max().clamp_min(1e-12)
        assert err < max(tol, 1e-4) * 10, f"{n}: relative gradient error {err:.2e}"


BACKBONES = sorted(p.parent for p in (ROOT / "recipes").glob("*/config.json"))


@pytest.mark.parametrize("backbone", BACKBONES, ids=[p.name for p in BACKBONES])
def test_every_backbone_packs_exactly(backbone: Path, tmp_path: Path) -> None:
    """Each recipe's architecture (Llama, Qwen2 with qkv bias, Mistral, Gemma-2 ...), shrunk: prefix-shared rewards
    equal the padded ones in fp32."""
    from transformers import AutoConfig

    from benchmarks.tiny import build_tiny_model

    texts = [r["chosen"] for r in hh_rows(200)]
    path = build_tiny_model(tmp_path / "m", AutoConfig.from_pretrained(backbone), texts)
    model, tok = _model(path, "float32", "auto")
    can_pack, can_share, why = support(model)
    assert can_pack and can_share, why
    rows = _pairs(tok, 4)
    with torch.no_grad():
        ref = _padded_rewards(model, tok, rows)
        got = packed_rewards(model, head_module(model), PairPackingCollator()(rows))
        assert use_pair_blocks(model) or model.get_base_model().config._attn_implementation == "eager"
        blocks = packed_rewards(model, head_module(model), PairPackingCollator()(rows))
    assert ref.abs().max() > 1e-3
    for out in (got, blocks):
        assert torch.allclose(out, ref, atol=1e-5 * ref.abs().max().item(), rtol=0), (out, ref)


def test_flex_attention_block_mask_matches_padded(tiny_llama) -> None:
    """The BlockMask for FlexAttention (the CUDA path that skips empty blocks). CPU flex has no backward: forward only."""
    model, tok = _model(tiny_llama, "float32", "sdpa")
    rows = _pairs(tok, 4)
    with torch.no_grad():
        ref = _padded_rewards(model, tok, rows)
        model.get_base_model().config._attn_implementation = "flex_attention"
        got = packed_rewards(model, head_module(model), PairPackingCollator(prefix_sharing=True)(rows))
    assert torch.allclose(got, ref, atol=1e-5 * ref.abs().max().item(), rtol=0), (got, ref)


def test_support_by_architecture(tiny_llama, tmp_path) -> None:
    model, _ = _model(tiny_llama, "float32", "sdpa")
    assert support(model) == (True, True, "")
    model.get_base_model().config._attn_implementation = "flash_attention_2"
    can_pack, can_share, why = support(model)
    assert can_pack and not can_share and "flash_attention_2" in why


@pytest.fixture(scope="module")
def hh_small(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("d") / "hh.jsonl", hh_rows(32))


def _losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_training_packed_equals_padded(tiny_llama, hh_small, tmp_path) -> None:
    """Four optimizer steps: packed + prefix-shared, packed only, and padded give the same losses and weights."""
    runs = {}
    for name, flags in {
        "shared": [],
        "packed": ["--prefix_sharing", "false"],
        "padded": ["--packing", "false"],
        "checkpointed": ["--gradient_checkpointing", "true"],
    }.items():
        args = parse_recipe(
            [
                *_recipe(
                    tiny_llama, tmp_path / name, hh_small, "--max_steps", "4", "--bnb_4bit_compute_dtype", "float32"
                ),
                "--lora_dropout",
                "0.0",
                *flags,
            ]
        )
        trainer, _ = build_trainer(*args)
        if name == "checkpointed":
            assert trainer.model.get_base_model().is_activation_checkpointing
        collator = type(trainer.data_collator).__name__
        assert collator == ("DataCollatorForPreference" if name == "padded" else "PairPackingCollator")
        trainer.train()
        weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        runs[name] = (_losses(trainer), weights, trainer.state.log_history)
        if name == "shared":  # the trained model: packed, prefix-shared rewards against the plain padded forward
            rows = [trainer.train_dataset[i] for i in range(8)]
            tok = trainer.processing_class
            with torch.no_grad():
                plain = _padded_rewards(trainer.model, tok, rows)
                packed = packed_rewards(trainer.model, head_module(trainer.model), PairPackingCollator()(rows))
            assert torch.allclose(packed, plain, atol=1e-5 * plain.abs().max().item(), rtol=0)
    ref_losses, ref_w, _ = runs["padded"]
    assert len(ref_losses) == 4
    for name in ("shared", "packed", "checkpointed"):
        losses, w, history = runs[name]
        assert losses == pytest.approx(ref_losses, rel=1e-4, abs=1e-5), name
        for n in ref_w:
            # Adam divides each gradient by its running RMS, so a component whose gradient is near zero turns fp32
            # summation-order noise into an update of up to lr size; 3e-5 is under 1 % of one step (lr 5e-3).
            assert torch.allclose(w[n], ref_w[n], atol=3e-5, rtol=1e-4), f"{name}: {n}"
        assert all(h.get("num_tokens", 1) > 0 for h in history)
    # The logged token count means the same thing in every layout (TRL's: chosen + rejected tokens).
    tokens = {k: [h["num_tokens"] for h in v[2] if "num_tokens" in h] for k, v in runs.items()}
    assert tokens["shared"] == tokens["packed"] == tokens["padded"] and tokens["padded"][-1] > 0


@pytest.mark.parametrize("attn", ["sdpa", "qrm_sdpa_pairs", "eager"])
def test_encoder_packed_forward_matches_padded(attn) -> None:
    """Pretrained MiniLM (BERT): packed sequences, bidirectional inside each, [CLS] pooled per sequence."""
    model, tok = _model(MINILM, "float32", "sdpa" if attn == "qrm_sdpa_pairs" else attn)
    if attn == "qrm_sdpa_pairs":
        assert use_pair_blocks(model)
    assert support(model) == (True, False, "BertForSequenceClassification is an encoder")
    rows = _pairs(tok, 8)
    ref = _padded_rewards(model, tok, rows)
    ref_grads = _grads(model, _bt(ref))
    got = packed_rewards(model, head_module(model), PairPackingCollator(read_first=True)(rows))
    got_grads = _grads(model, _bt(got))
    assert torch.allclose(got, ref, atol=1e-5 * ref.abs().max().item(), rtol=0), (got, ref)
    floor = 1e-2 * max(g.abs().max() for g in ref_grads.values())
    for n, g in ref_grads.items():
        # The head's bias gets no gradient from a reward difference (0 up to rounding): compare on the global scale.
        err = (got_grads[n] - g).abs().max() / g.abs().max().clamp_min(floor)
        assert err < 1e-3, f"{n}: relative gradient error {err:.2e}"


def test_encoder_training_packs(hh_small, tmp_path) -> None:
    args = parse_recipe(
        _recipe(MINILM, tmp_path / "o", hh_small, "--max_steps", "2", "--bnb_4bit_compute_dtype", "float32")
    )
    trainer, _ = build_trainer(*args)
    collator = trainer.data_collator
    assert type(collator).__name__ == "PairPackingCollator" and collator.read_first and not collator.prefix_sharing
    trainer.train()
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)


def test_packed_loss_equals_trl_loss_with_margin_and_centering(tiny_llama, hh_small, tmp_path) -> None:
    """The packed `compute_loss` against TRL's own on the same batch: margins and center_rewards_coefficient."""
    args = parse_recipe(
        [
            *_recipe(tiny_llama, tmp_path / "o", hh_small, "--max_steps", "1", "--bnb_4bit_compute_dtype", "float32"),
            *("--lora_dropout", "0.0", "--center_rewards_coefficient", "0.01"),
        ]
    )
    trainer, _ = build_trainer(*args)
    with torch.no_grad():
        for p in trainer.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    rows = [dict(trainer.train_dataset[i], margin=0.5 * i) for i in range(6)]
    trl_batch = DataCollatorForPreference(pad_token_id=trainer.processing_class.pad_token_id)(rows)
    packed_batch = trainer.data_collator(rows)
    trainer.model.eval()  # metrics go to the eval bucket; no token counting
    with torch.no_grad():
        ref = trainer.compute_loss(trainer.model, trl_batch)  # no packed keys: TRL's compute_loss
        got = trainer.compute_loss(trainer.model, packed_batch)
        no_margin = trainer.compute_loss(trainer.model, {k: v for k, v in packed_batch.items() if k != "margin"})
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    assert abs(no_margin.item() - got.item()) > 1e-3, "the margin did not reach the packed loss"
    metrics = trainer._metrics["eval"]
    assert metrics["accuracy"][0] == pytest.approx(metrics["accuracy"][1])
    assert metrics["margin"][0] == pytest.approx(metrics["margin"][1], rel=1e-5)


def test_switching_packing_does_not_block_resume() -> None:
    from qrm.resume import recipe_changes

    assert recipe_changes({"packing": True, "prefix_sharing": True}, {"packing": False, "prefix_sharing": False}) == []
    assert [c[0] for c in recipe_changes({"learning_rate": 1e-4}, {"learning_rate": 2e-4})] == ["learning_rate"]
