"""Export a trained reward model for serving, verified in a fresh process: `qrm merge` and `qrm score`.

* `merge(..., method="exact")` folds the LoRA update into the dequantized NF4 weights the adapter was trained
  against and writes a standalone `AutoModelForSequenceClassification` (safetensors only).
* `merge(..., method="base")` folds it into the original full-precision weights instead (what `merge_and_unload`
  on an unquantized base does); rewards then move, and verification says by how much.
* `merge(..., adapter_only=True)` writes a clean adapter dir for PEFT users (adapter, head, tokenizer, card).
* `score_file` writes rewards for a file of (prompt, response) rows or preference pairs.

Every export is reloaded in a child process (`python -m qrm.export _verify`) and scored on held-out pairs; the
figures go to verification.json and the model card, and a failed check raises `VerificationError`."""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

METHODS = ("exact", "base")
DTYPES = ("auto", "bfloat16", "float16", "float32")
# exact reproduces the trained model, so every pair must keep its order; base changes the weights the adapter was
# trained against, and 0.9 still catches a broken merge while tolerating the expected drift.
DEFAULT_MIN_AGREEMENT = {"exact": 1.0, "base": 0.9, "adapter": 1.0}
DEFAULT_MAX_SHARD_BYTES = 2 * 2**30
VERIFY_FILE = "verify_pairs.jsonl"
COPIED_FILES = ("qrm_recipe.yaml", "qrm_versions.json", "metrics.json")
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}


class ExportError(Exception):
    """An export that cannot go ahead; the message is meant for the user."""


class VerificationError(ExportError):
    """The export was written but does not reproduce the trained model well enough; `report` has the figures."""

    def __init__(self, message: str, report: dict[str, Any]):
        super().__init__(message)
        self.report = report


# ------------------------------------------------------------------------------------------------ merge


