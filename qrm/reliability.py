"""Training reliability: exact resume, atomic checkpoints with provenance, preemption, non-finite steps, no secrets.

Mix `ReliabilityMixin` into the Trainer subclass (before `RewardTrainer` in the bases) and resume from
`resume_checkpoint(training_args)` instead of `transformers.trainer_utils.get_last_checkpoint`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import signal
import struct
import zipfile
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

logger = logging.getLogger("qrm")

_CKPT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
STAGING_PREFIX = "tmp-"  # `tmp-checkpoint-N` never matches the Trainer's `^checkpoint-\d+$` pattern
# Written by `qrm.config.write_provenance` into output_dir; each checkpoint gets a copy.
PROVENANCE_FILES = ("qrm_recipe.yaml", "qrm_versions.json")
TRAINING_ARGS_PICKLE = "training_args.bin"

# Exit codes of `qrm train` beyond 0 (done) and 2 (recipe or data error).
NONFINITE_EXIT = 3
PREEMPTED_EXIT = 4


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
    """`checkpoint-N` appears only complete: written to `tmp-checkpoint-N/`, renamed, then older ones rotated.

    Each checkpoint also carries the run's provenance (resolved recipe, versions, data fingerprint), which resuming
    compares with the current recipe."""

    _qrm_staging: str | None = None
    _qrm_saved_step: int | None = None  # global step of the last published checkpoint

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
            for fname in PROVENANCE_FILES:
                src = os.path.join(self.args.output_dir, fname)
                if os.path.isfile(src):
                    shutil.copyfile(src, os.path.join(staging, name, fname))
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
        self._qrm_saved_step = self.state.global_step

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
    """No pickle and no `hub_token` beside the weights: `training_args.bin` (the pickled TrainingArguments the
    Trainer writes with every save) is replaced by `training_args.json`, whose `*_token` fields are redacted.

    The Trainer never reads that pickle back (resume uses trainer_state.json), so nothing is lost. Trainer's own
    `push_to_hub` re-pickles the arguments in `_push_from_checkpoint`; with push_to_hub give the token via HF_TOKEN.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.args.push_to_hub and self.args.hub_token:
            logger.warning("push_to_hub with hub_token: Trainer pushes training_args.bin; prefer HF_TOKEN")

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        token = self.args.hub_token
        self.args.hub_token = None  # even the moment the pickle exists, it holds no token
        try:
            super()._save(output_dir, state_dict=state_dict)
        finally:
            self.args.hub_token = token
        if self.args.should_save:
            pickled = os.path.join(output_dir, TRAINING_ARGS_PICKLE)
            if os.path.isfile(pickled):
                os.remove(pickled)
            with open(os.path.join(output_dir, "training_args.json"), "w") as f:
                f.write(self.args.to_json_string() + "\n")  # TrainingArguments.to_dict redacts every *_token


class SeededLengthGroupedSampler(LengthGroupedSampler):
    """`LengthGroupedSampler` whose order is drawn from `seed + epoch` instead of the global RNG.

    The Trainer builds it with no generator, so an epoch's order depends on how much randomness (dropout) was used
    before it: a run resumed in a later epoch would see a different order than the uninterrupted run.
    """

    def __init__(self, batch_size: int, lengths: list[int], seed: int) -> None:
        super().__init__(batch_size, lengths=lengths)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Called by the Trainer (through accelerate's dataloader) before each epoch."""
        self.epoch = epoch

    def __iter__(self) -> Any:
        gen = torch.Generator()
        gen.manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=gen))


class ExactResumeMixin:
    """Makes a resumed run see the same batches as an uninterrupted one, whatever the sampling strategy.

    The Trainer already restores model, optimizer, scheduler and RNG states and skips the batches of the resumed
    epoch; random sampling goes through accelerate's seeded sampler. Length-grouped sampling does not: it is seeded
    here per epoch.
    """

    _qrm_sampler: SeededLengthGroupedSampler | None = None

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        sampler = super()._get_train_sampler(train_dataset)
        if type(sampler) is LengthGroupedSampler and sampler.generator is None:
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            sampler = SeededLengthGroupedSampler(sampler.batch_size, sampler.lengths, seed)
            self._qrm_sampler = sampler
        return sampler

    def _run_epoch(self, *args: Any, **kwargs: Any) -> Any:
        # accelerate forwards set_epoch only two wrappers deep; with several processes and a skipped-into epoch the
        # sampler sits deeper, so set the epoch here too.
        if self._qrm_sampler is not None and "epoch" in kwargs:
            self._qrm_sampler.set_epoch(kwargs["epoch"])
        return super()._run_epoch(*args, **kwargs)


class Preempted(RuntimeError):
    """The run got SIGTERM/SIGUSR1, saved a checkpoint at the next step boundary and stopped."""

    def __init__(self, signal_name: str, step: int, checkpoint: str) -> None:
        super().__init__(f"{signal_name}: stopped after step {step}; checkpoint {checkpoint} saved, resume from it")
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint


