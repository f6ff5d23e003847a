"""Training: recipe -> data check -> 4-bit model with LoRA -> TRL RewardTrainer -> adapter, head and reports."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from .config import DataArguments, LoraArguments, ModelArguments, TrainingArguments, to_dict, write_provenance

logger = logging.getLogger("qrm")


def _setup_logging(targs: TrainingArguments) -> None:
    level = logging.INFO if targs.get_process_log_level() <= logging.INFO else logging.WARNING
    logging.basicConfig(format="[qrm] %(message)s", level=level, stream=sys.stdout, force=False)
    logger.setLevel(level)


def _is_main() -> bool:
    return int(os.environ.get("RANK", 0)) == 0


def _trainer_class() -> type:
    from trl import RewardTrainer

    from . import odin, packing
    from .reliability import ReliabilityMixin

    class QrmRewardTrainer(odin.OdinMixin, ReliabilityMixin, RewardTrainer):
        """TRL's RewardTrainer with atomic checkpoints, a non-finite guard, no token in pickles, the `length`
        column kept for length-grouped sampling, and `prompt_len` for ODIN's response lengths."""

        def _set_signature_columns_if_needed(self) -> None:
            super()._set_signature_columns_if_needed()
            for extra in ("length", "prompt_len"):
                if extra not in self._signature_columns:
                    # TRL's collator ignores keys it does not know, so the extra columns are harmless there.
                    self._signature_columns = [*self._signature_columns, extra]

        def compute_loss(
            self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
        ) -> Any:
            """TRL's loss and metrics; batches from `PairPackingCollator` go through the packed forward."""
            if odin.RESPONSE_LEN_KEY in inputs:
                return odin.odin_loss(self, model, inputs, return_outputs)
            if packing.INDEX_KEY not in inputs:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            return _packed_loss(self, model, inputs, return_outputs)

    return QrmRewardTrainer


def _packed_loss(trainer: Any, model: Any, inputs: dict[str, Any], return_outputs: bool) -> Any:
    """Bradley-Terry loss on a packed batch, with the metrics TRL's `compute_loss` logs (same names, same maths)."""
    import torch
    from transformers.modeling_outputs import SequenceClassifierOutput

    from .packing import TOKENS_KEY, head_module, packed_rewards

    mode = "train" if trainer.model.training else "eval"
    if not hasattr(trainer, "_qrm_head"):
        trainer._qrm_head = head_module(trainer.accelerator.unwrap_model(trainer.model))
    rewards = packed_rewards(model, trainer._qrm_head, inputs)
    chosen, rejected = rewards.chunk(2)
    diff = chosen - rejected
    if "margin" in inputs:
        diff = diff - inputs["margin"]
    loss = -torch.nn.functional.logsigmoid(diff).mean()
    if trainer.args.center_rewards_coefficient is not None:
        loss = loss + trainer.args.center_rewards_coefficient * torch.mean((chosen + rejected) ** 2)

    acc, metrics = trainer.accelerator, trainer._metrics[mode]
    if mode == "train":
        trainer._total_train_tokens += acc.gather_for_metrics(inputs[TOKENS_KEY]).sum().item() // trainer._tp_size
    metrics["num_tokens"] = [trainer._total_train_tokens]
    with torch.no_grad():
        everything = acc.gather(rewards.detach())
        metrics["min_reward"].append(everything.min().item())
        metrics["mean_reward"].append(everything.mean().item())
        metrics["max_reward"].append(everything.max().item())
        metrics["accuracy"].append(acc.gather_for_metrics((chosen > rejected).float().mean()).mean().item())
        metrics["margin"].append(acc.gather_for_metrics((chosen - rejected).mean().detach()).mean().item())
    if not return_outputs:
        return loss
    return loss, SequenceClassifierOutput(logits=rewards.detach()[:, None])


