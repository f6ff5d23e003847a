"""Launch checks and FSDP-safe adapter saving for 4-bit (QLoRA) reward models on several GPUs.

`check_launch` runs at trainer start-up, before the model is loaded: it reads what `accelerate launch` exported
(ACCELERATE_USE_FSDP, FSDP_VERSION, ACCELERATE_MIXED_PRECISION, ACCELERATE_USE_DEEPSPEED, ...) or the Trainer's own
`fsdp` / `deepspeed` arguments, and refuses a 4-bit model whose packed-weight storage dtype differs from the dtype
the sharding engine gives its parameters.

`effective_launch` corrects that reading for what accelerate really runs: an FSDP config on CPU-only processes runs as
DDP (one warning), so the recipe is loaded unsharded. `save_adapter` writes the LoRA adapter and the score head as an
ordinary PEFT adapter directory under any launcher; `score_pairs_across_ranks` splits the end-of-training scoring
over the processes, each pair scored once.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import LaunchError

logger = logging.getLogger("qrm")

_TRUE = {"1", "true", "yes", "y", "on", "t"}
# FSDP's param dtype (accelerate's FullyShardedDataParallelPlugin.set_mixed_precision) and DeepSpeed's
# weight dtype per accelerate mixed-precision mode; "no" leaves the parameters in fp32.
PARAM_DTYPE = {"bf16": "bfloat16", "fp8": "bfloat16", "fp16": "float16", "no": "float32"}


@dataclass(frozen=True)
class Launch:
    """How the process was launched, as far as parameter sharding is concerned."""

    sharding: str | None  # "fsdp", "deepspeed-zero3" or None (single GPU, DDP, ZeRO-1/2)
    fsdp_version: int | None
    mixed_precision: str  # accelerate's mode: no, bf16, fp16, fp8
    source: str  # where it was read from, for error messages

    @property
    def param_dtype(self) -> str:
        """dtype of the parameters the sharding engine all-gathers and computes with."""
        return PARAM_DTYPE.get(self.mixed_precision, "float32")

    @property
    def name(self) -> str:
        if self.sharding == "fsdp":
            return f"FSDP{self.fsdp_version}"
        return "DeepSpeed ZeRO-3" if self.sharding == "deepspeed-zero3" else "no sharding"


def _flag(env: Mapping[str, str], key: str) -> bool:
    return env.get(key, "false").strip().lower() in _TRUE


def _mixed_precision(training_args: Any, env: Mapping[str, str]) -> str:
    # TrainingArguments.__post_init__ resolves env + bf16/fp16 flags into `mixed_precision`, and the Trainer
    # hands exactly that to the Accelerator; fall back to the same rule when given something else.
    mp = getattr(training_args, "mixed_precision", None)
    if mp:
        return str(mp)
    if getattr(training_args, "fp16", False):
        return "fp16"
    if getattr(training_args, "bf16", False):
        return "bf16"
    return env.get("ACCELERATE_MIXED_PRECISION", "no").lower()


def _deepspeed_stage(ds: Any) -> int | None:
    if isinstance(ds, str) and ds.strip().startswith("{"):
        ds = json.loads(ds)
    elif isinstance(ds, (str, os.PathLike)) and Path(ds).is_file():
        ds = json.loads(Path(ds).read_text())
    if isinstance(ds, Mapping):
        stage = ds.get("zero_optimization", {}).get("stage")
        return int(stage) if stage is not None and str(stage).isdigit() else None
    return None


def detect_launch(training_args: Any = None, environ: Mapping[str, str] | None = None) -> Launch:
    """Read the sharding mode from accelerate's environment, else from the Trainer's fsdp/deepspeed arguments."""
    env = os.environ if environ is None else environ
    mp = _mixed_precision(training_args, env)
    if _flag(env, "ACCELERATE_USE_FSDP"):
        # accelerate launch exports FSDP_VERSION from fsdp_version (its default, and the plugin's, is 1)
        return Launch("fsdp", int(env.get("FSDP_VERSION", "1")), mp, "accelerate launch")
    if _flag(env, "ACCELERATE_USE_DEEPSPEED"):
        stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        if stage is None and env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
            stage = _deepspeed_stage(env["ACCELERATE_DEEPSPEED_CONFIG_FILE"])
        if str(stage) == "3":
            return Launch("deepspeed-zero3", None, mp, "accelerate launch")
    fsdp = getattr(training_args, "fsdp", None)
    if fsdp and fsdp not in ("False", "false", "0"):
        plugin_args = getattr(training_args, "fsdp_plugin_args", None) or {}
        fsdp_config = getattr(training_args, "fsdp_config", None) or {}
        version = plugin_args.get("fsdp_version") or (
            fsdp_config.get("version") if isinstance(fsdp_config, dict) else None
        )
        # transformers 5 builds FSDP2 unless fsdp_config says version 1
        return Launch("fsdp", int(version or 2), mp, "the fsdp training argument")
    ds = getattr(training_args, "deepspeed", None)
    if ds is not None and _deepspeed_stage(ds) == 3:
        return Launch("deepspeed-zero3", None, mp, "the deepspeed training argument")
    return Launch(None, None, mp, "no sharding launcher detected")


# accelerate 1.15 builds its FSDP plugin only for these process types (accelerate/state.py:986,
# `elif self.distributed_type in [DistributedType.MULTI_GPU, ...]`); MULTI_CPU and NO run the model unsharded.
FSDP_CAPABLE = frozenset(
    {"MULTI_GPU", "MULTI_MLU", "MULTI_SDAA", "MULTI_MUSA", "MULTI_NPU", "MULTI_XPU", "MULTI_HPU", "MULTI_NEURON"}
)


def effective_launch(
    training_args: Any = None, environ: Mapping[str, str] | None = None, distributed_type: Any = None
) -> Launch:
    """`detect_launch`, corrected for what accelerate will really run: FSDP asked for on processes accelerate cannot
    shard (CPU only) runs as DDP, with a one-line warning, and the recipe is then loaded unsharded.

    Args:
        training_args (`TrainingArguments`, *optional*, defaults to `None`):
            The Trainer's arguments (their `fsdp` / `deepspeed` / mixed precision fields).
        environ (`Mapping[str, str]`, *optional*, defaults to `os.environ`):
            The launcher's environment. When it is `os.environ` and FSDP falls back, `ACCELERATE_USE_FSDP` is set to
            false in it, so transformers does not load the weights on rank 0 only (`is_fsdp_enabled`) for a DDP run.
        distributed_type (`str` or `accelerate.DistributedType`, *optional*, defaults to `None`):
            The process type accelerate chose; `None` asks `accelerate.PartialState` (initialising it as the
            Trainer would).
    """
    launch = detect_launch(training_args, environ)
    if launch.sharding != "fsdp":
        return launch
    if distributed_type is None:
        from accelerate.state import PartialState

        distributed_type = PartialState().distributed_type
    kind = str(getattr(distributed_type, "value", distributed_type)).rsplit(".", 1)[-1].upper()
    if kind in FSDP_CAPABLE:
        return launch
    env = os.environ if environ is None else environ
    world = int(env.get("WORLD_SIZE", "1"))
    runs_as = f"DDP over {world} CPU processes" if world > 1 else "one unsharded process"
    if int(env.get("RANK", "0")) == 0:
        logger.warning(
            "%s asked for %s, but accelerate shards only on GPUs/accelerators and runs %s here: running as %s, "
            "model not sharded",
            launch.source,
            launch.name,
            kind,
            runs_as,
        )
    if environ is None and "ACCELERATE_USE_FSDP" in os.environ:
        os.environ["ACCELERATE_USE_FSDP"] = "false"
    return Launch(None, None, launch.mixed_precision, f"{launch.source}, run as {runs_as}")


def _dtype_name(value: Any) -> str:
    return str(value).removeprefix("torch.")


def check_launch(model_args: Any, training_args: Any, launch: Launch | None = None) -> None:
    """Refuse a 4-bit model whose `bnb_4bit_quant_storage` is not the sharded parameter dtype (FSDP / ZeRO-3).

    `launch` defaults to `detect_launch(training_args)` (what the launcher asked for); `train` passes
    `effective_launch`, which knows when accelerate falls back to DDP.

    Why: FSDP and ZeRO-3 treat the packed 4-bit weights as ordinary parameters. With uint8 storage FSDP1 cannot
    flatten them together with the bf16 ones, FSDP2 (accelerate 1.15) leaves them unsharded on every GPU, and
    ZeRO-3 partitions them as if they were bf16. A float storage different from the training dtype makes
    transformers switch FSDP's param dtype to it (update_fsdp_plugin_peft), casting every 16-bit weight; and
    without that switch (a custom loop) FSDP's mixed-precision cast turns the packed codes into garbage.
    """
    if not getattr(model_args, "load_in_4bit", False):
        return
    launch = detect_launch(training_args) if launch is None else launch
    if launch.sharding is None:
        return
    storage = _dtype_name(getattr(model_args, "bnb_4bit_quant_storage", "uint8"))
    if storage == launch.param_dtype:
        return
    if storage not in ("uint8", "int8"):
        consequence = (
            f"transformers would switch the sharded param dtype to {storage} and cast every 16-bit weight to it "
            "(without that switch, in a custom loop, the mixed-precision cast turns the packed 4-bit codes into garbage)"
        )
    elif launch.sharding == "deepspeed-zero3":
        consequence = "ZeRO-3 would partition and cast the packed integer weights as if they were float parameters"
    elif launch.fsdp_version == 1:
        consequence = "FSDP1 cannot flatten the packed integer weights together with the float parameters"
    else:
        consequence = (
            "accelerate would leave the integer 4-bit weights out of FSDP2's sharding, so every GPU would hold the "
            "whole 4-bit model"
        )
    raise LaunchError(
        f"bnb_4bit_quant_storage={storage}, but {launch.name} (from {launch.source}, mixed_precision="
        f"{launch.mixed_precision}) shards parameters as {launch.param_dtype}: {consequence}. "
        f"Fix: set `bnb_4bit_quant_storage: {launch.param_dtype}` in the recipe or pass "
        f"`--bnb_4bit_quant_storage {launch.param_dtype}`."
    )


def launch_env(config_file: str | os.PathLike, *launch_args: str) -> dict[str, str]:
    """The environment `accelerate launch --config_file F [launch_args]` exports to the training processes.

    Mirrors accelerate.commands.launch.launch_command (accelerate 1.15) without starting anything, so a config
    file can be checked against a recipe on a machine without GPUs.
    """
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import (
        prepare_deepspeed_cmd_env,
        prepare_multi_gpu_env,
        prepare_simple_launcher_cmd_env,
    )

    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", str(config_file), *launch_args, "scripts/train.py"])
    args, defaults, mp_from_config = _validate_launch_command(args)
    if args.use_deepspeed:
        fields = list(defaults.deepspeed_config) if defaults else []
        args.deepspeed_fields_from_accelerate_config = ",".join(
            fields + (["mixed_precision"] if mp_from_config else [])
        )
        _, env = prepare_deepspeed_cmd_env(args)
    elif args.use_fsdp or args.multi_gpu:
        env = prepare_multi_gpu_env(args)
    else:
        _, env = prepare_simple_launcher_cmd_env(args)
    return {k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))}


def _clean_name(name: str) -> str:
    # activation-checkpoint and torch.compile wrappers insert these into parameter names
    for prefix in ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module."):
        name = name.replace(prefix, "")
    return name


def gather_trainable_state_dict(model: Any) -> dict[str, Any]:
    """Full CPU copies of the trainable parameters of an FSDP2 (DTensor) or plain model.

    A collective under FSDP2: every rank must call it. Only the trainable tensors travel, not the 4-bit backbone.
    """
    from torch.distributed.tensor import DTensor

    out = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        tensor = param.full_tensor() if isinstance(param, DTensor) else param.detach()
        out[_clean_name(name)] = tensor.cpu().clone()
    return out


def save_adapter(trainer: Any, output_dir: str | os.PathLike) -> Path:
    """Save the LoRA adapter + score head as a PEFT adapter directory loadable without FSDP (call on every rank).

    Trainer.save_model writes nothing under FSDP with SHARDED_STATE_DICT, and its FULL_STATE_DICT path gathers the
    whole 4-bit model on rank 0. Under FSDP2 only the trainable tensors are gathered here; FSDP1 uses the
    FULL_STATE_DICT switch of PEFT's examples/sft/train.py; single GPU, DDP and DeepSpeed use Trainer.save_model.
    """
    out = Path(output_dir)
    accelerator = trainer.accelerator
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is None:
        trainer.save_model(str(out))
        return out
    if getattr(plugin, "fsdp_version", 1) != 2:
        plugin.set_state_dict_type("FULL_STATE_DICT")
        trainer.save_model(str(out))
        return out
    lost = [
        n
        for n, p in trainer.model.named_parameters()
        if p.requires_grad and "lora_" not in n and ".modules_to_save." not in n
    ]
    if lost:
        # PEFT's adapter files keep only LoRA weights and modules_to_save; anything else trained would be dropped
        raise ValueError(f"trainable parameters outside LoRA/modules_to_save would not be saved: {lost[:5]}")
    state = gather_trainable_state_dict(trainer.model)
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(trainer.model)
        model.save_pretrained(str(out), state_dict=state, safe_serialization=True)
        processing_class = getattr(trainer, "processing_class", None)
        if processing_class is not None:
            processing_class.save_pretrained(str(out))
    accelerator.wait_for_everyone()
    return out


def _is_sharded_module(model: Any) -> bool:
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in model.modules())


def score_pairs_across_ranks(
    model: Any, rows: Sequence[dict], pad_token_id: int, batch_size: int = 16
) -> tuple[list[float], list[float]]:
    """`qrm.reward_model.score_pair_rows` split over the processes: each rank scores its contiguous share of the pairs
    once and every rank gets all rewards back in the original order (a collective: call it on every rank).

    Args:
        model (`torch.nn.Module`):
            The trained reward model (unwrapped from DDP; under FSDP the sharded model, whose forward is a collective:
            then every rank runs the same number of batches, the shortest shares padded with repeats of its first
            pair, whose extra rewards are dropped).
        rows (`Sequence[dict]`):
            Tokenized pairs with `chosen_ids` and `rejected_ids`.
        pad_token_id (`int`):
            Padding id for the batched forward.
        batch_size (`int`, *optional*, defaults to `16`):
            Sequences per forward on each rank.
    """
    import torch.distributed as dist

    from . import reward_model

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return reward_model.score_pair_rows(model, rows, pad_token_id, batch_size)
    world, rank = dist.get_world_size(), dist.get_rank()
    per = -(-len(rows) // world)
    mine = list(rows[rank * per : (rank + 1) * per])
    n = len(mine)
    if _is_sharded_module(model) and n < per and rows:
        mine += [mine[0] if mine else rows[0]] * (per - n)
    chosen, rejected = reward_model.score_pair_rows(model, mine, pad_token_id, batch_size) if mine else ([], [])
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, (chosen[:n], rejected[:n]))
    return [c for g in gathered for c in g[0]], [r for g in gathered for r in g[1]]
