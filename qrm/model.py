"""Backbone loading: tokenizer with a real pad token, 4-bit sequence classifier with an unquantized head, LoRA."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from pathlib import Path
from typing import Any

import torch

from .config import LoraArguments, ModelArguments, read_recipe, recipe_max_length
from .source import resolve_path

logger = logging.getLogger(__name__)

# Tokens that some families reserve for padding and that are never an end-of-sequence marker.
PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", "<|endoftext|>", "<unk>")


def torch_dtype(name: str) -> torch.dtype:
    """`torch.bfloat16` for `"bfloat16"`; raises `ValueError` for a name that is not a torch dtype."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def resolve_precision(margs: ModelArguments, targs: Any) -> str | None:
    """Make `bf16`, `fp16` and `mixed_precision` of `targs` agree with the 4-bit compute dtype, the one dtype rule
    for training. Returns a one-line note of what changed, or None.

    - compute dtype float32 (CPUs without bf16 units): fp32 throughout, autocast off;
    - a 16-bit compute dtype with autocast off: TRL casts LoRA and head to bf16 for 4-bit models, so the head matmul
      would mix dtypes; bf16 autocast goes on.

    `TrainingArguments.__post_init__` derives `mixed_precision` (what the Trainer hands accelerate) from bf16/fp16,
    so both are set here, never one alone."""
    if not margs.load_in_4bit:
        return None
    if margs.bnb_4bit_compute_dtype == "float32":
        if not (targs.bf16 or targs.fp16):
            return None
        targs.bf16 = targs.fp16 = False
        targs.mixed_precision = "no"
        return "bnb_4bit_compute_dtype=float32: training in fp32 (bf16/fp16 autocast off)"
    if targs.bf16 or targs.fp16:
        return None
    targs.bf16, targs.mixed_precision = True, "bf16"
    return f"4-bit backbone with {margs.bnb_4bit_compute_dtype} compute: bf16 autocast on (bf16=True)"


def trainable_dtype(margs: ModelArguments) -> torch.dtype | None:
    """The dtype LoRA and head weights train in when it differs from TRL's choice, else None.

    TRL casts trainable weights of a quantized model to bf16 (trl/trainer/reward_trainer.py); with an fp32 compute
    dtype (bf16 matmuls measured 7x slower on CPUs without bf16 units) they stay fp32 so nothing needs autocast."""
    return torch.float32 if margs.load_in_4bit and margs.bnb_4bit_compute_dtype == "float32" else None


def cast_trainables(model: Any, dtype: torch.dtype, floating_only: bool = False) -> None:
    """Cast the trainable parameters of `model` (with `floating_only`: every floating-point one) to `dtype`, in
    place; call it before the optimizer exists."""
    for p in model.parameters():
        if (p.is_floating_point() if floating_only else p.requires_grad) and p.dtype != dtype:
            p.data = p.data.to(dtype)


def cast_as_trained(model: Any, margs: ModelArguments) -> None:
    """Give a reloaded adapter's LoRA and head weights the dtype they trained in: TRL casts them to bf16 on a 4-bit
    base with a 16-bit compute dtype (trl/trainer/reward_trainer.py), while PEFT reloads them in the base's dtype.
    Scoring then matches training's numerics."""
    if not margs.load_in_4bit or trainable_dtype(margs) is not None:
        return
    for name, p in model.named_parameters():
        if "lora_" in name or "modules_to_save" in name:
            p.data = p.data.to(torch.bfloat16)


def autocast_dtype(model: Any) -> torch.dtype | None:
    """The 16-bit dtype to score `model` under autocast, or None: the 4-bit model as TRL trains it needs it, an
    export does not.

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
    """Autocast context matching how `model` was trained (see `autocast_dtype`)."""
    dtype = autocast_dtype(model)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=next(model.parameters()).device.type, dtype=dtype)


def load_tokenizer(args: ModelArguments, trust_remote_code: bool = False) -> Any:
    """Load the tokenizer and give it a pad token distinct from EOS.

    The sequence classifier reads the reward at the last token that is not padding; a pad equal to EOS would make
    the closing EOS look like padding and move the reward one token back."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        resolve_path(args.model_name_or_path), revision=args.model_revision, trust_remote_code=trust_remote_code
    )
    if tok.pad_token is None or (tok.eos_token is not None and tok.pad_token_id == tok.eos_token_id):
        vocab = tok.get_vocab()
        for cand in PAD_CANDIDATES:
            if cand in vocab and vocab[cand] != tok.eos_token_id:
                tok.pad_token = cand
                break
        else:
            tok.add_special_tokens({"pad_token": "<|qrm_pad|>"})
            logger.warning("tokenizer has no pad token distinct from EOS: added <|qrm_pad|> (embeddings resized)")
    tok.padding_side = "right"
    return tok