def build_trainer(
    margs: ModelArguments, largs: LoraArguments, dargs: DataArguments, targs: TrainingArguments
) -> tuple[Any, Any]:
    """Check the data, load the 4-bit model with LoRA, write provenance; returns (trainer, prepared data)."""
    from transformers import set_seed

    from . import data as qdata
    from .model import count_parameters, load_model

    _setup_logging(targs)
    set_seed(targs.seed)
    fp32_trainables = margs.load_in_4bit and margs.bnb_4bit_compute_dtype == "float32"
    if fp32_trainables and (targs.bf16 or targs.fp16):
        # RewardConfig turns bf16 on by default; an fp32 compute dtype means fp32 throughout, and accelerate's
        # autocast would otherwise also wrap the model's forward after training (end-of-training scores).
        logger.info("bnb_4bit_compute_dtype=float32: training in fp32 (bf16/fp16 autocast off)")
        targs.bf16 = targs.fp16 = False
        targs.mixed_precision = "no"  # derived from bf16 in TrainingArguments.__post_init__
    if margs.load_in_4bit and not fp32_trainables and not targs.bf16 and not targs.fp16:
        # TRL casts LoRA and head weights to bf16 for 4-bit models; without autocast the head matmul mixes dtypes.
        logger.info("4-bit backbone with %s compute: enabling bf16 autocast (bf16=True)", margs.bnb_4bit_compute_dtype)
        targs.bf16 = True
    from .distributed import check_launch, effective_launch

    launch = effective_launch(targs)  # an FSDP config on CPU-only processes runs as DDP (warned once, unsharded)
    fsdp = launch.sharding is not None
    check_launch(margs, targs, launch)
    # transformers 5 renamed gradient_checkpointing to activation_checkpointing and keeps the old name as an alias.
    checkpointing = bool(targs.gradient_checkpointing or getattr(targs, "activation_checkpointing", False))

    # Everything that can be wrong with the recipe, the paths and the data fails here, before any weight is read
    # and before anything is written.
    from .preflight import (
        check_lora_targets,
        check_model_source,
        check_output_dir,
        decide_output_dir,
        load_tokenizer_or_explain,
    )

    sources = getattr(targs, "qrm_sources", None)
    local_model = check_model_source(margs, sources)
    inputs = {"dataset": dargs.dataset, "eval_dataset": dargs.eval_dataset, "model_name_or_path": local_model}
    check_output_dir(targs.output_dir, inputs, sources)
    if local_model is not None:
        check_lora_targets(local_model, largs, sources, trust_remote_code=targs.trust_remote_code)
    tokenizer = load_tokenizer_or_explain(margs, targs, sources)
    prepared = qdata.prepare(dargs, tokenizer, targs.max_length)
    if _is_main():
        print(prepared.summary(), flush=True)

    out = Path(targs.output_dir)
    resolved = to_dict(margs, largs, dargs, targs)
    # Resume, start afresh, replace (old run moved aside) or refuse: decided before the first file is written.
    targs.qrm_resume_from = decide_output_dir(targs, resolved, prepared.train, sources)
    if _is_main():
        write_provenance(
            out,
            resolved,
            extra={"data": [r.as_dict() for r in prepared.reports]},
            train_rows=prepared.train,
            sources=[dargs.dataset, dargs.eval_dataset],
        )
        (out / "data_report.json").write_text(json.dumps([r.as_dict() for r in prepared.reports], indent=2) + "\n")

    model = load_model(
        margs,
        largs,
        tokenizer,
        gradient_checkpointing=checkpointing,
        fsdp=fsdp,
        trust_remote_code=targs.trust_remote_code,
    )
    from .score import keep_training_matmul

    keep_training_matmul(model)  # evals must not repack 4-bit weights with bf16 scales (AVX512-BF16 CPUs)
    from . import odin

    odin.setup(model, targs, sharded=fsdp)  # length_debias: odin; before TRL casts and the optimizer sees weights
    counts = count_parameters(model)
    attn = model.config._attn_implementation if hasattr(model.config, "_attn_implementation") else "?"
    logger.info(
        "model %s: %s trainable / %s parameters, attention=%s, 4-bit=%s",
        margs.model_name_or_path,
        f"{counts['trainable']:,}",
        f"{counts['total']:,}",
        attn,
        margs.load_in_4bit,
    )
    if checkpointing and margs.load_in_4bit and not fsdp:
        # prepare_model_for_kbit_training already enabled checkpointing; the Trainer would enable it again with
        # its own kwargs, so leave the switch to the model.
        targs.gradient_checkpointing = False
        if hasattr(targs, "activation_checkpointing"):
            targs.activation_checkpointing = False

    train_ds = qdata.to_dataset(prepared.train)
    eval_ds = qdata.to_dataset(prepared.eval) if prepared.eval else None
    if eval_ds is None and targs.eval_strategy != "no":
        logger.warning(
            "eval_strategy=%s but no eval data (set eval_dataset or eval_fraction): disabling", targs.eval_strategy
        )
        targs.eval_strategy = "no"
    trainer = _trainer_class()(
        model=model,
        args=targs,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        data_collator=odin.with_response_lengths(_collator(model, targs), targs, tokenizer),
    )
    if fp32_trainables:
        # TRL casts trainable weights to bf16 for quantized models (trl/trainer/reward_trainer.py). With an fp32
        # compute dtype (CPUs without bf16 units: bf16 matmuls measured 7x slower here) keep LoRA and head in fp32,
        # so nothing needs autocast. The optimizer does not exist yet, so this is safe.
        for p in trainer.model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    # TRL filters pairs longer than max_length silently; ours are already fitted, so it must keep them all.
    n_after = len(trainer.train_dataset)
    if n_after != len(train_ds):
        raise RuntimeError(f"RewardTrainer dropped {len(train_ds) - n_after} pairs after qrm fitted them to max_length")
    return trainer, prepared


