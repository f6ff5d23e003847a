"""What a stopped run leaves and how the next one continues: the exceptions and exit codes of a stopped run, which
checkpoint is complete, and whether this recipe may resume from it.

`resume_checkpoint(training_args, current)` replaces `transformers.trainer_utils.get_last_checkpoint`; the trainer
side (atomic checkpoints, preemption, the non-finite guard) lives in `qrm.trainer`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import zipfile
from typing import Any

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .errors import RecipeError
from .files import RECIPE_FILE, VERSIONS_FILE

logger = logging.getLogger("qrm")

_CKPT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")

# Exit codes of `qrm train` beyond 0 (done) and 2 (recipe or data error).
NONFINITE_EXIT = 3
PREEMPTED_EXIT = 4


def _check_safetensors(path: str) -> None:
    # Header plus the end of the last tensor must equal the file size: catches truncation without reading data.
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError("shorter than a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise ValueError("header runs past the end of the file")
        header = json.loads(f.read(n))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise ValueError(f"size {size} bytes, header says {8 + n + end}")


def _check_torch_file(path: str) -> None:
    # torch.save writes a zip; a truncated one has lost its central directory, which opening reads.
    with zipfile.ZipFile(path) as z:
        if not z.namelist():
            raise ValueError("empty archive")


def checkpoint_problem(path: str, require_optimizer: bool = True) -> str | None:
    """Why the checkpoint directory cannot be resumed from, or None when it looks complete."""
    try:
        with open(os.path.join(path, "trainer_state.json")) as f:
            state = json.load(f)
        if "global_step" not in state:
            return "trainer_state.json has no global_step"
    except (OSError, ValueError) as e:
        return f"trainer_state.json unreadable ({e})"
    weights = [n for n in os.listdir(path) if n.endswith(".safetensors")]
    if not weights and not any(n.endswith((".bin", ".pt")) and "model" in n for n in os.listdir(path)):
        return "no model or adapter weights"
    for name in weights:
        try:
            _check_safetensors(os.path.join(path, name))
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"{name} unreadable ({e})"
    needed = ["optimizer.pt", "scheduler.pt"] if require_optimizer else []
    present = {n for n in os.listdir(path) if n.endswith(".pt") or n.endswith(".pth")}
    for name in needed:
        if name not in present:
            return f"{name} missing"
    for name in sorted(present):
        try:
            _check_torch_file(os.path.join(path, name))
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            return f"{name} unreadable ({e})"
    return None


def last_good_checkpoint(output_dir: str | os.PathLike, require_optimizer: bool = True) -> str | None:
    """The newest complete `checkpoint-N` under `output_dir`, logging why newer ones were passed over."""
    if not os.path.isdir(output_dir):
        return None
    found = []
    for name in os.listdir(output_dir):
        m = _CKPT.match(name)
        if m and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(m.group(1)), os.path.join(output_dir, name)))
    for _, path in sorted(found, reverse=True):
        problem = checkpoint_problem(path, require_optimizer=require_optimizer)
        if problem is None:
            return path
        logger.warning("skipping checkpoint %s: %s", path, problem)
    return None


# Recipe fields a resumed run may change: where and how often things are written, evaluated or reported, how long
# to train, how (not which) data is loaded, and the resume switches themselves. Anything else changes what the
# checkpoint's optimizer state and data position mean, so resuming with it needs resume_force.
RESUMABLE_CHANGES = frozenset(
    {
        "output_dir",
        "resume",
        "resume_force",
        "resume_from_checkpoint",
        "num_train_epochs",
        "max_steps",
        "skip_nonfinite_steps",
        "verify_pairs",
        # The data layout of a step, not its maths: packed and padded steps give the same rewards and gradients.
        "packing",
        "prefix_sharing",
        "logging_strategy",
        "logging_steps",
        "logging_first_step",
        "logging_nan_inf_filter",
        "log_on_each_node",
        "log_level",
        "log_level_replica",
        "disable_tqdm",
        "include_num_input_tokens_seen",
        "skip_memory_metrics",
        "report_to",
        "run_name",
        "project",
        "trackio_space_id",
        "trackio_bucket_id",
        "trackio_static_space_id",
        "eval_dataset",
        "eval_dataset_split",
        "eval_strategy",
        "eval_steps",
        "eval_delay",
        "eval_on_start",
        "per_device_eval_batch_size",
        "eval_accumulation_steps",
        "eval_do_concat_batches",
        "eval_use_gather_object",
        "prediction_loss_only",
        "include_for_metrics",
        "batch_eval_metrics",
        "bf16_full_eval",
        "fp16_full_eval",
        "load_best_model_at_end",
        "metric_for_best_model",
        "greater_is_better",
        "save_strategy",
        "save_steps",
        "save_total_limit",
        "save_only_model",
        "save_on_each_node",
        "enable_jit_checkpoint",
        "push_to_hub",
        "hub_model_id",
        "hub_strategy",
        "hub_private_repo",
        "hub_always_push",
        "hub_revision",
        "dataloader_num_workers",
        "dataloader_pin_memory",
        "dataloader_persistent_workers",
        "dataloader_prefetch_factor",
        "dataloader_multiprocessing_context",
        "ddp_timeout",
        "torch_empty_cache_steps",
    }
)


def recipe_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(field, checkpoint's value, current value) for every field that differs and is not in `RESUMABLE_CHANGES`.

    Both are resolved-recipe mappings as in `qrm_recipe.yaml`, where a field at its default is left out."""
    from .config import MACHINE_KEYS, SECRET_KEYS, recipe_defaults

    defaults = recipe_defaults()
    changed = []
    for key in sorted(set(saved) | set(current)):
        if key in RESUMABLE_CHANGES or key in SECRET_KEYS or key in MACHINE_KEYS:
            continue
        old, new = saved.get(key, defaults.get(key)), current.get(key, defaults.get(key))
        if old != new:
            changed.append((key, old, new))
    return changed


