"""`qrm merge`: export a trained reward model for serving, verified in a fresh process.

* `method="exact"` folds the LoRA update into the dequantized NF4 weights the adapter was trained against and
  writes a standalone `AutoModelForSequenceClassification` (safetensors only, sharded).
* `method="base"` folds it into the original full-precision weights instead (what `merge_and_unload` on an
  unquantized base does); rewards then move, and verification says by how much.
* `adapter_only=True` writes a clean adapter dir for PEFT users (adapter, head, tokenizer, card).

Algorithm (`exact`): the 4-bit base + adapter is loaded as for scoring; the output state dict is built one tensor
at a time in the order of a meta-device skeleton of the plain `*ForSequenceClassification`: a Linear4bit weight
becomes `dequantize_4bit(W) + scale * B @ A` (fp32), the head comes from PEFT's modules_to_save copy, the rest is
copied; each tensor is cast to the stored dtype and appended to a safetensors shard flushed at `max_shard_size`.
`base` reads each quantized layer's original weight from the base model's safetensors files instead. Peak memory:
the 4-bit model, one layer's fp32 temporaries and one shard, never the whole merged model. Tokenizer:
`qrm.export_tokenizer`; verification in a fresh process: `qrm.verify` (figures in verification.json and the card,
`qrm.card`); a failed check raises `VerificationError`."""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ExportError, FlagError, UserError, VerificationError
from .files import (
    ADAPTER_FILES,
    ADAPTER_WEIGHTS,
    CARD_FILE,
    EXPORT_INFO_FILE,
    LENGTH_ERASE_FILE,
    METRICS_FILE,
    RECIPE_FILE,
    VERIFICATION_FILE,
    VERSIONS_FILE,
    is_adapter_dir,
)

METHODS = ("exact", "base")
DTYPES = ("auto", "bfloat16", "float16", "float32")
# exact reproduces the trained model, so every pair must keep its order; base changes the weights the adapter was
# trained against, and 0.9 still catches a broken merge while tolerating the expected drift.
DEFAULT_MIN_AGREEMENT = {"exact": 1.0, "base": 0.9, "adapter": 1.0}
DEFAULT_MAX_SHARD_BYTES = 2 * 2**30
COPIED_FILES = (RECIPE_FILE, VERSIONS_FILE, METRICS_FILE, LENGTH_ERASE_FILE)
_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}


@dataclass
class _Job:
    """A checked merge request: paths resolved, dtype and threshold decided, recipe read."""

    adapter: Path
    out: Path
    method: str
    dtype: str
    adapter_only: bool
    threshold: float
    shard_bytes: int
    margs: Any
    recipe: dict[str, Any]


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

    Args:
        adapter_dir (`str` or `os.PathLike`):
            The output_dir of `qrm train` (adapter, head, tokenizer, `qrm_recipe.yaml`).
        out_dir (`str` or `os.PathLike`):
            Where the export goes; built in a hidden sibling dir and moved into place when complete.
        method (`str`, *optional*, defaults to `"exact"`):
            `exact` (the dequantized 4-bit weights the adapter was trained against) or `base` (the original weights).
        dtype (`str`, *optional*, defaults to `"auto"`):
            Stored dtype; `auto` is the recipe's `bnb_4bit_compute_dtype`, the precision the model trained in.
        verify_data (`str` or `os.PathLike`, *optional*, defaults to `None`):
            Pairs to verify on; defaults to the adapter's `verify_pairs.jsonl`.
        min_agreement (`float`, *optional*, defaults to `None`):
            Pairwise ranking agreement required; defaults to 1.0 for exact and adapter-only exports, 0.9 for base.
        force (`bool`, *optional*, defaults to `False`):
            Replace the contents of a non-empty `out_dir`.
        adapter_only (`bool`, *optional*, defaults to `False`):
            Write a clean adapter dir for PEFT users instead of merging.
        max_shard_size (`int` or `str`, *optional*, defaults to 2 GiB):
            Largest safetensors shard, in bytes or as "2GB", "500MB".
        batch_size (`int`, *optional*, defaults to `16`):
            Verification batch size.

    Returns:
        `dict`: `out_dir`, `kind`, `method`, `dtype`, `files` and the `verification` report. Raises `ExportError`
        before writing anything when the inputs are wrong, and `VerificationError` after writing when the export
        does not reproduce the trained model's pairwise decisions."""
    from .card import model_card
    from .model import load_adapter_model
    from .reward_model import score_pair_rows
    from .verify import failure_message, verification_pairs

    job = _prepare(adapter_dir, out_dir, method, dtype, min_agreement, force, adapter_only, max_shard_size)
    t0 = time.time()
    model, tokenizer, max_length = load_adapter_model(job.adapter)
    pairs, stored, source = verification_pairs(job.adapter, verify_data, tokenizer, max_length)
    # Reference rewards: the 4-bit model + adapter, recomputed here with the training numerics (dtypes, autocast).
    reference = score_pair_rows(model, pairs, tokenizer.pad_token_id, batch_size)
    staging = job.out.parent / f".{job.out.name}.qrm-partial"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        provenance = _write_export(job, model, tokenizer.pad_token_id, max_length, staging)
        merge_seconds = time.time() - t0
        del model  # the child must find the memory the parent used: freed in _verify
        report = _verify(job, staging, pairs, reference, stored, source, batch_size)
        report["seconds"] = {"merge": round(merge_seconds, 2), "verify_child": report.pop("child_seconds")}
        (staging / VERIFICATION_FILE).write_text(json.dumps(report, indent=2) + "\n")
        (staging / CARD_FILE).write_text(model_card(staging, title=job.out.name, provenance=provenance, report=report))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if job.out.exists():
        shutil.rmtree(job.out)
    staging.rename(job.out)
    summary = {"out_dir": str(job.out), **{k: provenance[k] for k in ("kind", "method", "dtype")}}
    summary |= {"files": sorted(p.name for p in job.out.iterdir()), "verification": report}
    if not report["passed"]:
        raise VerificationError(failure_message(report, job.out), report)
    return summary