def merge(
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    method: str = "exact",
    dtype: str = "auto",
    verify_data: str | os.PathLike | None = None,
    min_agreement: float | None = None,
    force: bool = False,
    adapter_only: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_BYTES,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Merge the adapter in `adapter_dir` into a standalone model in `out_dir`, verify it, return the summary.

    Algorithm (`exact`): the 4-bit base + adapter is loaded exactly as for scoring (`score.load_adapter_model`).
    The output state dict is built one tensor at a time, in the order of a meta-device skeleton of the plain
    `*ForSequenceClassification`: a Linear4bit weight becomes `dequantize_4bit(W) + scale * B @ A` (fp32, the
    values the 4-bit forward multiplies by), the head comes from PEFT's modules_to_save copy, everything else
    (embeddings, norms, biases) is copied; each tensor is cast to `dtype` and appended to a safetensors shard that
    is flushed once it reaches `max_shard_size`. `base` does the same but reads each quantized layer's original
    weight, one tensor at a time, from the base model's safetensors files.

    Peak memory: the 4-bit model (about a quarter of a bf16 merged model, plus fp32 embeddings and norms), one
    layer's fp32 temporaries and one shard (twice, while safetensors serializes it) -- never the whole merged
    model. The child process that verifies the export then loads the export alone: the parent frees its model
    first.

    `dtype="auto"` stores in the recipe's `bnb_4bit_compute_dtype`, the precision the reward model was trained
    and evaluated in. `min_agreement` defaults to 1.0 for exact and adapter-only exports and 0.9 for base.
    Raises ExportError before writing anything when the inputs are wrong, and VerificationError after writing
    when the export does not reproduce the trained model's pairwise decisions."""
    import torch

    from .config import sha256_file
    from .score import load_adapter_model, read_recipe, score_pair_rows

    if method not in METHODS:
        raise ExportError(f"--method {method!r}: expected one of {', '.join(METHODS)}")
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    kind = "adapter" if adapter_only else method
    threshold = DEFAULT_MIN_AGREEMENT[kind] if min_agreement is None else float(min_agreement)
    if not 0.0 <= threshold <= 1.0:
        raise ExportError(f"--min-agreement {threshold}: must be between 0 and 1")
    shard_bytes = parse_size(max_shard_size)
    adapter = Path(adapter_dir).expanduser().resolve()
    if not (adapter / "adapter_config.json").is_file():
        raise ExportError(f"{adapter}: not an adapter dir (no adapter_config.json); pass the output_dir of qrm train")
    out = Path(out_dir).expanduser().resolve()
    _check_out(out, adapter, force)
    try:
        margs, recipe = read_recipe(adapter)
    except FileNotFoundError as e:
        raise ExportError(str(e)) from None
    if dtype == "auto":
        dtype = margs.bnb_4bit_compute_dtype if margs.load_in_4bit else "float32"
    out_dtype = getattr(torch, dtype)

    t0 = time.time()
    model, tokenizer, max_length = load_adapter_model(adapter)
    pairs, stored, source = _verification_pairs(adapter, verify_data, tokenizer, max_length)
    # Reference rewards: the 4-bit model + adapter, recomputed here with the training numerics (fp32 LoRA and head
    # for an fp32 compute dtype, bf16 LoRA/head under bf16 autocast otherwise).
    ref_c, ref_r = score_pair_rows(model, pairs, tokenizer.pad_token_id, batch_size)

    staging = out.parent / f".{out.name}.qrm-partial"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        tok_info = _save_tokenizer(adapter, staging)
        inner = model.get_base_model()
        provenance: dict[str, Any] = {
            "kind": "adapter" if adapter_only else "merged",
            "method": None if adapter_only else method,
            "dtype": None if adapter_only else dtype,
            "adapter": adapter.name,
            "adapter_sha256": sha256_file(adapter / "adapter_model.safetensors"),
            "base_model": margs.model_name_or_path,
            "base_revision": margs.model_revision,
            "architecture": type(inner).__name__,
            "max_length": max_length,
            "tokenizer": tok_info,
            "load": _load_instructions(margs, inner) if adapter_only else None,
        }
        if adapter_only:
            for name in ADAPTER_FILES:
                shutil.copy2(adapter / name, staging / name)
        else:
            original = _OriginalWeights(margs, inner.base_model_prefix) if method == "base" else None
            writer = _ShardWriter(staging, shard_bytes)
            for name, tensor in _merged_state(model, method, original, out_dtype, recipe):
                writer.add(name, tensor)
            provenance["shards"] = writer.close()
            config = _export_config(inner.config, out_dtype, tokenizer.pad_token_id, type(inner).__name__)
            config.save_pretrained(staging)
        for name in COPIED_FILES:
            if (adapter / name).is_file():
                shutil.copy2(adapter / name, staging / name)
        (staging / "qrm_export.json").write_text(json.dumps(provenance, indent=2) + "\n")
        merge_seconds = time.time() - t0

        # The child must find the memory the parent used: release the 4-bit model before it starts.
        del model, inner
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        child = _run_child_verify(staging, pairs, batch_size, adapter=adapter_only)
        reference = (
            f"the {'4-bit base' if margs.load_in_4bit else 'base'} + adapter, rewards recomputed in the exporting "
            f"process with the training numerics (compute dtype {margs.bnb_4bit_compute_dtype}"
            f"{'' if margs.bnb_4bit_compute_dtype == 'float32' else ', LoRA and head in it, under autocast'})"
        )
        report = _verification_report(
            kind, None if adapter_only else dtype, source, reference, ref_c, ref_r, stored, child, threshold
        )
        report["seconds"] = {"merge": round(merge_seconds, 2), "verify_child": child.get("seconds")}
        (staging / "verification.json").write_text(json.dumps(report, indent=2) + "\n")
        (staging / "README.md").write_text(model_card(staging, report, provenance, title=out.name))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    summary = {
        "out_dir": str(out),
        "kind": provenance["kind"],
        "method": provenance["method"],
        "dtype": provenance["dtype"],
        "files": sorted(p.name for p in out.iterdir()),
        "verification": report,
    }
    if not report["passed"]:
        raise VerificationError(_failure_message(report, out), report)
    return summary


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as "2GB", "500MB", "1GiB"."""
    if isinstance(size, int):
        return size
    text = str(size).strip().upper().replace(" ", "")
    for unit in sorted(_UNITS, key=len, reverse=True):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * _UNITS[unit])
    return int(text)


def _check_out(out: Path, adapter: Path, force: bool) -> None:
    if out == adapter or out in adapter.parents:
        raise ExportError(f"--out {out} would overwrite the adapter dir it exports; choose another directory")
    if adapter in out.parents:
        raise ExportError(f"--out {out} is inside the adapter dir; choose a directory outside it")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not force:
        raise ExportError(f"--out {out} is not empty; pass --force to replace its contents")


def _verification_pairs(
    adapter: Path, verify_data: str | os.PathLike | None, tokenizer: Any, max_length: int
) -> tuple[list[dict], list[tuple[float, float]] | None, str]:
    """Tokenized verification pairs, the rewards stored with them (if any), and where they came from."""
    from .config import DataArguments
    from .data import DataError, DataReport, build_pairs, load_rows, tokenize_pairs

    stored: list[tuple[float, float]] | None = None
    try:
        if verify_data is not None:
            rows, where = load_rows(str(verify_data))
            pairs, report = build_pairs(rows, DataArguments(dataset=str(verify_data)), where, tokenizer)
            source = str(verify_data)
        else:
            path = adapter / VERIFY_FILE
            if not path.is_file():
                raise ExportError(
                    f"{adapter} has no {VERIFY_FILE} (it is written when training has eval data); "
                    "pass --verify-data FILE with preference pairs"
                )
            lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            pairs = [{k: r[k] for k in ("prompt", "chosen", "rejected")} | {"row": i} for i, r in enumerate(lines, 1)]
            if all("chosen_reward" in r and "rejected_reward" in r for r in lines):
                stored = [(float(r["chosen_reward"]), float(r["rejected_reward"])) for r in lines]
            report = DataReport(source=str(path), rows=len(lines), pairs=len(pairs))
            source = str(path)
        rows_tok = tokenize_pairs(pairs, tokenizer, max_length, report)
    except DataError as e:
        raise ExportError(f"verification data: {e}") from None
    if stored is not None:
        stored = [stored[r["row"] - 1] for r in rows_tok]
    return rows_tok, stored, source


class _OriginalWeights:
    """Reads the base model's original weights one tensor at a time from its safetensors files."""

    def __init__(self, margs: Any, prefix: str):
        from .model import resolve_path

        path = resolve_path(margs.model_name_or_path)
        folder = Path(path)
        if not folder.is_dir():
            from huggingface_hub import snapshot_download

            folder = Path(
                snapshot_download(
                    path, revision=margs.model_revision, allow_patterns=["*.safetensors", "*.safetensors.index.json"]
                )
            )
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {k: folder / v for k, v in weight_map.items()}
        elif (folder / "model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
                self.files = dict.fromkeys(f.keys(), folder / "model.safetensors")
        else:
            raise ExportError(
                f"--method base needs the base model's safetensors weights; none in {folder} (pickled .bin weights "
                "are not read); use --method exact"
            )
        self.prefix = prefix
        self.where = str(folder)

    def get(self, name: str) -> Any:
        from safetensors import safe_open

        # Checkpoints of the bare model (BertModel) lack the task model's prefix (bert.); CausalLM ones share it.
        p = f"{self.prefix}."
        for key in (name, name.removeprefix(p), p + name):
            if key in self.files:
                with safe_open(str(self.files[key]), framework="pt") as f:
                    return f.get_tensor(key)
        raise ExportError(
            f"--method base: {name} is not in the base model's weights at {self.where}; use --method exact"
        )


def _resolve_module(root: Any, dotted: str) -> Any:
    """The live module for a plain-model module name, looking through PEFT's modules_to_save wrappers."""
    from peft.utils import ModulesToSaveWrapper

    mod = root
    for part in dotted.split(".") if dotted else []:
        if isinstance(mod, ModulesToSaveWrapper):
            mod = mod.modules_to_save[mod.active_adapters[0]]
        mod = getattr(mod, part)
    if isinstance(mod, ModulesToSaveWrapper):
        mod = mod.modules_to_save[mod.active_adapters[0]]
    return mod


def _is_4bit(weight: Any) -> bool:
    return getattr(weight, "quant_state", None) is not None


def _dequantized(weight: Any) -> Any:
    """fp32 values of an NF4/FP4 weight, as the 4-bit forward multiplies by them (before the compute-dtype cast)."""
    import bitsandbytes.functional as bnbf

    state = weight.quant_state
    data = weight.data
    if getattr(state, "packing_format_for_cpu", False):
        # Repacked for the AVX512 CPU kernel (load_adapter_model prevents it; a model scored elsewhere may not be).
        data, state = bnbf._convert_weight_packed_for_cpu_inverse(data, copy.deepcopy(state))
    return bnbf.dequantize_4bit(data, state).float()


def _lora_delta(layer: Any, shape: tuple[int, ...] | None) -> tuple[Any, Any]:
    """(scale * B @ A summed over active adapters, LoRA bias sum) in fp32, for a peft LoRA Linear layer."""
    delta, bias = None, None
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        if name in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(name):
            raise ExportError(
                f"adapter {name!r} uses a LoRA variant (DoRA, ...): only plain LoRA can be merged exactly"
            )
        a = layer.lora_A[name].weight.float()
        b = layer.lora_B[name].weight.float()
        d = (b @ a) * float(layer.scaling[name])
        if getattr(layer, "fan_in_fan_out", False):
            d = d.T
        delta = d if delta is None else delta + d
        if getattr(layer, "lora_bias", {}).get(name) and layer.lora_B[name].bias is not None:
            lb = layer.lora_B[name].bias.float()
            bias = lb if bias is None else bias + lb
    if delta is not None and shape is not None and tuple(delta.shape) != tuple(shape):
        raise ExportError(f"LoRA delta shape {tuple(delta.shape)} does not match the weight {tuple(shape)}")
    return delta, bias


def _merged_state(
    model: Any, method: str, original: _OriginalWeights | None, out_dtype: Any, recipe: dict[str, Any]
) -> Iterator[tuple[str, Any]]:
    """(name, tensor) of the merged plain model, one at a time, in its own parameter order."""
    import torch
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForSequenceClassification

    inner = model.get_base_model()
    config = _export_config(inner.config, out_dtype, inner.config.pad_token_id, type(inner).__name__)
    with torch.device("meta"):
        skeleton = AutoModelForSequenceClassification.from_config(
            config, trust_remote_code=bool(recipe.get("trust_remote_code", False))
        )
    persistent = set(skeleton.state_dict().keys())
    # named_parameters drops tied duplicates, as save_pretrained does; non-persistent buffers are not saved.
    names = [(n, p) for n, p in skeleton.named_parameters()]
    names += [(n, b) for n, b in skeleton.named_buffers() if n in persistent]
    for name, meta in names:
        mod_name, _, attr = name.rpartition(".")
        try:
            live = _resolve_module(inner, mod_name)
        except AttributeError:
            raise ExportError(f"{name}: no such module in the trained model (architecture mismatch)") from None
        with torch.no_grad():
            tensor = _merged_tensor(live, name, attr, method, original, LoraLayer)
        if tuple(tensor.shape) != tuple(meta.shape):
            raise ExportError(
                f"{name}: merged shape {tuple(tensor.shape)} differs from the model's {tuple(meta.shape)}"
            )
        if tensor.is_floating_point():
            tensor = tensor.to(out_dtype)
        yield name, tensor.detach().to("cpu").contiguous()
        del tensor


def _merged_tensor(live: Any, name: str, attr: str, method: str, original: Any, lora_cls: type) -> Any:
    """One tensor of the merged model: dequantized (exact) or original (base) weight plus the LoRA update."""
    layer = live.get_base_layer() if isinstance(live, lora_cls) else live
    value = getattr(layer, attr)
    if attr == "weight" and _is_4bit(value):
        value = _dequantized(value) if method == "exact" else original.get(name).to(value.device).float()
    if isinstance(live, lora_cls) and attr in ("weight", "bias"):
        delta, bias = _lora_delta(live, tuple(value.shape) if attr == "weight" else None)
        if attr == "weight" and delta is not None:
            value = value.float() + delta.to(value.device)
        if attr == "bias" and bias is not None:
            value = value.float() + bias.to(value.device)
    return value


def _export_config(config: Any, out_dtype: Any, pad_token_id: int | None, architecture: str) -> Any:
    """The plain model's config: no quantization, one regression label, the exported class, a pad token, the stored
    dtype."""
    cfg = copy.deepcopy(config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(cfg, attr):
            delattr(cfg, attr)
    cfg.num_labels = 1
    # A reward is a regression output: pipeline("text-classification") and vLLM then return it raw, not sigmoid(r).
    cfg.problem_type = "regression"
    # The base's own class (LlamaForCausalLM, BertModel) would make vLLM build the wrong model.
    cfg.architectures = [architecture]
    cfg.pad_token_id = pad_token_id
    cfg.dtype = out_dtype
    return cfg


class _ShardWriter:
    """Writes tensors into safetensors shards of at most `max_bytes` (a larger single tensor gets its own)."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder = folder
        self.max_bytes = max_bytes
        self.current: dict[str, Any] = {}
        self.size = 0
        self.total = 0
        self.parts: list[tuple[Path, list[str]]] = []

    def add(self, name: str, tensor: Any) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.current and self.size + nbytes > self.max_bytes:
            self.flush()
        self.current[name] = tensor
        self.size += nbytes
        self.total += nbytes

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.current:
            return
        path = self.folder / f"part-{len(self.parts) + 1:05d}.safetensors.tmp"
        save_file(self.current, str(path), metadata={"format": "pt"})
        self.parts.append((path, list(self.current)))
        self.current, self.size = {}, 0

    def close(self) -> list[str]:
        self.flush()
        n = len(self.parts)
        if n == 0:
            raise ExportError("the merged model has no tensors")
        if n == 1:
            self.parts[0][0].rename(self.folder / "model.safetensors")
            return ["model.safetensors"]
        weight_map, files = {}, []
        for i, (path, names) in enumerate(self.parts, start=1):
            fname = f"model-{i:05d}-of-{n:05d}.safetensors"
            path.rename(self.folder / fname)
            files.append(fname)
            weight_map.update(dict.fromkeys(names, fname))
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return files


def _load_instructions(margs: Any, inner: Any) -> dict[str, Any]:
    """How to rebuild the training-time base for an adapter-only export (read by the card and the verifier)."""
    quant = None
    if margs.load_in_4bit:
        qc = getattr(inner.config, "quantization_config", None)
        skip = getattr(qc, "llm_int8_skip_modules", None) if qc is not None else None
        if isinstance(qc, dict):
            skip = qc.get("llm_int8_skip_modules")
        quant = {
            "load_in_4bit": True,
            "bnb_4bit_quant_type": margs.bnb_4bit_quant_type,
            "bnb_4bit_use_double_quant": margs.bnb_4bit_use_double_quant,
            "bnb_4bit_compute_dtype": margs.bnb_4bit_compute_dtype,
            "bnb_4bit_quant_storage": margs.bnb_4bit_quant_storage,
            # The head must stay unquantized, or PEFT's saved fp head cannot be loaded into it.
            "llm_int8_skip_modules": list(skip or []),
        }
    autocast = None
    if margs.load_in_4bit and margs.bnb_4bit_compute_dtype in ("bfloat16", "float16"):
        autocast = margs.bnb_4bit_compute_dtype
    return {
        "base_model": margs.model_name_or_path,
        "revision": margs.model_revision,
        "quantization_config": quant,
        "dtype": "float32",
        "autocast": autocast,
    }


# ------------------------------------------------------------------------------------------------ tokenizer


def align_tokenizer(tokenizer: Any) -> dict[str, Any]:
    """Make `tokenizer(text)` add the special tokens qrm's `tokenize_pairs` adds, so that plain-text serving
    (`pipeline`, vLLM) sees the same ids: qrm closes every sequence with EOS, most decoder tokenizers do not.

    Changes the fast tokenizer's post-processor in place (and the add_eos_token flag that some tokenizers rebuild
    it from on load); returns what was done. The check that a saved copy reloads the same way is separate."""
    from .data import special_tokens

    prefix, suffix = special_tokens(tokenizer)
    eos, eos_id = tokenizer.eos_token, tokenizer.eos_token_id
    info: dict[str, Any] = {"prefix_ids": prefix, "suffix_ids": suffix, "changed": False}
    if suffix or eos_id is None:
        info["plain_text_adds_qrm_specials"] = True
        return info
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        info.update(plain_text_adds_qrm_specials=False, note="slow tokenizer: append the EOS token to the text")
        return info
    from tokenizers import processors

    original = backend.post_processor
    names = tokenizer.convert_ids_to_tokens(prefix)
    specials = {**dict(zip(names, prefix, strict=True)), eos: eos_id}
    if original is None or isinstance(original, processors.TemplateProcessing):
        single = [*names, "$A", eos]
        pair = [*[f"{n}:0" for n in names], "$A:0", f"{eos}:0", *[f"{n}:1" for n in names], "$B:1", f"{eos}:1"]
        new = processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(specials.items()))
    else:  # e.g. ByteLevel offsets or a Sequence: keep it and append EOS after it
        tail = processors.TemplateProcessing(
            single=["$A", eos], pair=["$A:0", f"{eos}:0", "$B:1", f"{eos}:1"], special_tokens=[(eos, eos_id)]
        )
        new = processors.Sequence([original, tail])
    backend.post_processor = new
    if "add_bos_token" in tokenizer.init_kwargs or "add_eos_token" in tokenizer.init_kwargs:
        # transformers rebuilds the post-processor from these flags when they are in tokenizer_config.json.
        tokenizer.init_kwargs["add_eos_token"] = True
        object.__setattr__(tokenizer, "_add_eos_token", True)
    if special_tokens(tokenizer) != (prefix, [eos_id]):
        backend.post_processor = original
        info.update(plain_text_adds_qrm_specials=False, note="post-processor could not be changed: append EOS")
        return info
    info.update(changed=True, plain_text_adds_qrm_specials=True, added_suffix_ids=[eos_id])
    info["original_post_processor"] = type(original).__name__ if original is not None else None
    return info


def plain_chat_template() -> str:
    """qrm's plain conversation layout (`qrm.data.render_messages` without a chat template) as a Jinja chat
    template: `apply_chat_template(messages, tokenize=False)` then renders what training rendered."""
    from .data import HH_ASSISTANT, PLAIN_ROLE_NAMES

    q = json.dumps  # a JSON string literal is a valid Jinja string literal, escapes included
    branches = "".join(
        f"{{%- {'if' if i == 0 else 'elif'} message['role'] == {q(role)} -%}}{{{{ {q(chr(10) * 2 + name + ': ')} }}}}"
        for i, (role, name) in enumerate(PLAIN_ROLE_NAMES.items())
    )
    unknown = "{{ raise_exception(\"qrm's plain template has no role \" + message['role']) }}"
    return (
        f"{{%- for message in messages -%}}{branches}{{%- else -%}}{unknown}{{%- endif -%}}"
        "{{ message['content'] }}{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{{{ {q(HH_ASSISTANT)} }}}}{{%- endif -%}}"
    )


def _save_tokenizer(adapter: Path, folder: Path) -> dict[str, Any]:
    """Save the adapter's tokenizer into the export, aligned when a reloaded copy keeps the alignment, with the
    chat template training rendered conversations with (qrm's plain layout when the tokenizer had none)."""
    from transformers import AutoTokenizer

    from .data import special_tokens

    def load() -> Any:
        tok = AutoTokenizer.from_pretrained(adapter)
        if not getattr(tok, "chat_template", None):
            tok.chat_template = plain_chat_template()
        return tok

    tokenizer = load()
    info = align_tokenizer(tokenizer)
    had_template = bool(getattr(AutoTokenizer.from_pretrained(adapter), "chat_template", None))
    info["chat_template"] = "training" if had_template else "qrm-plain"
    tokenizer.save_pretrained(folder)
    if info["changed"] and special_tokens(AutoTokenizer.from_pretrained(folder)) != special_tokens(tokenizer):
        # Some tokenizer classes rebuild their post-processor on load: ship the training tokenizer unchanged.
        load().save_pretrained(folder)
        info.update(changed=False, plain_text_adds_qrm_specials=False, note="reload drops the EOS post-processor")
    return info


# ------------------------------------------------------------------------------------------------ verification


def _run_child_verify(folder: Path, pairs: list[dict], batch_size: int, adapter: bool) -> dict[str, Any]:
    """Score the verification pairs with the export in a fresh Python process; returns its JSON result."""
    with tempfile.TemporaryDirectory(prefix="qrm-verify-") as tmp:
        pairs_file = Path(tmp) / "pairs.jsonl"
        result_file = Path(tmp) / "result.json"
        with open(pairs_file, "w") as f:
            for r in pairs:
                rec = {k: r[k] for k in ("prompt", "chosen", "rejected", "chosen_ids", "rejected_ids")}
                f.write(json.dumps(rec) + "\n")
        cmd = [sys.executable, "-m", "qrm.export", "_verify", "--model", str(folder), "--pairs", str(pairs_file)]
        cmd += ["--result", str(result_file), "--batch-size", str(batch_size)] + (["--adapter"] if adapter else [])
        env = dict(os.environ)
        # The child must import this same qrm, installed or not.
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not result_file.is_file():
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
            raise ExportError(f"the export could not be reloaded and scored in a fresh process:\n{tail}")
        return json.loads(result_file.read_text())


def _verify_child(argv: Sequence[str]) -> int:
    """`python -m qrm.export _verify`: load the export as users will, score the pairs, write JSON."""
    ap = argparse.ArgumentParser(prog="python -m qrm.export _verify")
    ap.add_argument("--model", required=True)
    ap.add_argument("--pairs", required=True)
    ap.add_argument("--result", required=True)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--adapter", action="store_true")
    args = ap.parse_args(argv)

    from .data import DataError, DataReport, tokenize_pairs
    from .score import autocast_dtype, read_recipe, recipe_max_length, score_ids, tokenize_responses

    t0 = time.time()
    folder = Path(args.model)
    result: dict[str, Any] = {}
    if args.adapter:
        model, tokenizer = load_adapter_plain(folder)
    else:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from .score import default_device

        tokenizer = AutoTokenizer.from_pretrained(folder)
        model, info = AutoModelForSequenceClassification.from_pretrained(folder, output_loading_info=True)
        model.to(default_device()).eval()
        result["load_report"] = {k: sorted(map(str, v)) for k, v in info.items() if k != "error_msgs"}
        result["load_report"]["error_msgs"] = [str(e) for e in info.get("error_msgs", [])]
    max_length = recipe_max_length(read_recipe(folder)[1])
    rows = [json.loads(line) for line in Path(args.pairs).read_text().splitlines() if line.strip()]
    # Pairs are tokenized as pairs: training cut the shared prompt to fit the longer of the two responses.
    pairs = [{k: r[k] for k in ("prompt", "chosen", "rejected")} | {"row": i} for i, r in enumerate(rows)]
    try:
        own = tokenize_pairs(pairs, tokenizer, max_length, DataReport(source="verify"))
    except DataError:
        own = []
    own_by_row = {r["row"]: r for r in own}
    seqs, mismatched = [], 0
    for side in ("chosen_ids", "rejected_ids"):
        for i, r in enumerate(rows):
            ids = own_by_row[i][side] if i in own_by_row else None
            mismatched += ids != r[side]
            seqs.append(ids if ids is not None else r[side])
    # Plain text, as a pipeline or vLLM tokenizes it (the prompt joined to the response, specials added), against
    # qrm's ids for the same untruncated text: differences come only from merges across the prompt/response boundary.
    prompts = [r["prompt"] for r in rows] * 2
    responses = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    full = tokenize_responses(tokenizer, prompts, responses, max_length=10**9)
    plain = [tokenizer(p + r)["input_ids"] for p, r in zip(prompts, responses, strict=True)]
    plain_mismatched = sum(1 for a, b in zip(plain, full, strict=True) if a != b)
    t1 = time.time()
    rewards = score_ids(model, seqs, tokenizer.pad_token_id, args.batch_size)
    n = len(rows)
    params = [p for p in model.parameters() if p.is_floating_point()]
    result.update(
        chosen=rewards[:n],
        rejected=rewards[n:],
        token_id_mismatches=mismatched,
        plain_text_id_mismatches=plain_mismatched,
        dtypes=sorted({str(p.dtype).removeprefix("torch.") for p in params}),
        device=str(params[0].device),
        autocast=None if (a := autocast_dtype(model)) is None else str(a).removeprefix("torch."),
        seconds={"load": round(t1 - t0, 2), "score": round(time.time() - t1, 2)},
    )
    Path(args.result).write_text(json.dumps(result) + "\n")
    return 0


def load_adapter_plain(folder: str | os.PathLike) -> tuple[Any, Any]:
    """Load an adapter-only export with plain transformers + PEFT, as its model card shows (no qrm code)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig

    from .model import resolve_path

    folder = Path(folder)
    load = json.loads((folder / "qrm_export.json").read_text())["load"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    kwargs: dict[str, Any] = {}
    if load["quantization_config"]:
        q = dict(load["quantization_config"])
        for key in ("bnb_4bit_compute_dtype", "bnb_4bit_quant_storage"):
            q[key] = getattr(torch, q[key])
        kwargs["quantization_config"] = BitsAndBytesConfig(**q)
    if torch.cuda.is_available():
        kwargs["device_map"] = {"": 0}
    base = AutoModelForSequenceClassification.from_pretrained(
        resolve_path(load["base_model"]),
        revision=load["revision"],
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
        dtype=getattr(torch, load["dtype"]),
        **kwargs,
    )
    if len(tokenizer) > base.get_input_embeddings().num_embeddings:
        base.resize_token_embeddings(len(tokenizer))
    model = PeftModel.from_pretrained(base, str(folder)).eval()
    if load["autocast"]:
        # TRL trained LoRA and head in the compute dtype; holding them there makes score_ids autocast, as training did.
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.data = p.data.to(getattr(torch, load["autocast"]))
    return model, tokenizer


def _verification_report(
    kind: str,
    dtype: str | None,
    source: str,
    reference: str,
    ref_c: list[float],
    ref_r: list[float],
    stored: list[tuple[float, float]] | None,
    child: dict[str, Any],
    threshold: float,
) -> dict[str, Any]:
    """Compare the child's rewards with the reference; everything that decides pass/fail is in here."""
    from .evaluate import spearman

    exp_c, exp_r = child["chosen"], child["rejected"]
    ref = [*ref_c, *ref_r]
    exp = [*exp_c, *exp_r]
    deltas = [abs(a - b) for a, b in zip(ref, exp, strict=True)]
    same = [(rc > rr) == (ec > er) for rc, rr, ec, er in zip(ref_c, ref_r, exp_c, exp_r, strict=True)]
    flipped = [
        {"pair": i, "reference_margin": ref_c[i] - ref_r[i], "export_margin": exp_c[i] - exp_r[i]}
        for i, ok in enumerate(same)
        if not ok
    ]
    n = len(same)
    agreement = sum(same) / n
    missing = child.get("load_report", {}).get("missing_keys", [])
    problems = []
    if agreement < threshold:
        problems.append(f"pairwise agreement {agreement:.4f} < min_agreement {threshold}")
    if missing:
        problems.append(f"weights missing from the export (newly initialized on load): {missing[:5]}")
    if child.get("token_id_mismatches"):
        problems.append(f"the exported tokenizer gives different ids for {child['token_id_mismatches']} sequences")
    report: dict[str, Any] = {
        "kind": kind,
        "dtype": dtype,
        "pairs": n,
        "pairs_source": source,
        "reference": reference,
        "export_runtime": {k: child.get(k) for k in ("dtypes", "device", "autocast")},
        "max_abs_delta": max(deltas),
        "mean_abs_delta": sum(deltas) / len(deltas),
        "spearman": spearman(ref, exp),
        "pairwise_agreement": agreement,
        "reference_accuracy": sum(c > r for c, r in zip(ref_c, ref_r, strict=True)) / n,
        "export_accuracy": sum(c > r for c, r in zip(exp_c, exp_r, strict=True)) / n,
        "flipped_pairs": flipped,
        "min_agreement": threshold,
        "token_id_mismatches": child.get("token_id_mismatches"),
        "plain_text_id_mismatches": child.get("plain_text_id_mismatches"),
        "load_report": child.get("load_report"),
        "passed": not problems,
        "problems": problems,
    }
    if stored is not None:
        stored_all = [c for c, _ in stored] + [r for _, r in stored]
        report["stored_rewards_max_abs_delta"] = max(abs(a - b) for a, b in zip(ref, stored_all, strict=True))
        report["stored_rewards_note"] = (
            "reference vs the rewards training wrote to verify_pairs.jsonl (same model, scored at the end of training)"
        )
    for key in ("max_abs_delta", "mean_abs_delta", "spearman"):
        if isinstance(report[key], float) and not math.isfinite(report[key]):
            report[key] = None
    return report


def _failure_message(report: dict[str, Any], out: Path) -> str:
    hint = ""
    if report["kind"] == "exact" and report["dtype"] != "float32":
        hint = f"; {report['dtype']} rounding can flip near-tied pairs: try --dtype float32 or lower --min-agreement"
    return (
        f"verification failed: {'; '.join(report['problems'])} (max |Δreward| {report['max_abs_delta']:.3g} over "
        f"{report['pairs']} pairs). The export is in {out} with verification.json marked failed{hint}"
    )


# ------------------------------------------------------------------------------------------------ model card


def model_card(
    folder: str | os.PathLike, report: dict[str, Any], provenance: dict[str, Any], title: str | None = None
) -> str:
    """README.md for an export: what it is, how it was verified, how to use it, and its provenance files."""
    import yaml

    folder = Path(folder)
    adapter = provenance["kind"] == "adapter"
    base = provenance["base_model"]
    meta: dict[str, Any] = {}
    if base and "/" in base and not base.startswith(("pkg:", "/", ".")) and not Path(base).exists():
        meta["base_model"] = base
    meta["library_name"] = "peft" if adapter else "transformers"
    meta["pipeline_tag"] = "text-classification"
    meta["tags"] = ["reward-model", "qrm", "trl"] + (["lora", "qlora"] if adapter else [])
    tok = provenance["tokenizer"]
    eos_note = (
        "The tokenizer adds the same special tokens qrm added in training (BOS/CLS in front, EOS or SEP at the "
        "end), so the plain text `prompt + response` gives the training ids"
        if tok.get("plain_text_adds_qrm_specials")
        else "This tokenizer does not add the closing EOS that qrm added in training: append `tokenizer.eos_token`"
        " to the text"
    )
    mism = report.get("plain_text_id_mismatches")
    what = (
        "the LoRA adapter and the trained score head, to load on the 4-bit base model they were trained with"
        if adapter
        else f"a standalone `{provenance['architecture']}` (num_labels=1): the adapter merged "
        + (
            "into the dequantized NF4 weights it was trained against (`--method exact`)"
            if provenance["method"] == "exact"
            else "into the original full-precision base weights (`--method base`)"
        )
        + f", stored in {provenance['dtype']}, safetensors only"
    )
    verdict = "passed" if report["passed"] else "FAILED: " + "; ".join(report["problems"])
    sp = report["spearman"]
    lines = [
        "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n",
        f"# {title or folder.name}\n",
        "A reward model trained with qrm (QLoRA on a 4-bit backbone + TRL `RewardTrainer`):"
        " it maps a prompt and a response to one scalar reward; higher means preferred.\n",
        f"This repo holds {what}.\n",
        f"- Base model: `{base}` (revision `{provenance['base_revision']}`)",
        f"- Architecture: `{provenance['architecture']}`",
        f"- Max length in training: {provenance['max_length']} tokens (prompt cut from the left)",
        f"- Adapter sha256: `{provenance['adapter_sha256']}`\n",
        "## Verification\n",
        f"Reloaded in a fresh process and scored on {report['pairs']} held-out pairs (`{Path(report['pairs_source']).name}`)"
        f", compared with the reference: {report['reference']}.\n",
        "| check | value |",
        "|---|---|",
        f"| pairwise ranking agreement | {report['pairwise_agreement']:.4f} (required ≥ {report['min_agreement']}) |",
        f"| max abs reward difference | {report['max_abs_delta']:.3g} |",
        f"| mean abs reward difference | {report['mean_abs_delta']:.3g} |",
        f"| Spearman correlation of rewards | {'n/a' if sp is None else f'{sp:.6f}'} |",
        f"| reference accuracy / export accuracy | {report['reference_accuracy']:.3f} / {report['export_accuracy']:.3f} |",
        f"| export runtime | {', '.join(report['export_runtime']['dtypes'] or [])} on "
        f"{report['export_runtime']['device']}"
        f"{' (' + report['export_runtime']['autocast'] + ' autocast)' if report['export_runtime']['autocast'] else ''} |",
        f"| tokenizer ids differing from training | {report['token_id_mismatches']} |",
        f"| result | {verdict} |\n",
        "Full figures in `verification.json`.\n",
        "## Usage\n",
        f"{eos_note}. Format `prompt` as in training (the chat template for conversational data, else the "
        "`\\n\\nHuman: ...\\n\\nAssistant:` layout) and pass it with the response appended."
        + (
            f" On the verification pairs, tokenizing `prompt + response` in one piece gave other ids than qrm's "
            f"separate tokenization for {mism} of {2 * report['pairs']} sequences (merges across the boundary);"
            " `qrm.RewardModel` always tokenizes as training did."
            if mism
            else ""
        )
        + "\n",
        _usage(provenance),
    ]
    for title, name, fmt in (
        ("Training recipe", "qrm_recipe.yaml", "yaml"),
        ("Training metrics", "metrics.json", "json"),
        ("Library versions", "qrm_versions.json", "json"),
    ):
        path = folder / name
        if path.is_file():
            lines.append(f"## {title}\n\nFrom `{name}`:\n\n```{fmt}\n{path.read_text().strip()}\n```\n")
    return "\n".join(lines)


def _usage(provenance: dict[str, Any]) -> str:
    qrm = (
        "### qrm\n\n```python\nfrom qrm import RewardModel\n\n"
        'rm = RewardModel.from_pretrained("<this dir or repo clone>")\n'
        'print(rm.score("\\n\\nHuman: What is 2 + 2?\\n\\nAssistant:", " 4"))\n'
        "print(rm.score_batch(prompts, responses))  # batched; tokenized exactly as in training\n```\n\n"
        "or from the shell: `qrm score --model <dir> --data rows.jsonl --out rewards.jsonl`.\n"
    )
    if provenance["kind"] != "adapter":
        return (
            "### transformers pipeline\n\n```python\nfrom transformers import pipeline\n\n"
            'rm = pipeline("text-classification", model="<this dir>")\n'
            'text = "\\n\\nHuman: What is 2 + 2?\\n\\nAssistant:" + " 4"   # prompt + response\n'
            'print(rm(text)[0]["score"])  # the raw reward\n```\n\n'
            "`config.json` sets `problem_type: regression` (one label), so the pipeline and vLLM return the raw "
            "reward by default, not sigmoid(reward). The tokenizer's chat template renders conversations as training"
            " did: `tokenizer.apply_chat_template(messages, tokenize=False)`.\n\n"
            + qrm
            + _TRL_USAGE
            + "\n### vLLM\n\nA `*ForSequenceClassification` with one label, safetensors weights, a pad token and the"
            " head at `score.weight`: see qrm's docs/serving.md (`vllm serve <dir> --runner pooling`).\n"
        )
    load = provenance["load"]
    q = load["quantization_config"]
    qlines = ""
    if q:
        args = ",\n".join(
            f"    {k}={('torch.' + v) if k in ('bnb_4bit_compute_dtype', 'bnb_4bit_quant_storage') else repr(v)}"
            for k, v in q.items()
        )
        qlines = f"quant = BitsAndBytesConfig(\n{args},\n)\n"
    auto = (
        f"# Trained with {load['autocast']} compute: cast LoRA and head to it and score under autocast, as training did.\n"
        if load["autocast"]
        else ""
    )
    return (
        "### transformers + PEFT\n\n```python\nimport torch\nfrom peft import PeftModel\n"
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig\n\n"
        'adapter = "<this dir or repo>"\n'
        "tokenizer = AutoTokenizer.from_pretrained(adapter)\n"
        + qlines
        + "base = AutoModelForSequenceClassification.from_pretrained(\n"
        f'    "{load["base_model"]}", revision="{load["revision"]}", num_labels=1,\n'
        f"    pad_token_id=tokenizer.pad_token_id, dtype=torch.{load['dtype']}"
        + (", quantization_config=quant" if q else "")
        + ",\n)\n"
        "if len(tokenizer) > base.get_input_embeddings().num_embeddings:  # qrm added a pad token\n"
        "    base.resize_token_embeddings(len(tokenizer))\n"
        "model = PeftModel.from_pretrained(base, adapter).eval()\n"
        + auto
        + 'batch = tokenizer("\\n\\nHuman: What is 2 + 2?\\n\\nAssistant:" + " 4", return_tensors="pt")\n'
        "with torch.no_grad():\n"
        "    print(model(**batch.to(base.device)).logits[0, 0].item())\n```\n\n" + qrm + _TRL_USAGE
    )


_TRL_USAGE = (
    "\n### TRL (GRPO, RLOO)\n\n```python\nimport qrm\n\n"
    'reward = qrm.reward_function("<this dir>")  # prompts, completions (plain or conversational) -> rewards\n'
    "trainer = GRPOTrainer(model=policy, reward_funcs=reward, ...)\n```\n\n"
    'The rewards are exactly qrm\'s (`qrm score`). Passing the directory itself (`reward_funcs="<this dir>"`) '
    "also loads, but TRL then tokenizes `prompt + completion` without special tokens (no BOS/EOS/CLS/SEP), so its "
    "rewards differ from the trained model's; see qrm's docs/serving.md.\n"
)


# ------------------------------------------------------------------------------------------------ scoring files


def score_file(
    model: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike | None = None,
    batch_size: int = 16,
    prompt_column: str = "prompt",
    response_column: str = "response",
    dataset_format: str = "auto",
    chosen_column: str = "chosen",
    rejected_column: str = "rejected",
    max_length: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score every row of `data` with `model` (export or adapter dir) and write JSONL to `out` (stdout if None).

    Rows with `prompt_column` and `response_column` get {"row", "reward"}; anything else is read as preference
    pairs in any format qrm.data understands and gets {"row", "chosen_reward", "rejected_reward"}. Rows are
    numbered from 1 as in qrm's data errors; a row that could not be scored gets "skipped" with the reason."""
    from .config import DataArguments
    from .data import DataError, build_pairs, detect_format, load_rows, tokenize_pairs
    from .score import RewardModel, score_ids, score_pair_rows, tokenize_responses

    ds, where = load_rows(str(data))
    rows = list(ds)
    if not rows:
        raise DataError(f"{where}: the file holds no rows")
    dargs = DataArguments(
        dataset=str(data),
        dataset_format=dataset_format,
        prompt_column=prompt_column,
        chosen_column=chosen_column,
        rejected_column=rejected_column,
    )
    columns = set(rows[0])
    mode = (
        "responses"
        if dataset_format in ("auto", "responses") and {prompt_column, response_column} <= columns
        else "pairs"
    )
    if mode == "pairs" and dataset_format in ("auto", "ratings"):
        fmt = dataset_format if dataset_format != "auto" else detect_format(list(columns), rows[0], dargs, where)[0]
        if fmt == "ratings":  # one answer per row: score each answer rather than best-vs-worst pairs
            mode, response_column = "responses", dargs.response_column
            prompt_column = prompt_column if prompt_column in columns else "question"
    rm = RewardModel.from_pretrained(model, max_length=max_length)
    lines: list[dict[str, Any]] = []
    if mode == "responses":
        prompts, responses = [], []
        for i, row in enumerate(rows, start=1):
            for col in (prompt_column, response_column):
                if not isinstance(row.get(col), str):
                    raise DataError(f"{where}: row {i}: field {col!r} must be a string, got {row.get(col)!r}")
            prompts.append(row[prompt_column])
            responses.append(row[response_column])
        ids = tokenize_responses(rm.tokenizer, prompts, responses, rm.max_length)
        keep = [i for i, x in enumerate(ids) if x is not None]
        rewards = score_ids(rm.model, [ids[i] for i in keep], rm.tokenizer.pad_token_id, batch_size, progress)
        by_row = dict(zip(keep, rewards, strict=True))
        for i in range(len(rows)):
            if i in by_row:
                lines.append({"row": i + 1, "reward": by_row[i]})
            else:
                lines.append({"row": i + 1, "reward": None, "skipped": f"response exceeds max_length={rm.max_length}"})
    else:
        pairs, report = build_pairs(rows, dargs, where, rm.tokenizer)
        try:
            tok = tokenize_pairs(pairs, rm.tokenizer, rm.max_length, report)
        except DataError:
            tok = []
        chosen, rejected = score_pair_rows(rm.model, tok, rm.tokenizer.pad_token_id, batch_size, progress)
        by_row = {r["row"]: (c, rj) for r, c, rj in zip(tok, chosen, rejected, strict=True)}
        paired = {p["row"] for p in pairs}
        for i in range(1, len(rows) + 1):
            if i in by_row:
                c, rj = by_row[i]
                lines.append({"row": i, "chosen_reward": c, "rejected_reward": rj, "margin": c - rj})
            else:
                why = f"response exceeds max_length={rm.max_length}" if i in paired else "not a usable pair"
                lines.append({"row": i, "chosen_reward": None, "rejected_reward": None, "skipped": why})
    text = "".join(json.dumps(line) + "\n" for line in lines)
    if out is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    skipped = sum(1 for line in lines if "skipped" in line)
    return {"rows": len(rows), "scored": len(rows) - skipped, "skipped": skipped, "mode": mode, "out": out}


# ------------------------------------------------------------------------------------------------ command line


def merge_main(argv: Sequence[str] | None = None) -> int:
    """`qrm merge`: 0 when the export is written and verified, 1 when verification failed, 2 on bad input."""
    ap = argparse.ArgumentParser(
        prog="qrm merge",
        description="Merge a qrm adapter into a standalone reward model (or clean adapter) and verify it.",
    )
    ap.add_argument("--adapter", required=True, help="Adapter dir written by qrm train.")
    ap.add_argument("--out", required=True, help="Output dir (must be empty unless --force).")
    ap.add_argument(
        "--method",
        choices=METHODS,
        default="exact",
        help="exact: merge into the dequantized 4-bit weights the adapter was trained against (reproduces the "
        "trained model); base: merge into the original full-precision weights (rewards drift).",
    )
    ap.add_argument(
        "--dtype", choices=DTYPES, default="auto", help="Stored dtype; auto = the recipe's bnb_4bit_compute_dtype."
    )
    ap.add_argument(
        "--verify-data", default=None, help="Pairs to verify on (default: verify_pairs.jsonl of the adapter)."
    )
    ap.add_argument(
        "--min-agreement",
        type=float,
        default=None,
        help="Required pairwise ranking agreement with the 4-bit model (default 1.0 exact/adapter-only, 0.9 base).",
    )
    ap.add_argument("--force", action="store_true", help="Replace the contents of a non-empty --out.")
    ap.add_argument("--adapter-only", action="store_true", help="Write a clean PEFT adapter dir instead of merging.")
    ap.add_argument("--max-shard-size", default="2GB", help="Largest safetensors shard (default 2GB).")
    ap.add_argument("--batch-size", type=int, default=16, help="Verification batch size.")
    args = ap.parse_args(argv)
    from .cli import FlagError, check_flags, check_out_path, user_error

    try:
        check_flags("qrm merge", batch_size=args.batch_size)
        try:
            if parse_size(args.max_shard_size) < 1:
                raise ValueError
        except ValueError:
            raise FlagError(f"--max-shard-size {args.max_shard_size}: expected a size such as 2GB or 500MB") from None
        check_out_path("--out", args.out, {"--verify-data": args.verify_data, "--adapter": args.adapter}, replaced=True)
        summary = merge(
            args.adapter,
            args.out,
            method=args.method,
            dtype=args.dtype,
            verify_data=args.verify_data,
            min_agreement=args.min_agreement,
            force=args.force,
            adapter_only=args.adapter_only,
            max_shard_size=args.max_shard_size,
            batch_size=args.batch_size,
        )
    except VerificationError as e:
        print(f"qrm merge: {e}", file=sys.stderr)
        return 1
    except (ExportError, FileNotFoundError, ValueError) as e:
        return user_error("qrm merge", e)
    v = summary["verification"]
    what = "adapter" if summary["kind"] == "adapter" else f"{summary['method']} merge ({summary['dtype']})"
    print(
        f"wrote {what} to {summary['out_dir']}\n"
        f"verified in a fresh process on {v['pairs']} pairs: agreement {v['pairwise_agreement']:.4f}, "
        f"max |Δreward| {v['max_abs_delta']:.3g}, Spearman {v['spearman'] if v['spearman'] is None else round(v['spearman'], 6)}"
    )
    return 0


SCORE_FORMATS = ("auto", "responses", "explicit", "implicit", "conversational", "sharegpt", "ratings")


def score_main(argv: Sequence[str] | None = None) -> int:
    """`qrm score`: write one JSON line of rewards per input row."""
    ap = argparse.ArgumentParser(
        prog="qrm score",
        description="Score (prompt, response) rows or preference pairs with an export or adapter dir; JSONL out.",
    )
    ap.add_argument("--model", required=True, help="Export dir (qrm merge) or adapter dir (qrm train).")
    ap.add_argument("--data", required=True, help="jsonl/json/csv/parquet file.")
    ap.add_argument("--out", default=None, help="Output JSONL (default: stdout).")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--prompt-column", default="prompt")
    ap.add_argument(
        "--response-column", default="response", help="Rows with prompt and response columns are scored one by one."
    )
    ap.add_argument("--chosen-column", default="chosen")
    ap.add_argument("--rejected-column", default="rejected")
    ap.add_argument(
        "--format",
        default="auto",
        help="auto, responses, or a pair format of qrm.data (explicit, implicit, conversational, sharegpt, ratings).",
    )
    ap.add_argument("--max-length", type=int, default=None, help="Default: the training recipe's max_length.")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--force", action="store_true", help="Replace an existing --out file.")
    args = ap.parse_args(argv)
    from .cli import FlagError, check_flags, check_model_dir, check_out_path, user_error
    from .data import DataError

    try:
        check_flags("qrm score", batch_size=args.batch_size, max_length=args.max_length)
        if args.format not in SCORE_FORMATS:
            raise FlagError(f"--format {args.format}: expected one of {', '.join(SCORE_FORMATS)}")
        check_model_dir("--model", args.model)
        check_out_path("--out", args.out, {"--data": args.data, "--model": args.model})
        if args.out and Path(args.out).is_dir():
            raise FlagError(f"--out {args.out}: is a directory; give the path of the JSONL file to write")
        if args.out and Path(args.out).exists() and not args.force:
            raise FlagError(f"--out {args.out}: exists; pass --force to replace it")
        summary = score_file(
            args.model,
            args.data,
            out=args.out,
            batch_size=args.batch_size,
            prompt_column=args.prompt_column,
            response_column=args.response_column,
            dataset_format=args.format,
            chosen_column=args.chosen_column,
            rejected_column=args.rejected_column,
            max_length=args.max_length,
            progress=not args.no_progress,
        )
    except (DataError, FileNotFoundError, ValueError) as e:
        return user_error("qrm score", e)
    print(
        f"scored {summary['scored']} of {summary['rows']} rows ({summary['mode']})"
        + (f", {summary['skipped']} skipped" if summary["skipped"] else "")
        + (f" -> {summary['out']}" if summary["out"] else ""),
        file=sys.stderr,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m qrm.export merge|score ...` (and the internal `_verify` used by merge)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"merge": merge_main, "score": score_main, "_verify": _verify_child}
    if not argv or argv[0] not in commands:
        print("usage: python -m qrm.export {merge,score} [options]", file=sys.stderr)
        return 2
    return int(commands[argv[0]](argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
