"""Training, orchestrated: recipe -> checks and data -> resume decision -> provenance -> 4-bit model with LoRA ->
qrm's RewardTrainer (qrm/trainer.py) -> adapter, head, reports."""

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
from .errors import DataError, NonFiniteError, Preempted, RecipeError
from .files import DATA_REPORT_FILE, METRICS_FILE, VERIFY_PAIRS_FILE

logger = logging.getLogger("qrm")


class _Stdout(logging.StreamHandler):
    # The current sys.stdout at every line (a captured or redirected stdout included), never one saved at setup.
    @property
    def stream(self) -> Any:
        return sys.stdout

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def _console(targs: TrainingArguments) -> None:
    """qrm's own facts (attention, packing, resume point, data report, outputs) as `[qrm] ...` lines on stdout of the
    main process by default: the Trainer's default log level (passive) would leave them at warning. An explicit
    `log_level` still rules; other processes follow `log_level_replica`."""
    level = targs.get_process_log_level()
    if _is_main() and targs.log_level == "passive":
        level = logging.INFO
    logger.setLevel(level)
    if not any(isinstance(h, _Stdout) for h in logger.handlers):
        handler = _Stdout()
        handler.setFormatter(logging.Formatter("[qrm] %(message)s"))
        logger.addHandler(handler)


def _is_main() -> bool:
    return int(os.environ.get("RANK", 0)) == 0


def build_trainer(
    margs: ModelArguments, largs: LoraArguments, dargs: DataArguments, targs: TrainingArguments
) -> tuple[Any, Any]:
    """Check the recipe and data, decide resume, write provenance, load the 4-bit model with LoRA; build qrm's trainer.

    Args:
        margs (`ModelArguments`): backbone, 4-bit and attention settings.
        largs (`LoraArguments`): LoRA settings.
        dargs (`DataArguments`): training and eval data.
        targs (`TrainingArguments`): TRL's RewardConfig plus qrm's switches; precision, checkpointing and the
            decided resume checkpoint (`qrm_resume_from`) are set on it.

    Returns:
        `tuple`: (`QrmRewardTrainer`, the prepared data with its report).
    """
    from transformers import set_seed

    _console(targs)
    set_seed(targs.seed)
    fsdp = _training_setup(margs, targs)
    # Everything that can be wrong with the recipe, the paths and the data fails here, before any weight is read
    # and before anything is written.
    tokenizer, prepared = _check_inputs(margs, largs, dargs, targs)
    _decide_then_record(margs, largs, dargs, targs, prepared)
    model = _load(margs, largs, targs, tokenizer, fsdp)
    return _make_trainer(margs, targs, model, tokenizer, prepared), prepared


def _training_setup(margs: ModelArguments, targs: TrainingArguments) -> bool:
    """Precision, launch and checkpointing rules; returns whether parameters are sharded (FSDP)."""
    from . import odin
    from .distributed import check_launch, effective_launch
    from .model import resolve_precision

    note = resolve_precision(margs, targs)  # bf16/fp16 and mixed_precision (what accelerate autocasts) together
    if note:
        logger.info(note)
    launch = effective_launch(targs)  # an FSDP config on CPU-only processes runs as DDP (warned once, unsharded)
    check_launch(margs, targs, launch)
    sharded = launch.sharding is not None
    odin.resolve(targs, sharded)  # length_debias: checked (and ODIN's sampler chosen) before anything is recorded
    return sharded


def _check_inputs(
    margs: ModelArguments, largs: LoraArguments, dargs: DataArguments, targs: TrainingArguments
) -> tuple[Any, Any]:
    """Model source, output dir, LoRA targets, tokenizer and data, checked before anything is loaded or written."""
    from . import data as qdata
    from .preflight import check_lora_targets, check_model_source, check_output_dir, load_tokenizer_or_explain

    sources = getattr(targs, "qrm_sources", None)
    local_model = check_model_source(margs, sources)
    inputs = {"dataset": dargs.dataset, "eval_dataset": dargs.eval_dataset, "model_name_or_path": local_model}
    check_output_dir(targs.output_dir, inputs, sources)
    if local_model is not None:
        check_lora_targets(local_model, largs, sources, trust_remote_code=targs.trust_remote_code)
    tokenizer = load_tokenizer_or_explain(margs, targs, sources)
    prepared = qdata.prepare(dargs, tokenizer, targs.max_length)
    logger.info("%s", prepared.summary())
    return tokenizer, prepared


def _decide_then_record(
    margs: ModelArguments, largs: LoraArguments, dargs: DataArguments, targs: TrainingArguments, prepared: Any
) -> None:
    """Resume, start afresh, replace (old run moved aside) or refuse, decided against this run's recipe and data
    before the first file is written; then the provenance and data report go into output_dir."""
    from .preflight import decide_output_dir

    resolved = to_dict(margs, largs, dargs, targs)
    targs.qrm_resume_from = decide_output_dir(targs, resolved, prepared.train, getattr(targs, "qrm_sources", None))
    if not _is_main():
        return
    out = Path(targs.output_dir)
    reports = [r.as_dict() for r in prepared.reports]
    write_provenance(
        out, resolved, extra={"data": reports}, train_rows=prepared.train, sources=[dargs.dataset, dargs.eval_dataset]
    )
    (out / DATA_REPORT_FILE).write_text(json.dumps(reports, indent=2) + "\n")