def _prepare(
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    method: str,
    dtype: str,
    min_agreement: float | None,
    force: bool,
    adapter_only: bool,
    max_shard_size: int | str,
) -> _Job:
    """Check every input before any weight is loaded or any file written."""
    from .config import read_recipe

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
    if not is_adapter_dir(adapter):
        raise ExportError(f"{adapter}: not an adapter dir (no adapter_config.json); pass the output_dir of qrm train")
    out = Path(out_dir).expanduser().resolve()
    _check_out(out, adapter, force)
    try:
        margs, recipe = read_recipe(adapter)
    except FileNotFoundError as e:
        raise ExportError(str(e)) from None
    if dtype == "auto":
        dtype = margs.bnb_4bit_compute_dtype if margs.load_in_4bit else "float32"
    return _Job(adapter, out, method, dtype, adapter_only, threshold, shard_bytes, margs, recipe)


def _write_export(job: _Job, model: Any, pad_token_id: int, max_length: int, staging: Path) -> dict[str, Any]:
    """Write tokenizer, weights (merged shards, or the adapter files), config and provenance into `staging`;
    returns the provenance record (`qrm_export.json`)."""
    import torch

    from .card import load_instructions
    from .config import sha256_file
    from .export_tokenizer import save_tokenizer
    from .model import unwrap

    tok_info = save_tokenizer(job.adapter, staging)
    inner = unwrap(model)
    provenance: dict[str, Any] = {
        "kind": "adapter" if job.adapter_only else "merged",
        "method": None if job.adapter_only else job.method,
        "dtype": None if job.adapter_only else job.dtype,
        "adapter": job.adapter.name,
        "adapter_sha256": sha256_file(job.adapter / ADAPTER_WEIGHTS),
        "base_model": job.margs.model_name_or_path,
        "base_revision": job.margs.model_revision,
        "architecture": type(inner).__name__,
        "max_length": max_length,
        "tokenizer": tok_info,
        "load": load_instructions(job.margs, _skip_modules(inner)) if job.adapter_only else None,
    }
    if job.adapter_only:
        for name in ADAPTER_FILES:
            shutil.copy2(job.adapter / name, staging / name)
    else:
        out_dtype = getattr(torch, job.dtype)
        original = _OriginalWeights(job.margs, inner.base_model_prefix) if job.method == "base" else None
        writer = _ShardWriter(staging, job.shard_bytes)
        for name, tensor in _merged_state(model, job.method, original, out_dtype, job.recipe):
            writer.add(name, tensor)
        provenance["shards"] = writer.close()
        _export_config(inner.config, out_dtype, pad_token_id, type(inner).__name__).save_pretrained(staging)
    for name in COPIED_FILES:
        if (job.adapter / name).is_file():
            shutil.copy2(job.adapter / name, staging / name)
    (staging / EXPORT_INFO_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    return provenance


def _skip_modules(inner: Any) -> list[str] | None:
    """The modules the 4-bit load left unquantized (the head): an adapter-only export's load recipe repeats them."""
    qc = getattr(inner.config, "quantization_config", None)
    if isinstance(qc, dict):
        return qc.get("llm_int8_skip_modules")
    return getattr(qc, "llm_int8_skip_modules", None) if qc is not None else None


def _verify(
    job: _Job,
    staging: Path,
    pairs: list[dict],
    reference: tuple[list[float], list[float]],
    stored: list[tuple[float, float]] | None,
    source: str,
    batch_size: int,
) -> dict[str, Any]:
    """Score the written export in a fresh process and compare it with the reference rewards: the report."""
    import torch

    from .verify import reference_description, verification_report, verify_in_child

    gc.collect()  # release the exporting model (deleted by the caller) before the child loads the export
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    child = verify_in_child(staging, pairs, batch_size, adapter=job.adapter_only)
    kind, dtype = ("adapter", None) if job.adapter_only else (job.method, job.dtype)
    description = reference_description(job.margs)
    report = verification_report(kind, dtype, source, description, *reference, stored, child, job.threshold)
    return report | {"child_seconds": child.get("seconds")}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as "2GB", "500MB", "1GiB" (`--max-shard-size`).

    Args:
        size (`int` or `str`): bytes, or a number with a decimal (KB, MB, GB) or binary (KiB, MiB, GiB) unit."""
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


class _OriginalWeights:
    """Reads the base model's original weights one tensor at a time from its safetensors files."""

    def __init__(self, margs: Any, prefix: str):
        from .source import resolve_path

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
    """(scale * B @ A summed over active adapters, LoRA bias sum) in fp32, for a peft LoRA Linear layer.

    The update is PEFT's `get_delta_weight`; `_merged_state` first holds the LoRA weights in fp32, so it is the
    exact fp32 product of the trained weights (PEFT would otherwise round it to their bf16 dtype). PEFT has no
    merge of a LoRA bias into a delta, so that sum is ours."""
    delta, bias = None, None
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        if name in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(name):
            raise ExportError(
                f"adapter {name!r} uses a LoRA variant (DoRA, ...): only plain LoRA can be merged exactly"
            )
        d = layer.get_delta_weight(name).float()
        delta = d if delta is None else delta + d
        if getattr(layer, "lora_bias", {}).get(name) and layer.lora_B[name].bias is not None:
            lb = layer.lora_B[name].bias.float()
            bias = lb if bias is None else bias + lb
    if delta is not None and shape is not None and tuple(delta.shape) != tuple(shape):
        raise ExportError(f"LoRA delta shape {tuple(delta.shape)} does not match the weight {tuple(shape)}")
    return delta, bias


def _lora_in_float32(model: Any) -> None:
    """Hold every LoRA A/B weight in fp32 (an exact upcast of bf16 ones) so `get_delta_weight` computes in fp32.

    Called after the reference rewards were scored with the training dtypes; the model is only merged afterwards."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.lora_A.float()
            module.lora_B.float()


def _merged_state(
    model: Any, method: str, original: _OriginalWeights | None, out_dtype: Any, recipe: dict[str, Any]
) -> Iterator[tuple[str, Any]]:
    """(name, tensor) of the merged plain model, one at a time, in its own parameter order."""
    import torch
    from peft.tuners.lora import LoraLayer

    from .model import meta_model, unwrap

    inner = unwrap(model)
    _lora_in_float32(inner)
    config = _export_config(inner.config, out_dtype, inner.config.pad_token_id, type(inner).__name__)
    skeleton = meta_model(config, trust_remote_code=bool(recipe.get("trust_remote_code", False)))
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


# vLLM 0.32 maps Gemma3Text* to its Gemma3Model (no `model.` prefix: the load fails), Gemma3For* to Gemma3ForCausalLM.
VLLM_ARCHITECTURE = {"Gemma3TextForSequenceClassification": "Gemma3ForSequenceClassification"}


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
    # The base's own class (LlamaForCausalLM, BertModel) would make vLLM build the wrong model; vLLM's name for some
    # classes differs (VLLM_ARCHITECTURE). transformers builds the class from model_type, not from this list.
    cfg.architectures = [VLLM_ARCHITECTURE.get(architecture, architecture)]
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


def _parser() -> argparse.ArgumentParser:
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
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """`qrm merge`: 0 when the export is written and verified, 1 when verification failed, 2 on bad input."""
    args = _parser().parse_args(argv)
    from .cli import check_flags, check_out_path, user_error

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
    except (UserError, FileNotFoundError) as e:
        return user_error("qrm merge", e)
    v = summary["verification"]
    what = "adapter" if summary["kind"] == "adapter" else f"{summary['method']} merge ({summary['dtype']})"
    print(
        f"wrote {what} to {summary['out_dir']}\n"
        f"verified in a fresh process on {v['pairs']} pairs: agreement {v['pairwise_agreement']:.4f}, "
        f"max |Δreward| {v['max_abs_delta']:.3g}, Spearman {v['spearman'] if v['spearman'] is None else round(v['spearman'], 6)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