def choose_attention(
    requested: str, config: Any = None, cuda: bool | None = None, compute_dtype: str | None = None
) -> str:
    """The attention implementation a model will be loaded with: the one rule, used by training, scoring and
    `qrm plan`.

    Args:
        requested (`str`): the recipe's `attn_implementation`; anything but `auto` is returned as is.
        config (`PretrainedConfig`, *optional*, defaults to `None`): the backbone's config, to ask its
            sequence-classification class what it supports.
        cuda (`bool`, *optional*, defaults to `None`): whether the model will run on CUDA; `None` asks torch.
            `qrm plan` passes `True` (it plans for the GPU machine).
        compute_dtype (`str`, *optional*, defaults to `None`): the 4-bit compute dtype. `float32` rules flash
            attention out: flash-attn takes fp16/bf16 only, and without autocast transformers hands it fp32
            queries (or casts them to the first Linear's dtype, uint8 for a 4-bit layer:
            `transformers/integrations/flash_attention.py`, `get_target_dtype`).

    Returns `flash_attention_2` on CUDA when flash-attn is importable and the class supports it, else `sdpa`, and
    `eager` for a class that supports neither (e.g. Gemma-2's logit soft-capping)."""
    if requested != "auto":
        return requested
    cls = None
    if config is not None:
        from transformers import AutoModelForSequenceClassification

        # transformers has no public lookup from a config to its auto class; `_model_mapping` is what
        # `from_config` itself reads.
        cls = AutoModelForSequenceClassification._model_mapping.get(type(config), None)
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if cuda and compute_dtype != "float32" and importlib.util.find_spec("flash_attn") is not None:
        if cls is None or getattr(cls, "_supports_flash_attn", False):
            return "flash_attention_2"
    if cls is not None and not getattr(cls, "_supports_sdpa", True):
        return "eager"
    return "sdpa"


def meta_model(config: Any, trust_remote_code: bool = False) -> Any:
    """The backbone as a one-label `AutoModelForSequenceClassification` on the meta device: every shape and
    module name, no memory, no download. `config` is copied, not changed."""
    import copy

    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(config)
    config.num_labels = 1  # transformers 5 no longer accepts num_labels as a from_config kwarg
    with torch.device("meta"):
        return AutoModelForSequenceClassification.from_config(config, trust_remote_code=trust_remote_code)


def unwrap(model: Any) -> Any:
    """The transformers model inside DDP/FSDP/accelerate wrappers (`.module`) and PEFT (`get_base_model()`)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _is_head(module: Any) -> bool:
    inner = getattr(module, "original_module", module)  # PEFT's ModulesToSaveWrapper keeps the original
    return isinstance(inner, torch.nn.Linear) and inner.out_features == 1


def head_module_names(config: Any) -> list[str]:
    """Names of the modules that map hidden states to the single reward (`score`, `classifier`, ...).

    The rule (the only one in qrm): the `Linear` layers with one output of the one-label sequence classifier,
    found on a meta-device instance, so any architecture's naming works and nothing is allocated."""
    model = meta_model(config)
    names = [n for n, m in model.named_modules() if _is_head(m)]
    if not names:
        raise ValueError(f"{type(model).__name__}: found no Linear layer with one output to use as the score head")
    # For ModulesToSaveWrapper and the bnb skip list the leaf name is what matters (`score`, `out_proj`, ...).
    return sorted({n.rsplit(".", 1)[-1] for n in names} | {n for n in names})


def score_head(model: Any) -> torch.nn.Module:
    """The live score head of a model, wrapped or not (under PEFT: its `ModulesToSaveWrapper`).

    Same rule as `head_module_names`: the one `Linear` with one output. qrm's own extra heads (ODIN's length
    head, named `qrm_*`) and PEFT's inner copies are not candidates. Raises `ValueError` unless exactly one is found."""
    found = [
        (n, m)
        for n, m in unwrap(model).named_modules()
        if _is_head(m)
        and not any(part.startswith("qrm_") or part in ("modules_to_save", "original_module") for part in n.split("."))
    ]
    if len(found) != 1:
        names = [n for n, _ in found]
        raise ValueError(
            f"{type(unwrap(model)).__name__}: expected one score head (Linear with one output), found {names}"
        )
    return found[0][1]


