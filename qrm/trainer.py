"""qrm's trainer: TRL's `RewardTrainer` with every qrm extension in one place.

Public Trainer hooks (callbacks) carry what they can:

- `NonFiniteGuard` (`on_pre_optimizer_step`): a NaN/Inf loss or gradient stops the run (or skips the step) before the
  optimizer applies it.
- `PreemptionHandler` (`on_step_end`, `on_save`): SIGTERM/SIGUSR1 save a checkpoint at the next step boundary, on
  every process at the same step, then `Preempted` is raised.
- `_EpochSeed` (`on_epoch_begin`) and `_BestLengthHead` (`on_train_end`): the seeded length-grouped order and ODIN's
  length head with `load_best_model_at_end`.

The private overrides left each say in one line why no public hook does the job: atomic checkpoints
(`_save_checkpoint`, `_get_output_dir`), no pickled arguments and ODIN's length head beside every adapter (`_save`),
and the seeded sampler (`_get_train_sampler`). `compute_loss` takes qrm's packed and ODIN batches.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from trl import RewardTrainer

from . import odin, packing
from .errors import NonFiniteError, Preempted
from .files import LENGTH_HEAD_FILE, PROVENANCE_FILES

logger = logging.getLogger("qrm")

STAGING_PREFIX = "tmp-"  # `tmp-checkpoint-N` never matches the Trainer's `^checkpoint-\d+$` pattern
TRAINING_ARGS_PICKLE = "training_args.bin"
TRAINING_ARGS_JSON = "training_args.json"


class NonFiniteGuard(TrainerCallback):
    """Checks loss and gradients between gradient clipping and `optimizer.step()` (`on_pre_optimizer_step`).

    Args:
        skip (`bool`, *optional*, defaults to `False`): `False` raises `NonFiniteError` naming the global step
            (weights and checkpoints stay those of the last good step); `True` drops the gradients so the optimizer
            leaves every parameter alone, and counts the step.
        trainer (`Trainer`, *optional*): for the cross-process reduction of the verdict.
    """

    def __init__(self, skip: bool = False, trainer: Any = None) -> None:
        self.skip = skip
        self.trainer = trainer
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

    def take_window(self) -> int:
        """Skipped steps since the last call (the logged loss covers them), then reset."""
        n, self._window_bad = self._window_bad, 0
        return n

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        """Decide before the optimizer sees the gradients."""
        model, optimizer = kwargs.get("model"), kwargs.get("optimizer")
        if optimizer is not None:
            params = [p for g in optimizer.param_groups for p in g["params"]]
        else:
            params = [p for p in model.parameters() if p.requires_grad] if model is not None else []
        grads = [p.grad for p in params if p.grad is not None]
        # One sync for all tensors; LoRA gradients are small, so this costs next to nothing.
        bad = self._bad_loss or (bool(grads) and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()))
        self._bad_loss = False
        if _any_rank(self.trainer, bad):  # every rank must take the same branch or the next collective hangs
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


def _any_rank(trainer: Any, flag: bool) -> bool:
    """`flag` on any process (a sum over processes; the flag itself with one process)."""
    acc = getattr(trainer, "accelerator", None)
    if acc is None or acc.num_processes <= 1:
        return flag
    return bool(acc.reduce(torch.tensor(float(flag), device=acc.device), reduction="sum").item() > 0)


class PreemptionHandler(TrainerCallback):
    """SIGTERM and SIGUSR1 (what SLURM and spot reclaims send) only set a flag. At the end of the optimizer step all
    processes agree on it (any one signalled stops them all) and ask the Trainer for a save; once that checkpoint is
    saved, `Preempted` is raised (the step's own logging and evaluation run first, as in an uninterrupted run).

    Args:
        trainer (`Trainer`, *optional*): for the cross-process reduction of the flag.
    """

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self, trainer: Any = None) -> None:
        self.trainer = trainer
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
        """Agree across processes whether to stop after this step; if so, ask for a save and a stop."""
        # Every rank must save and stop at the same step, or the save's collectives hang.
        if _any_rank(self.trainer, self.received is not None) and not self.stop:
            self.stop = True
            logger.warning(
                "%s: saving a checkpoint after step %d and stopping", self.received or "signal", state.global_step
            )
        if self.stop:
            control.should_save = control.should_training_stop = True
        return control

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        """A save the step skipped (`save_strategy: best` without a new best) happens at the epoch's end."""
        if self.stop:
            control.should_save = True
        return control

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        """The checkpoint of the agreed step is published: stop the run."""
        if self.stop:
            path = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            raise Preempted(self.received or "signal on another process", state.global_step, path)
        return control


class SeededLengthGroupedSampler(LengthGroupedSampler):
    """`LengthGroupedSampler` whose order is drawn from `seed + epoch` instead of the global RNG.

    The Trainer builds it with no generator, so an epoch's order depends on how much randomness (dropout) was used
    before it: a run resumed in a later epoch would see a different order than the uninterrupted run.

    Args:
        batch_size (`int`): samples per (accumulated) batch, as the Trainer's sampler has it.
        lengths (`list[int]`): length of each sample.
        seed (`int`): the run's data seed.
    """

    def __init__(self, batch_size: int, lengths: list[int], seed: int) -> None:
        super().__init__(batch_size, lengths=lengths)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Called before each epoch (by `_EpochSeed` and accelerate's dataloader)."""
        self.epoch = epoch

    def __iter__(self) -> Any:
        gen = torch.Generator()
        gen.manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=gen))