def _load(margs: ModelArguments, largs: LoraArguments, targs: TrainingArguments, tokenizer: Any, fsdp: bool) -> Any:
    """The 4-bit model with LoRA (and ODIN's length head), as the trainer will train it."""
    from . import odin
    from .model import count_parameters, load_model

    checkpointing = bool(targs.activation_checkpointing)
    model = load_model(
        margs,
        largs,
        tokenizer,
        gradient_checkpointing=checkpointing,
        fsdp=fsdp,
        trust_remote_code=targs.trust_remote_code,
    )
    odin.setup(model, targs)  # length_debias: odin; before TRL casts and the optimizer sees weights
    if checkpointing and margs.load_in_4bit and not fsdp:
        # prepare_model_for_kbit_training already enabled checkpointing; the Trainer would enable it again with
        # its own kwargs, so leave the switch to the model. TRL reads the old name, the Trainer the new one.
        targs.activation_checkpointing = targs.gradient_checkpointing = False
    counts = count_parameters(model)
    logger.info(
        "model %s: %s trainable / %s parameters, attention=%s, 4-bit=%s",
        margs.model_name_or_path,
        f"{counts['trainable']:,}",
        f"{counts['total']:,}",
        getattr(model.config, "_attn_implementation", "?"),
        margs.load_in_4bit,
    )
    return model


def _make_trainer(margs: ModelArguments, targs: TrainingArguments, model: Any, tokenizer: Any, prepared: Any) -> Any:
    """qrm's RewardTrainer on the prepared pairs, with qrm's collator; trainables in the dtype the recipe needs."""
    from . import data as qdata
    from . import odin
    from .model import cast_trainables, trainable_dtype
    from .trainer import QrmRewardTrainer

    eval_ds = qdata.to_dataset(prepared.eval) if prepared.eval else None
    if eval_ds is None and targs.eval_strategy != "no":
        logger.warning(
            "eval_strategy=%s but no eval data (set eval_dataset or eval_fraction): disabling", targs.eval_strategy
        )
        targs.eval_strategy = "no"
    # The recipe's max_length is recorded and the pairs fitted to it; TRL's own length filter would only re-check
    # them (one dataset pass, one progress bar). `length` and `prompt_len` must reach the sampler and collators.
    targs.max_length, targs.remove_unused_columns = None, False
    trainer = QrmRewardTrainer(
        model=model,
        args=targs,
        train_dataset=qdata.to_dataset(prepared.train),
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        data_collator=odin.with_response_lengths(_collator(model, targs), targs, tokenizer),
    )
    dtype = trainable_dtype(margs)
    if dtype is not None:
        cast_trainables(trainer.model, dtype)  # undo TRL's bf16 cast of LoRA and head; no optimizer exists yet
    return trainer


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
    from .odin import quality_only, restore_length_head
    from .packing import restore_attention

    trainer, prepared = build_trainer(margs, largs, dargs, targs)
    tokenizer = trainer.processing_class
    out = Path(targs.output_dir)
    train_ds, eval_ds = trainer.train_dataset, trainer.eval_dataset
    counts = count_parameters(trainer.model)
    resume = targs.qrm_resume_from  # decided (and logged) by build_trainer before anything was written
    restore_length_head(trainer.model, resume)  # ODIN's head lives outside the adapter the Trainer restores
    t0 = time.time()
    result = trainer.train(resume_from_checkpoint=resume)
    train_seconds = time.time() - t0
    restore_attention(trainer.model)  # the per-pair sdpa kernel is a training-time detail; save and score as sdpa
    quality_only(trainer.model)  # ODIN: reports, verify pairs and exports score the quality head alone
    if targs.length_debias == "erase":  # the head edit, before anything scores the model
        from .erase import erase_length

        pad = tokenizer.pad_token_id
        erase_length(trainer.model, prepared.train, pad, targs.per_device_eval_batch_size, out if _is_main() else None)

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
        write_metrics(out / METRICS_FILE, metrics)
        logger.info("saved adapter, score head, tokenizer and reports to %s", out)
        if "eval_accuracy" in metrics:
            logger.info(
                "held-out accuracy: %.3f on %d pairs (mean margin %.3f); training took %.0fs",
                metrics["eval_accuracy"],
                metrics["eval_pairs"],
                metrics["eval_mean_margin"],
                train_seconds,
            )
    return metrics


def write_metrics(path: str | os.PathLike, metrics: dict[str, Any]) -> None:
    """Write `metrics` as JSON; a NaN or infinite number (nested dicts and lists too) becomes null, never 0.0.

    Args:
        path (`str` or `os.PathLike`): the file to write (`metrics.json`).
        metrics (`dict`): the metrics.
    """

    def finite(d: Any) -> Any:
        if isinstance(d, dict):
            return {k: finite(v) for k, v in d.items()}
        if isinstance(d, (list, tuple)):
            return [finite(v) for v in d]
        return None if isinstance(d, float) and not math.isfinite(d) else d

    Path(path).write_text(json.dumps(finite(metrics), indent=2, sort_keys=True) + "\n")


def _save_verify_pairs(out: Path, rows: list[dict], chosen: list[float], rejected: list[float]) -> None:
    """Held-out pairs and the trained model's rewards for them: exports are checked against these."""
    with open(out / VERIFY_PAIRS_FILE, "w") as f:
        for row, c, r in zip(rows, chosen, rejected, strict=False):
            rec = {k: row[k] for k in ("prompt", "chosen", "rejected")}
            rec.update(chosen_reward=c, rejected_reward=r)
            f.write(json.dumps(rec) + "\n")


def _eval_report(out: Path | None, rows: list[dict], chosen: list[float], rejected: list[float]) -> dict[str, Any]:
    """Pair metrics of the end-of-training evaluation; with `out`, also the report `qrm eval` writes."""
    from .metrics import pair_metrics
    from .report import write_report

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
    from .config import parse_recipe
    from .resume import NONFINITE_EXIT, PREEMPTED_EXIT

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