def trained_head(head: torch.nn.Module) -> torch.nn.Module:
    """The copy of a score head that trains: under PEFT's `ModulesToSaveWrapper` the active adapter's, else the head."""
    if hasattr(head, "modules_to_save") and head.active_adapters:
        return head.modules_to_save[head.active_adapters[0]]
    return head


def load_model(
    margs: ModelArguments,
    largs: LoraArguments,
    tokenizer: Any,
    gradient_checkpointing: bool = True,
    fsdp: bool = False,
    trust_remote_code: bool = False,
) -> Any:
    """4-bit (NF4) AutoModelForSequenceClassification with LoRA adapters and a trainable, unquantized score head."""
    from peft import LoraConfig, TaskType, get_peft_model

    model, heads = load_base(
        margs, tokenizer, gradient_checkpointing=gradient_checkpointing, fsdp=fsdp, trust_remote_code=trust_remote_code
    )
    targets = largs.lora_target_modules
    # PEFT's LoraConfig directly: trl's get_peft_config builds the same object from a trl.ModelConfig, which would
    # be a second copy of qrm's ModelArguments/LoraArguments.
    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=largs.lora_r,
        lora_alpha=largs.lora_alpha,
        lora_dropout=largs.lora_dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        modules_to_save=[h for h in heads if "." not in h],
        use_rslora=largs.use_rslora,
    )
    with quiet_load_report():
        model = get_peft_model(model, lora)
    _check_trainable(model, heads)
    return model


def load_base(
    margs: ModelArguments,
    tokenizer: Any,
    gradient_checkpointing: bool = False,
    fsdp: bool = False,
    trust_remote_code: bool = False,
) -> tuple[Any, list[str]]:
    """The backbone as a one-label sequence classifier, 4-bit unless the recipe says otherwise; returns (model, heads)."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoConfig, AutoModelForSequenceClassification, BitsAndBytesConfig

    path = resolve_path(margs.model_name_or_path)
    config = AutoConfig.from_pretrained(path, revision=margs.model_revision, trust_remote_code=trust_remote_code)
    config.num_labels = 1
    config.pad_token_id = tokenizer.pad_token_id
    heads = margs.head_modules or head_module_names(config)
    attn = choose_attention(
        margs.attn_implementation, config, compute_dtype=margs.bnb_4bit_compute_dtype if margs.load_in_4bit else None
    )
    logger.info("attention implementation: %s; score head modules: %s", attn, heads)
    kwargs: dict[str, Any] = {}
    # Not trl's get_quantization_config: it ties the compute dtype to the weights' dtype and has no skip list, so
    # the new head would be quantized (and nothing would train it in full precision).
    if margs.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=margs.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=margs.bnb_4bit_use_double_quant,
            bnb_4bit_compute_dtype=torch_dtype(margs.bnb_4bit_compute_dtype),
            bnb_4bit_quant_storage=torch_dtype(margs.bnb_4bit_quant_storage),
            # The head is new and must be trained in full precision: never quantize it, whatever its name.
            llm_int8_skip_modules=heads,
        )
    if torch.cuda.is_available() and not fsdp:
        import os

        # accelerate's rule (accelerate/state.py, PartialState.set_device): local rank modulo the visible GPUs,
        # so a launcher that shows each process one GPU (LOCAL_RANK 3, CUDA_VISIBLE_DEVICES=3) loads on cuda:0
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count()}
    # Under FSDP every parameter must share one dtype with the 4-bit storage so the shards flatten together.
    dtype = torch_dtype(margs.bnb_4bit_quant_storage) if fsdp else torch.float32
    with quiet_load_report():
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path,
            config=config,
            revision=margs.model_revision,
            trust_remote_code=trust_remote_code,
            attn_implementation=attn,
            dtype=dtype,
            output_loading_info=True,
            **kwargs,
        )
    _report_missing(info.get("missing_keys") or [], heads)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if margs.load_in_4bit and not fsdp:
        # Upcasts norms/embeddings to fp32 and enables input grads for checkpointing (PEFT's QLoRA recipe).
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    keep_training_matmul(model)
    return model, heads


def keep_training_matmul(model: Any) -> None:
    """Make 4-bit layers compute at inference as they did in training.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a Linear4bit on its first no-grad eval forward for a bf16
    kernel (bitsandbytes/nn/modules.py, Linear4bit.forward; autograd/_functions.py, matmul_4bit then takes
    `gemv_4bit` for every later call, training ones included): inputs and block scales are rounded to bf16, so an
    fp32 run's rewards move by ~1e-3 relative after its first evaluation, and the weights can no longer be
    dequantized exactly for a merge. `load_base` applies this to every model it loads.

    Args:
        model (`torch.nn.Module`): any model; modules without the bitsandbytes flag are left alone."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