def _read_provenance(folder: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    import yaml

    recipe = versions = None
    try:
        with open(os.path.join(folder, RECIPE_FILE)) as f:
            recipe = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError):
        pass
    try:
        with open(os.path.join(folder, VERSIONS_FILE)) as f:
            versions = json.load(f)
    except (OSError, ValueError):
        pass
    return recipe, versions


def _fmt(value: Any) -> str:
    return json.dumps(value, default=str)


def check_resume_recipe(
    checkpoint: str, output_dir: str, force: bool = False, current: tuple[dict, dict] | None = None
) -> list[str]:
    """Compare the recipe and training data `checkpoint` was trained with against this run's; raise `RecipeError`
    naming what changed, unless `force`.

    Args:
        checkpoint (`str`): the checkpoint directory.
        output_dir (`str`): the run's output dir, whose provenance stands for this run when `current` is None.
        force (`bool`, *optional*, defaults to `False`): log the differences and resume anyway.
        current (`tuple[dict, dict]`, *optional*): (resolved recipe, versions info) of this run, what
            `build_trainer` is about to write: the decision comes first, so nothing is written before it.

    Returns:
        `list[str]`: the differences (with `force`, also logged).
    """

    saved_recipe, saved_versions = _read_provenance(checkpoint)
    recipe, versions = current if current is not None else _read_provenance(output_dir)
    name = os.path.basename(os.path.normpath(checkpoint))
    if saved_recipe is None or recipe is None:
        logger.warning("%s: no %s to compare with this recipe; resuming unchecked", checkpoint, RECIPE_FILE)
        return []
    problems = [
        f"{name} was trained with {key}={_fmt(old)}, this recipe says {_fmt(new)}"
        for key, old, new in recipe_changes(saved_recipe, recipe)
    ]
    old_data = ((saved_versions or {}).get("data_fingerprint") or {}).get("train_pairs_sha256")
    new_data = ((versions or {}).get("data_fingerprint") or {}).get("train_pairs_sha256")
    if old_data and new_data and old_data != new_data:
        problems.append(f"{name} was trained on pairs with sha256 {old_data[:16]}…, this data gives {new_data[:16]}…")
    if not problems:
        return []
    if force:
        logger.warning("resume_force: resuming from %s although %s", checkpoint, "; ".join(problems))
        return problems
    raise RecipeError(
        "refusing to resume: "
        + "; ".join(problems)
        + ". Set resume_force: true to resume anyway, or resume: never (or another output_dir) to start afresh"
    )


def resume_checkpoint(args: Any, current: tuple[dict, dict] | None = None) -> str | None:
    """The checkpoint to continue from as `args.resume` says (auto, never, or a path; `resume_from_checkpoint` is
    the same as a path), checked against the current recipe; None to start afresh.

    auto takes the newest complete checkpoint in output_dir, skipping damaged ones with a log line. An explicit
    path that is not a usable checkpoint, or a recipe change that matters (see `check_resume_recipe`), raises
    `RecipeError`."""

    mode = str(getattr(args, "resume", None) or "auto")
    alias = getattr(args, "resume_from_checkpoint", None)
    if alias:
        if mode == "never":
            raise RecipeError(f"resume=never contradicts resume_from_checkpoint={alias}")
        if mode != "auto" and os.path.normpath(mode) != os.path.normpath(alias):
            raise RecipeError(f"resume={mode} and resume_from_checkpoint={alias} name different checkpoints")
        mode = alias
    output_dir = args.output_dir
    require_optimizer = not args.save_only_model
    if mode == "never":
        if os.path.isdir(output_dir) and any(_CKPT.match(n) for n in os.listdir(output_dir)):
            logger.warning("resume=never: starting afresh; checkpoints already in %s may be overwritten", output_dir)
        return None
    if mode == "auto":
        path = last_good_checkpoint(output_dir, require_optimizer=require_optimizer)
        if path is None:
            return None
    else:
        path = mode
        if not os.path.isdir(path):
            raise RecipeError(f"resume={path}: expected auto, never or a checkpoint directory")
        problem = checkpoint_problem(path, require_optimizer=require_optimizer)
        if problem:
            raise RecipeError(f"resume={path}: cannot resume from it: {problem}")
    check_resume_recipe(path, output_dir, force=bool(getattr(args, "resume_force", False)), current=current)
    logger.info("resuming from %s", path)
    return path
