"""Tiny randomly initialised backbones of real architectures, built offline (tests, benchmarks, shrunk recipes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SPECIAL = {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>"}


def train_tokenizer(texts: list[str], vocab_size: int = 512) -> Any:
    """A byte-level BPE tokenizer trained on `texts`, with BOS added in front of every sequence (as Llama)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL["unk"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = SPECIAL["bos"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL["bos"],
        eos_token=SPECIAL["eos"],
        pad_token=SPECIAL["pad"],
        unk_token=SPECIAL["unk"],
    )


def shrink_config(
    config: Any, vocab_size: int, hidden: int = 64, layers: int = 2, intermediate: int | None = None
) -> Any:
    """Same architecture class, tiny shapes: `layers` layers, `hidden` width, small MLP (2 x hidden unless
    `intermediate`) and vocab."""
    heads = 4
    updates = {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": 2 if getattr(config, "num_key_value_heads", None) else None,
        "intermediate_size": intermediate or hidden * 2,
        "vocab_size": vocab_size,
        "head_dim": hidden // heads if hasattr(config, "head_dim") else None,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "layer_types": None,
    }
    for key, value in updates.items():
        if value is not None and hasattr(config, key):
            setattr(config, key, value)
    if getattr(config, "layer_types", None) is not None:
        # Interleaved sliding/full attention (Gemma-2, Qwen2) lists one entry per layer.
        config.layer_types = config.layer_types[:layers]
    if hasattr(config, "sliding_window") and config.sliding_window:
        # Shorter than the tests' 100-200 token pairs, so packed masks must apply the window as the padded forward
        # does (Gemma 2/3's sliding layers); the real windows (512-4096) would never be reached at these lengths.
        config.sliding_window = min(config.sliding_window, 48)
    return config


def build_tiny_model(
    out_dir: str | Path,
    config: Any,
    texts: list[str],
    seed: int = 0,
    vocab_size: int = 512,
    hidden: int = 64,
    layers: int = 2,
    intermediate: int | None = None,
) -> Path:
    """Save a random-init model of `config`'s architecture (shrunk to `hidden` x `layers`) plus a trained tokenizer
    to `out_dir`, the way pretrained checkpoints are saved: a decoder as its `*ForCausalLM` (with an LM head and
    no score head, so qrm initialises the head as it does for a real base), anything else as the bare `AutoModel`
    (`BertModel`)."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    out = Path(out_dir)
    tok = train_tokenizer(texts, vocab_size=vocab_size)
    cfg = shrink_config(config, vocab_size=len(tok), hidden=hidden, layers=layers, intermediate=intermediate)
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    # BERT's causal class (BertLMHeadModel) is not how encoder checkpoints ship; decoders' is `*ForCausalLM`.
    causal = AutoModelForCausalLM._model_mapping.get(type(cfg), None)
    auto = AutoModelForCausalLM if causal is not None and causal.__name__.endswith("ForCausalLM") else AutoModel
    torch.manual_seed(seed)
    model = auto.from_config(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "qrm_tiny.json").write_text(json.dumps({"architecture": type(model).__name__, "seed": seed}) + "\n")
    return out


def build_tiny_llama(out_dir: str | Path, texts: list[str], seed: int = 0) -> Path:
    """A 2-layer Llama (hidden 64) with a BPE tokenizer trained on `texts`."""
    from transformers import LlamaConfig

    return build_tiny_model(out_dir, LlamaConfig(), texts, seed=seed)