class PreemptionHandler(TrainerCallback):
    """SIGTERM and SIGUSR1 (what SLURM and spot reclaims send) only set a flag; at the end of the current optimizer
    step all processes agree on it (any one signalled stops them all), and `PreemptionMixin` saves and stops."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self, trainer: Any = None) -> None:
        self.trainer = trainer  # for the cross-process reduction of the flag; optional
        self.received: str | None = None
        self.stop = False
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        """Take over the signals (main thread only; elsewhere they keep their handlers, logged)."""
        self.received, self.stop = None, False  # a new train() call starts unpreempted
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is None:  # no SIGUSR1 on Windows
                continue
            try:
                self._previous[sig] = signal.signal(sig, self._on_signal)
            except ValueError:
                logger.warning("not the main thread: %s will not save a checkpoint before the run ends", name)

    def uninstall(self) -> None:
        """Give the signals back their previous handlers."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Only a flag: the step in flight finishes, so the checkpoint is one an uninterrupted run would also pass.
        self.received = signal.Signals(signum).name

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        """Agree across processes whether to stop after this step."""
        got = self.received is not None
        acc = getattr(self.trainer, "accelerator", None)
        if acc is not None and acc.num_processes > 1:
            # Every rank must save and stop at the same step, or the save's collectives hang.
            flag = torch.tensor(float(got), device=acc.device)
            got = bool(acc.reduce(flag, reduction="sum").item() > 0)
        if got and not self.stop:
            self.stop = True
            logger.warning(
                "%s: saving a checkpoint after step %d and stopping", self.received or "signal", state.global_step
            )
        return control


class PreemptionMixin:
    """Installs a `PreemptionHandler` for the duration of `train()`; after the step it agreed on, saves a
    checkpoint (unless the step already saved one) and raises `Preempted`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.preemption = PreemptionHandler(trainer=self)
        self.add_callback(self.preemption)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """The Trainer's `train`, with SIGTERM/SIGUSR1 turned into a checkpoint and `Preempted`."""
        self.preemption.install()
        try:
            return super().train(*args, **kwargs)
        finally:
            self.preemption.uninstall()

    def _maybe_log_save_evaluate(
        self, tr_loss: Any, grad_norm: Any, model: Any, trial: Any, *args: Any, **kw: Any
    ) -> None:
        # The step's own logging, evaluation and save run first, as in an uninterrupted run (evaluation draws from
        # the global RNG, so skipping it would change what the resumed run sees).
        super()._maybe_log_save_evaluate(tr_loss, grad_norm, model, trial, *args, **kw)
        if not self.preemption.stop:
            return
        step = self.state.global_step
        if self._qrm_saved_step != step:
            self._save_checkpoint(model, trial)
            self.control = self.callback_handler.on_save(self.args, self.state, self.control)
        path = os.path.join(self._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{step}")
        raise Preempted(self.preemption.received or "signal on another process", step, path)


class ReliabilityMixin(NonFiniteGuardMixin, PreemptionMixin, AtomicCheckpointMixin, ExactResumeMixin, TokenScrubMixin):
    """All of them: put it before `RewardTrainer` in the Trainer subclass's bases."""


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
        with open(os.path.join(folder, PROVENANCE_FILES[0])) as f:
            recipe = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError):
        pass
    try:
        with open(os.path.join(folder, PROVENANCE_FILES[1])) as f:
            versions = json.load(f)
    except (OSError, ValueError):
        pass
    return recipe, versions


def _fmt(value: Any) -> str:
    return json.dumps(value, default=str)


def check_resume_recipe(
    checkpoint: str, output_dir: str, force: bool = False, current: tuple[dict, dict] | None = None
) -> list[str]:
    """Compare the recipe and training data `checkpoint` was trained with against this run's: `current` (resolved
    recipe, versions info; what `build_trainer` is about to write, so nothing is written before the decision), else
    the provenance in `output_dir`; raise `RecipeError` naming what changed, unless `force`.

    Returns the differences (with `force`, also logged). On refusal without `current`, output_dir's provenance is
    put back to the checkpoint's, so it keeps describing the checkpoints it holds."""
    from .config import RecipeError

    saved_recipe, saved_versions = _read_provenance(checkpoint)
    recipe, versions = current if current is not None else _read_provenance(output_dir)
    name = os.path.basename(os.path.normpath(checkpoint))
    if saved_recipe is None or recipe is None:
        logger.warning("%s: no %s to compare with this recipe; resuming unchecked", checkpoint, PROVENANCE_FILES[0])
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
    if current is None and int(os.environ.get("RANK", 0)) == 0:
        for fname in PROVENANCE_FILES:
            if os.path.isfile(os.path.join(checkpoint, fname)):
                shutil.copyfile(os.path.join(checkpoint, fname), os.path.join(output_dir, fname))
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
    from .config import RecipeError

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
    if current is None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # the main process has written this run's provenance into output_dir
    check_resume_recipe(path, output_dir, force=bool(getattr(args, "resume_force", False)), current=current)
    logger.info("resuming from %s", path)
    return path