class _EpochSeed(TrainerCallback):
    # accelerate forwards set_epoch only two wrappers deep; with several processes and a skipped-into epoch the
    # sampler sits deeper, so the epoch is set here (state.epoch is a whole number or epoch + fraction).
    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.trainer.seeded_sampler is not None:
            self.trainer.seeded_sampler.set_epoch(math.floor(state.epoch or 0))
        return control


class _BestLengthHead(TrainerCallback):
    # load_best_model_at_end: ODIN's length head comes from the same checkpoint as the adapter (the Trainer loads
    # the best model before on_train_end).
    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> Any:
        best = state.best_model_checkpoint
        if args.load_best_model_at_end and best and model is not None and odin.length_head(model) is not None:
            if os.path.isfile(os.path.join(best, LENGTH_HEAD_FILE)):
                odin.load_length_head(model, best)
        return control


class QrmRewardTrainer(RewardTrainer):
    """TRL's `RewardTrainer` with atomic checkpoints carrying the run's provenance, a non-finite guard, preemption
    as a checkpoint, a seeded length-grouped order, no token in what it writes, ODIN's length head saved beside
    every adapter, and qrm's packed batches. Takes `RewardTrainer`'s arguments."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seeded_sampler: SeededLengthGroupedSampler | None = None
        self.nonfinite_guard = NonFiniteGuard(skip=bool(self.args.skip_nonfinite_steps), trainer=self)
        self.preemption = PreemptionHandler(trainer=self)
        for callback in (self.nonfinite_guard, self.preemption, _EpochSeed(self), _BestLengthHead()):
            self.add_callback(callback)
        if self.args.push_to_hub and self.args.hub_token:
            logger.warning("push_to_hub with hub_token: Trainer pushes training_args.bin; prefer HF_TOKEN")

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """The Trainer's `train`, with SIGTERM/SIGUSR1 turned into a checkpoint and `Preempted`."""
        self.preemption.install()
        try:
            return super().train(*args, **kwargs)
        finally:
            self.preemption.uninstall()

    def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The Trainer's step, with the loss shown to the non-finite guard."""
        loss = super().training_step(*args, **kwargs)
        self.nonfinite_guard.note_loss(loss)
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """TRL's metrics; a skipped step's loss reads NaN, never a number (`logging_nan_inf_filter` would show 0)."""
        if "loss" in logs and self.nonfinite_guard.take_window():
            logs["loss"] = math.nan
        if self.nonfinite_guard.skipped and ("loss" in logs or "train_runtime" in logs):
            logs["nonfinite_skipped"] = self.nonfinite_guard.skipped
        super().log(logs, start_time)

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        """TRL's loss and metrics; batches from `PairPackingCollator` go through the packed forward, ODIN batches
        through the ODIN loss."""
        if odin.RESPONSE_LEN_KEY in inputs:
            loss, rewards, n_tokens, terms = odin.odin_loss(self, model, inputs)
            self._record(rewards, n_tokens, {f"odin_{k}": v for k, v in terms.items()})
        elif packing.INDEX_KEY in inputs:
            loss, rewards = self._packed_loss(model, inputs)
            self._record(rewards, inputs[packing.TOKENS_KEY])
        else:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if not return_outputs:
            return loss
        from transformers.modeling_outputs import SequenceClassifierOutput

        return loss, SequenceClassifierOutput(logits=rewards.detach()[:, None])

    def reward_head(self) -> torch.nn.Module | None:
        """The live score head packed forwards read rewards from (None for BERT-style encoders, read via pooler)."""
        if not hasattr(self, "_reward_head"):
            self._reward_head = packing.head_module(self.accelerator.unwrap_model(self.model))
        return self._reward_head

    def _packed_loss(self, model: Any, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        # Bradley-Terry loss on a packed batch: the same maths as TRL's compute_loss.
        rewards = packing.packed_rewards(model, self.reward_head(), inputs)
        chosen, rejected = rewards.chunk(2)
        diff = chosen - rejected
        if "margin" in inputs:
            diff = diff - inputs["margin"]
        loss = -torch.nn.functional.logsigmoid(diff).mean()
        if self.args.center_rewards_coefficient is not None:
            loss = loss + self.args.center_rewards_coefficient * torch.mean((chosen + rejected) ** 2)
        return loss, rewards

    def _record(
        self, rewards: torch.Tensor, n_tokens: torch.Tensor, extra: dict[str, torch.Tensor] | None = None
    ) -> None:
        # TRL's metrics, same names and maths, into TRL's own buckets so its `log` averages and prefixes them. The
        # Trainer's `include_num_input_tokens_seen` would count a shared prefix once, TRL's num_tokens counts it twice.
        mode = "train" if self.model.training else "eval"
        acc, metrics = self.accelerator, self._metrics[mode]
        if mode == "train":
            self._total_train_tokens += acc.gather_for_metrics(n_tokens).sum().item() // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        with torch.no_grad():
            rewards = rewards.detach()
            chosen, rejected = rewards.chunk(2)
            everything = acc.gather(rewards)
            metrics["min_reward"].append(everything.min().item())
            metrics["mean_reward"].append(everything.mean().item())
            metrics["max_reward"].append(everything.max().item())
            metrics["accuracy"].append(acc.gather_for_metrics((chosen > rejected).float().mean()).mean().item())
            metrics["margin"].append(acc.gather_for_metrics((chosen - rejected).mean()).mean().item())
            for key, value in (extra or {}).items():
                metrics[key].append(acc.gather_for_metrics(value.detach()).mean().item())

    _staging: str | None = None

    def _get_output_dir(self, trial: Any) -> str:
        # No public hook names the directory a checkpoint is written to; staging redirects it (see _save_checkpoint).
        return self._staging if self._staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        # transformers 5.23 writes straight into checkpoint-N, so a run killed mid-save leaves a checkpoint-N that
        # looks resumable; here it is written to tmp-checkpoint-N/ and renamed, then older ones are rotated.
        run_dir = self._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging, final = os.path.join(run_dir, STAGING_PREFIX + name), os.path.join(run_dir, name)
        if self.args.should_save and os.path.isdir(staging):
            shutil.rmtree(staging)  # left over from a run that died mid-save
        self.accelerator.wait_for_everyone()
        self._staging = staging  # inside staging there is only this checkpoint: the Trainer's rotation is a no-op
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = None
        self.accelerator.wait_for_everyone()  # all ranks' files (rng states, shards) are in staging
        if self.args.should_save:
            for fname in PROVENANCE_FILES:  # each checkpoint carries the recipe and data it was trained with
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

    def _fix_best_checkpoint(self, run_dir: str, staging: str, final: str) -> None:
        # The Trainer looked for the best checkpoint under the staging dir; point it at the published one.
        best = self.state.best_global_step
        path = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{best}")
        if not best or not os.path.isdir(path) or self.state.best_model_checkpoint == path:
            return
        stale = (self.state.best_model_checkpoint or "").startswith(staging)
        self.state.best_model_checkpoint = path
        if stale:
            tmp = os.path.join(final, "trainer_state.json.tmp")
            self.state.save_to_json(tmp)
            os.replace(tmp, os.path.join(final, "trainer_state.json"))

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # No public hook runs after the final save_model (on_save fires for checkpoints only), and the token must be
        # out of the arguments while the Trainer pickles them. No pickle and no `hub_token` beside the weights:
        # `training_args.bin` becomes `training_args.json` (`*_token` redacted); the Trainer never reads the pickle
        # back (resume uses trainer_state.json). ODIN's length head goes beside every adapter.
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        token, self.args.hub_token = self.args.hub_token, None
        try:
            super()._save(output_dir, state_dict=state_dict)
        finally:
            self.args.hub_token = token
        if not self.args.should_save:
            return
        pickled = os.path.join(output_dir, TRAINING_ARGS_PICKLE)
        if os.path.isfile(pickled):
            os.remove(pickled)
        with open(os.path.join(output_dir, TRAINING_ARGS_JSON), "w") as f:
            f.write(self.args.to_json_string() + "\n")  # TrainingArguments.to_dict redacts every *_token
        lin = odin.length_head(self.model)
        if lin is not None:
            odin.save_length_head(lin, output_dir)

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        # No public hook picks the sampler, and the Trainer builds LengthGroupedSampler without a generator.
        sampler = super()._get_train_sampler(train_dataset)
        if type(sampler) is LengthGroupedSampler and sampler.generator is None:
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            sampler = SeededLengthGroupedSampler(sampler.batch_size, sampler.lengths, seed)
            self.seeded_sampler = sampler
        return sampler


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
