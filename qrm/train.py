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


def _sharded(targs: TrainingArguments) -> bool:
    """FSDP or DeepSpeed ZeRO-3: parameters are sharded, so every one must share the 4-bit storage dtype."""
    from .distributed import detect_launch

    return detect_launch(targs).sharding is not None


def _trainer_class() -> type:
    from trl import RewardTrainer

    from .reliability import ReliabilityMixin

    class QrmRewardTrainer(ReliabilityMixin, RewardTrainer):
        """TRL's RewardTrainer with atomic checkpoints, a non-finite guard, no token in pickles, and the `length`
        column kept for length-grouped sampling."""

        def _set_signature_columns_if_needed(self) -> None:
            super()._set_signature_columns_if_needed()
            if "length" not in self._signature_columns:
                # TRL's collator ignores keys it does not know, so the extra column is harmless there.
                self._signature_columns = [*self._signature_columns, "length"]

    return QrmRewardTrainer


def build_trainer(
    margs: ModelArguments, largs: LoraArguments, dargs: DataArguments, targs: TrainingArguments
) -> tuple[Any, Any]:
    """Check the data, load the 4-bit model with LoRA, write provenance; returns (trainer, prepared data)."""
    from transformers import set_seed

    from . import data as qdata
    from .model import count_parameters, load_model, load_tokenizer

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
    from .distributed import check_launch

    fsdp = _sharded(targs)
    check_launch(margs, targs)
    # transformers 5 renamed gradient_checkpointing to activation_checkpointing and keeps the old name as an alias.
    checkpointing = bool(targs.gradient_checkpointing or getattr(targs, "activation_checkpointing", False))

    # Everything that can be wrong with the data fails here, before any weight is read.
    tokenizer = load_tokenizer(margs, trust_remote_code=targs.trust_remote_code)
    prepared = qdata.prepare(dargs, tokenizer, targs.max_length)
    if _is_main():
        print(prepared.summary(), flush=True)

    out = Path(targs.output_dir)
    resolved = to_dict(margs, largs, dargs, targs)
    if _is_main():
        write_provenance(out, resolved, extra={"data": [r.as_dict() for r in prepared.reports]})
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


def train(
    margs: ModelArguments, largs: LoraArguments, dargs: DataArguments, targs: TrainingArguments
) -> dict[str, Any]:
    """Train a reward model as the recipe says and write everything into `targs.output_dir`; returns metrics."""
    from .model import count_parameters
    from .score import score_pair_rows

    trainer, prepared = build_trainer(margs, largs, dargs, targs)
    tokenizer = trainer.processing_class
    out = Path(targs.output_dir)
    train_ds, eval_ds = trainer.train_dataset, trainer.eval_dataset
    counts = count_parameters(trainer.model)
    t0 = time.time()
    result = trainer.train(resume_from_checkpoint=_resume_arg(targs))
    train_seconds = time.time() - t0

    metrics: dict[str, Any] = {
        "train_loss": result.training_loss,
        "train_runtime_s": round(train_seconds, 2),
        "train_pairs": len(train_ds),
        "global_step": result.global_step,
        "parameters": counts,
    }
    if eval_ds is not None:
        # One scoring pass gives everything (trainer.evaluate() would run the same forward a second time).
        chosen, rejected = score_pair_rows(
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
    """An explicit checkpoint, else the newest complete one in output_dir (damaged ones skipped, with a reason)."""
    from .reliability import last_good_checkpoint

    if targs.resume_from_checkpoint:
        return targs.resume_from_checkpoint
    if not os.path.isdir(targs.output_dir):
        return None
    last = last_good_checkpoint(targs.output_dir, require_optimizer=not targs.save_only_model)
    if last:
        logger.info("resuming from %s", last)
    return last


def _finite(d: dict[str, Any]) -> dict[str, Any]:
    # JSON has no NaN; write null and keep the key, never a silent 0.0.
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


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
    """`qrm train` and `scripts/train.py`: parse the recipe, train, print where the model went."""
    from .config import RecipeError, parse_recipe
    from .data import DataError
    from .reliability import NonFiniteError

    try:
        margs, largs, dargs, targs = parse_recipe(argv)
        train(margs, largs, dargs, targs)
    except NonFiniteError as e:
        print(f"qrm: error: {e}; the last good checkpoint in the output dir is kept", file=sys.stderr)
        return 3
    except (RecipeError, DataError) as e:
        print(f"qrm: error: {e}", file=sys.stderr)
        return 2
    return 0
