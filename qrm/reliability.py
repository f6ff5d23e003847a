"""Training reliability: stop (or skip) non-finite steps, atomic checkpoints, no Hub token on disk.

Mix `ReliabilityMixin` into the Trainer subclass (before `RewardTrainer` in the bases) and resume from
`last_good_checkpoint(output_dir)` instead of `transformers.trainer_utils.get_last_checkpoint`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import struct
import zipfile
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

logger = logging.getLogger("qrm")

_CKPT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
STAGING_PREFIX = "tmp-"  # `tmp-checkpoint-N` never matches the Trainer's `^checkpoint-\d+$` pattern


class NonFiniteError(RuntimeError):
    """A training step produced a NaN/Inf loss or gradient; raised before the optimizer applied it."""


class NonFiniteGuard(TrainerCallback):
    """Checks loss and gradients between gradient clipping and `optimizer.step()` (`on_pre_optimizer_step`).

    `skip=False`: raise `NonFiniteError` naming the global step; weights and checkpoints stay those of the last
    good step. `skip=True`: drop the gradients so the optimizer leaves every parameter alone, count the step.
    """

    def __init__(self, skip: bool = False, trainer: Any = None) -> None:
        self.skip = skip
        self.trainer = trainer  # for the cross-process reduction of the verdict; optional
        self.skipped_steps: list[int] = []
        self._bad_loss = False  # a micro-batch since the last optimizer step had a non-finite loss
        self._window_bad = 0  # skipped steps since the last logged loss

    @property
    def skipped(self) -> int:
        """How many optimizer steps were skipped."""
        return len(self.skipped_steps)

    def note_loss(self, loss: torch.Tensor) -> None:
        """Record one micro-batch loss (called from `training_step`)."""
        if not bool(torch.isfinite(loss.detach()).all()):
            self._bad_loss = True

    def _grads_finite(self, params: list[torch.nn.Parameter]) -> bool:
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return True
        # One sync for all tensors; LoRA gradients are small, so this costs next to nothing.
        return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        """Decide before the optimizer sees the gradients."""
        model, optimizer = kwargs.get("model"), kwargs.get("optimizer")
        if optimizer is not None:
            params = [p for g in optimizer.param_groups for p in g["params"]]
        else:
            params = [p for p in model.parameters() if p.requires_grad] if model is not None else []
        bad = self._bad_loss or not self._grads_finite(params)
        self._bad_loss = False
        acc = getattr(self.trainer, "accelerator", None)
        if acc is not None and acc.num_processes > 1:
            # Every rank must take the same branch or the next collective hangs.
            flag = torch.tensor(float(bad), device=acc.device)
            bad = bool(acc.reduce(flag, reduction="sum").item() > 0)
        if not bad:
            return control
        step = state.global_step + 1  # global_step is incremented after the optimizer step
        if not self.skip:
            raise NonFiniteError(
                f"non-finite loss or gradient at global step {step}: stopped before the optimizer step; "
                f"resume from the last good checkpoint in {args.output_dir}"
            )
        for p in params:
            p.grad = None  # torch optimizers skip parameters without gradient: no momentum, no weight decay
        self.skipped_steps.append(step)
        self._window_bad += 1
        logger.warning("non-finite loss or gradient at global step %d: step skipped", step)
        return control

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        """Report skipped steps once at the end."""
        if self.skipped_steps:
            logger.warning("skipped %d non-finite step(s): %s", self.skipped, self.skipped_steps)
        return control


class NonFiniteGuardMixin:
    """Installs a `NonFiniteGuard`; `skip` comes from `args.skip_nonfinite_steps` (default: stop)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        skip = bool(getattr(self.args, "skip_nonfinite_steps", False))
        self.nonfinite_guard = NonFiniteGuard(skip=skip, trainer=self)
        self.add_callback(self.nonfinite_guard)

    def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The Trainer's step, with the loss shown to the guard."""
        loss = super().training_step(*args, **kwargs)
        self.nonfinite_guard.note_loss(loss)
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Never let a skipped step's loss read as a number (`logging_nan_inf_filter` would show 0.0)."""
        guard = self.nonfinite_guard
        if "loss" in logs and guard._window_bad:
            logs["loss"] = math.nan
            guard._window_bad = 0
        if guard.skipped and ("loss" in logs or "train_runtime" in logs):
            logs["nonfinite_skipped"] = guard.skipped
        super().log(logs, start_time)


class AtomicCheckpointMixin:
    """`checkpoint-N` appears only complete: written to `tmp-checkpoint-N/`, renamed, then older ones rotated."""

    _qrm_staging: str | None = None

    def _get_output_dir(self, trial: Any) -> str:
        if self._qrm_staging is not None:
            return self._qrm_staging
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        run_dir = self._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging, final = os.path.join(run_dir, STAGING_PREFIX + name), os.path.join(run_dir, name)
        if self.args.should_save and os.path.isdir(staging):
            shutil.rmtree(staging)  # left over from a run that died mid-save
        self.accelerator.wait_for_everyone()
        # Inside staging there is only this checkpoint, so the Trainer's own rotation there is a no-op.
        self._qrm_staging = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._qrm_staging = None
        self.accelerator.wait_for_everyone()  # all ranks' files (rng states, shards) are in staging
        if self.args.should_save:
            _publish(os.path.join(staging, name), final)
            shutil.rmtree(staging, ignore_errors=True)
            self._fix_best_checkpoint(run_dir, staging, final)
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.accelerator.wait_for_everyone()

    def _fix_best_checkpoint(self, run_dir: str, staging: str, final: str) -> None:
        # The Trainer looked for the best checkpoint under the staging dir; point it at the published one.
        best = self.state.best_global_step
        if not best:
            return
        path = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{best}")
        if not os.path.isdir(path) or self.state.best_model_checkpoint == path:
            return
        stale = (self.state.best_model_checkpoint or "").startswith(staging)
        self.state.best_model_checkpoint = path
        if stale:
            tmp = os.path.join(final, "trainer_state.json.tmp")
            self.state.save_to_json(tmp)
            os.replace(tmp, os.path.join(final, "trainer_state.json"))


def _publish(src: str, dst: str) -> None:
    """Rename `src` to `dst`; an existing `dst` (same step saved again) is replaced, not merged."""
    if os.path.isdir(dst):
        old = dst.rstrip(os.sep) + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


class TokenScrubMixin:
    """`training_args.bin` (pickled TrainingArguments, written with every save) never holds `hub_token`.

    The Trainer never reads that file back (resume uses trainer_state.json), so nothing is lost. Trainer's own
    `push_to_hub` re-pickles the arguments in `_push_from_checkpoint`; with push_to_hub give the token via HF_TOKEN.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.args.push_to_hub and self.args.hub_token:
            logger.warning("push_to_hub with hub_token: Trainer pushes training_args.bin; prefer HF_TOKEN")

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        token = self.args.hub_token
        self.args.hub_token = None
        try:
            super()._save(output_dir, state_dict=state_dict)
        finally:
            self.args.hub_token = token


class ReliabilityMixin(NonFiniteGuardMixin, AtomicCheckpointMixin, TokenScrubMixin):
    """All three: put it before `RewardTrainer` in the Trainer subclass's bases."""


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