def _collator(model: Any, targs: TrainingArguments) -> Any:
    """qrm's packing collator when the recipe asks for it and the model supports it; None keeps TRL's padding."""
    from .packing import PairPackingCollator, is_encoder, support, use_pair_blocks

    if not targs.packing:
        logger.info("packing off: TRL's padded batches")
        return None
    can_pack, can_share, why = support(model)
    if not can_pack:
        logger.info("packing off (%s): TRL's padded batches", why)
        return None
    share = targs.prefix_sharing and can_share
    if targs.prefix_sharing and not can_share:
        logger.info("prefix sharing off (%s): packing only", why)
    blocks = use_pair_blocks(model)
    logger.info(
        "packing pairs without padding%s%s",
        ", shared prefix computed once" if share else "",
        ", attention per pair (sdpa)" if blocks else "",
    )
    return PairPackingCollator(
        prefix_sharing=share, pad_to_multiple_of=targs.pad_to_multiple_of, read_first=is_encoder(model)
    )


def train(
    margs: ModelArguments, largs: LoraArguments, dargs: DataArguments, targs: TrainingArguments
) -> dict[str, Any]:
    """Train a reward model as the recipe says and write everything into `targs.output_dir`; returns metrics."""
    from .distributed import score_pairs_across_ranks
    from .model import count_parameters
    from .odin import quality_only
    from .packing import restore_attention

    trainer, prepared = build_trainer(margs, largs, dargs, targs)
    tokenizer = trainer.processing_class
    out = Path(targs.output_dir)
    train_ds, eval_ds = trainer.train_dataset, trainer.eval_dataset
    counts = count_parameters(trainer.model)
    t0 = time.time()
    result = trainer.train(resume_from_checkpoint=_resume_arg(targs))
    train_seconds = time.time() - t0
    restore_attention(trainer.model)  # the per-pair sdpa kernel is a training-time detail; save and score as sdpa
    quality_only(trainer.model)  # ODIN: reports, verify pairs and exports score the quality head alone

    metrics: dict[str, Any] = {
        "train_loss": result.training_loss,
        "train_runtime_s": round(train_seconds, 2),
        "train_pairs": len(train_ds),
        "global_step": result.global_step,
        "parameters": counts,
    }
    if eval_ds is not None:
        # One scoring pass gives everything (trainer.evaluate() would run the same forward a second time).
        # Each process scores its share of the pairs once; all get every reward back.
        chosen, rejected = score_pairs_across_ranks(
            trainer.model, prepared.eval, tokenizer.pad_token_id, targs.per_device_eval_batch_size
        )
        # The same metrics `qrm eval` reports (ties count 0.5); the main process also writes the report and plots.
        report = _eval_report(out if _is_main() else None, prepared.eval, chosen, rejected)
        metrics["eval_pairs"] = report["n_pairs"]
        metrics["eval_accuracy"] = report["accuracy"]
        metrics["eval_mean_margin"] = report["mean_margin"]
        metrics["eval_loss"] = report["bt_loss"]
        for key in ("ece", "accuracy_ci95", "length_reward_spearman", "temperature"):
            metrics[f"eval_{key}"] = report[key]
        if _is_main():
            _save_verify_pairs(out, prepared.eval[: targs.verify_pairs], chosen, rejected)

    from .distributed import save_adapter

    save_adapter(trainer, out)  # a plain PEFT adapter dir, also under FSDP (sharded state dicts save nothing)
    if _is_main():
        tokenizer.save_pretrained(str(out))
        (out / "metrics.json").write_text(json.dumps(_finite(metrics), indent=2, sort_keys=True) + "\n")
        logger.info("saved adapter, score head, tokenizer and reports to %s", out)
        if "eval_accuracy" in metrics:
            print(
                f"held-out accuracy: {metrics['eval_accuracy']:.3f} on {metrics['eval_pairs']} pairs "
                f"(mean margin {metrics['eval_mean_margin']:.3f}); training took {train_seconds:.0f}s",
                flush=True,
            )
    return metrics