@contextlib.contextmanager
def quiet_load_report() -> Any:
    """Silence what loading a base and wrapping it with PEFT prints that says nothing to a qrm user:

    - transformers' load report (missing/unexpected keys): a `*ForCausalLM` or `BertModel` checkpoint has no score
      head, and qrm trains or loads it (`_report_missing` says so in one line); errors (size mismatches, conversion
      errors) still raise;
    - "The following layers were not sharded: ...": transformers 5.23 runs `verify_tp_plan` on every
      `from_pretrained` (modeling_utils.py) and lists every layer of a model whose `_tp_plan` is empty, with no
      tensor parallelism in use;
    - PEFT 0.21's `FutureWarning: is_gradient_checkpointing is deprecated` (peft_model.py reads transformers'
      deprecated property inside `get_peft_model` / `PeftModel.from_pretrained`)."""
    import warnings

    from transformers.utils import logging as hf_logging

    logs = [
        hf_logging.get_logger(n) for n in ("transformers.modeling_utils", "transformers.distributed.tensor_parallel")
    ]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(hf_logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            yield
    finally:
        for log, level in zip(logs, levels, strict=True):
            log.setLevel(level)


def _report_missing(missing: list[str], heads: list[str]) -> None:
    """One line for the expected case (a `*ForCausalLM`/`BertModel` base has no score head, qrm adds it), a warning
    naming the weights for anything else the checkpoint lacks."""
    is_head = [any(k == h or k.startswith(f"{h}.") or f".{h}." in k for h in heads) for k in missing]
    if missing and all(is_head):
        logger.info(
            "score head %s is new (the base checkpoint has none): initialised, trained in full precision", heads
        )
    others = [k for k, h in zip(missing, is_head, strict=True) if not h]
    if others:
        logger.warning("the base checkpoint lacks %d weights, initialised at random: %s", len(others), others[:8])


def _check_trainable(model: Any, heads: list[str]) -> None:
    """Fail loudly if the head is frozen or quantized, or if anything from the 4-bit base is trainable."""
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if not any("lora_" in n for n in trainable):
        raise RuntimeError("no LoRA parameter is trainable: check lora_target_modules")
    leaf = {h.rsplit(".", 1)[-1] for h in heads}
    if not any(f".{h}." in n and "modules_to_save" in n for n in trainable for h in leaf):
        raise RuntimeError(f"score head {heads} is not trainable; it would be neither trained nor saved")
    bad = [n for n, p in model.named_parameters() if p.requires_grad and p.dtype == torch.uint8]
    if bad:
        raise RuntimeError(f"quantized parameters are trainable: {bad[:3]}")


def count_parameters(model: Any) -> dict[str, int]:
    """`{"trainable": n, "total": n}` parameter counts of `model` (4-bit weights count as stored)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "total": total}


def load_adapter_model(path: str | Path) -> tuple[Any, Any, int]:
    """Rebuild the 4-bit base exactly as the recipe beside the adapter says, and load the adapter and head.

    Args:
        path (`str` or `Path`): an adapter dir written by `qrm train`.

    Returns:
        `tuple`: (the `PeftModel`, with LoRA and head in the training dtypes, its tokenizer, training's max_length)."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    path = Path(path)
    margs, recipe = read_recipe(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    with quiet_load_report():  # the head missing from a *ForCausalLM / BertModel base comes from the adapter next
        model, _ = load_base(margs, tokenizer, trust_remote_code=bool(recipe.get("trust_remote_code", False)))
        model = PeftModel.from_pretrained(model, str(path), is_trainable=False)
    cast_as_trained(model, margs)  # LoRA and head in the dtype TRL trained them in
    return model, tokenizer, recipe_max_length(recipe)