def _resume_arg(targs: TrainingArguments) -> Any:
    """The checkpoint `resume` names (auto: the newest complete one in output_dir, damaged ones skipped with a
    reason; never: None), refused with a RecipeError when it was trained with a recipe or data that differ."""
    from .reliability import resume_checkpoint

    # build_trainer decided before writing anything; only a caller that skipped it decides here.
    path = targs.qrm_resume_from if hasattr(targs, "qrm_resume_from") else resume_checkpoint(targs)
    if path is not None and _is_main() and not logger.isEnabledFor(logging.INFO):
        # reliability logs this at INFO, which the Trainer's default (passive) log level hides; say it once anyway.
        print(f"[qrm] resuming from {path}", flush=True)
    return path


def _finite(d: Any) -> Any:
    # JSON has no NaN; write null and keep the key, never a silent 0.0. Nested dicts and lists too.
    if isinstance(d, dict):
        return {k: _finite(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_finite(v) for v in d]
    return None if isinstance(d, float) and not math.isfinite(d) else d


def _save_verify_pairs(out: Path, rows: list[dict], chosen: list[float], rejected: list[float]) -> None:
    """Held-out pairs and the trained model's rewards for them: exports are checked against these."""
    with open(out / "verify_pairs.jsonl", "w") as f:
        for row, c, r in zip(rows, chosen, rejected, strict=False):
            rec = {k: row[k] for k in ("prompt", "chosen", "rejected")}
            rec.update(chosen_reward=c, rejected_reward=r)
            f.write(json.dumps(rec) + "\n")


def _eval_report(out: Path | None, rows: list[dict], chosen: list[float], rejected: list[float]) -> dict[str, Any]:
    """Pair metrics of the end-of-training evaluation; with `out`, also the report `qrm eval` writes."""
    from .evaluate import pair_metrics, write_report

    clen = [len(r["chosen_ids"]) - r["prompt_len"] for r in rows]
    rlen = [len(r["rejected_ids"]) - r["prompt_len"] for r in rows]
    if out is None:
        return pair_metrics(chosen, rejected, clen, rlen)
    return write_report(out / "eval", chosen, rejected, clen, rlen, title="end-of-training evaluation")


def main(argv: list[str] | None = None) -> int:
    """`qrm train` and `scripts/train.py`: parse the recipe, train, print where the model went.

    Exit codes: 0 trained; 2 recipe or data error (also a refused resume); 3 a NaN/Inf loss or gradient stopped the
    run before the optimizer step (the last good checkpoint is kept); 4 preempted: SIGTERM or SIGUSR1 saved a
    checkpoint at the next step boundary, and rerunning the same command resumes from it exactly.
    """
    from .config import RecipeError, parse_recipe
    from .data import DataError
    from .reliability import NONFINITE_EXIT, PREEMPTED_EXIT, NonFiniteError, Preempted

    try:
        margs, largs, dargs, targs = parse_recipe(argv)
        train(margs, largs, dargs, targs)
    except Preempted as e:
        print(f"qrm: preempted: {e}", file=sys.stderr)
        return PREEMPTED_EXIT
    except NonFiniteError as e:
        print(f"qrm: error: {e}; the last good checkpoint in the output dir is kept", file=sys.stderr)
        return NONFINITE_EXIT
    except (RecipeError, DataError) as e:
        from .cli import user_error

        return user_error("qrm train", e)
    return 0
