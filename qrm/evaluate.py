"""`qrm eval`: score pairs, the bundled probes and/or a RewardBench file with an adapter dir or an export, and write
the report; the numbers come from `qrm.metrics`, the files from `qrm.report`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import DataError, FlagError, UserError
from .files import LENGTH_HEAD_FILE, METRICS_FILE
from .metrics import load_probes, pair_metrics, probe_metrics

# What ODIN's per-head evaluation reports of each head (quality, length, their sum).
HEAD_KEYS = ("accuracy", "length_reward_spearman", "accuracy_when_chosen_shorter", "accuracy_when_chosen_longer")


def evaluate_model(
    model_dir: str | Path,
    data: str | None,
    out_dir: str | Path,
    probes: bool = False,
    data_args: Any = None,
    subset_column: str | None = None,
    batch_size: int = 16,
    rewardbench: str | None = None,
) -> dict[str, Any]:
    """Score `data` (any format the trainer reads), the bundled probes and/or a RewardBench file with an adapter
    dir or an export, and write metrics.json, report.md and the plots into `out_dir`. An adapter trained with
    `length_debias: odin` also gets its two heads reported (`heads`)."""
    from .config import DataArguments
    from .data import build_pairs, load_rows, tokenize_pairs
    from .report import write_report, write_rewardbench_report
    from .reward_model import RewardModel, score_pair_rows

    rm = RewardModel.from_pretrained(model_dir)
    pad = rm.tokenizer.pad_token_id
    extra: dict[str, Any] = {"model": str(model_dir)}
    if probes:
        results = {}
        for name, rows in load_probes().items():
            from .data import DataReport

            tok = tokenize_pairs(rows, rm.tokenizer, rm.max_length, DataReport(source=name))
            results[name] = score_pair_rows(rm.model, tok, pad, batch_size)
        extra["probes"] = probe_metrics(results)
    rb = None
    if rewardbench:
        from .rewardbench import evaluate_rewardbench

        rb, rb_rows = evaluate_rewardbench(rm, rewardbench, batch_size)
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(out_dir) / "rewardbench_rewards.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rb_rows)
    if data is None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if probes:
            (out / "probes.json").write_text(json.dumps(extra["probes"], indent=2) + "\n")
        if rb is not None:
            return write_rewardbench_report(out, rb, extra, rewardbench)
        return extra
    dargs = data_args or DataArguments(dataset=data)
    rows, where = load_rows(data, dargs.dataset_split)
    pairs, report = build_pairs(rows, dargs, where, rm.tokenizer)
    tok = tokenize_pairs(pairs, rm.tokenizer, rm.max_length, report)
    chosen, rejected = score_pair_rows(rm.model, tok, pad, batch_size)
    clen = [len(r["chosen_ids"]) - r["prompt_len"] for r in tok]
    rlen = [len(r["rejected_ids"]) - r["prompt_len"] for r in tok]
    subsets = None
    if subset_column:
        if subset_column not in rows.column_names:
            raise DataError(f"{where}: no column {subset_column!r} for per-subset numbers")
        subsets = [str(rows[r["row"] - 1][subset_column]) for r in tok]
    extra["data"] = report.as_dict()
    heads = None
    if (Path(model_dir) / LENGTH_HEAD_FILE).is_file():
        heads = eval_heads(rm, model_dir, tok, (chosen, rejected), batch_size)
    metrics = write_report(
        out_dir, chosen, rejected, clen, rlen, subsets, f"qrm eval: {where}", extra, heads=heads, rewardbench=rb
    )
    with open(Path(out_dir) / "rewards.jsonl", "w") as f:
        for r, c, j in zip(tok, chosen, rejected, strict=True):
            f.write(json.dumps({"row": r["row"], "chosen_reward": c, "rejected_reward": j}) + "\n")
    return metrics


def eval_heads(
    rm: Any,
    folder: str | os.PathLike,
    rows: list[dict],
    quality: tuple[list[float], list[float]],
    batch_size: int = 16,
) -> dict[str, dict[str, Any]]:
    """Accuracy and length bias of the quality head, the length head and their sum (what ODIN trained with).

    Args:
        rm (`qrm.RewardModel`): the adapter model, scoring with its quality head.
        folder (`str` or `os.PathLike`): the adapter dir holding `length_head.safetensors`.
        rows (`list[dict]`): tokenized pair rows (`chosen_ids`, `rejected_ids`, `prompt_len`).
        quality (`tuple`): (chosen, rejected) quality-head rewards of `rows`, already computed.
        batch_size (`int`, *optional*, defaults to `16`): scoring batch size.
    """
    from .odin import length_reward, load_length_head
    from .reward_model import score_pair_rows

    load_length_head(rm.model, folder)
    with length_reward(rm.model):
        length = score_pair_rows(rm.model, rows, rm.tokenizer.pad_token_id, batch_size)
    clen = [len(r["chosen_ids"]) - r["prompt_len"] for r in rows]
    rlen = [len(r["rejected_ids"]) - r["prompt_len"] for r in rows]
    summed = tuple([q + x for q, x in zip(qs, ls, strict=True)] for qs, ls in zip(quality, length, strict=True))
    out = {}
    for name, (c, r) in {"quality": quality, "length": length, "sum": summed}.items():
        m = pair_metrics(c, r, clen, rlen)
        out[name] = {k: m[k] for k in HEAD_KEYS}
    return out


def _check_eval_flags(a: Any, out: Path) -> None:
    """Every `qrm eval` flag and input file, before the model loads; raises `FlagError` or `DataError`."""
    from .cli import check_flags, check_model_dir, check_out_path
    from .config import DATASET_FORMATS

    check_flags("qrm eval", batch_size=a.batch_size)
    if a.dataset_format not in DATASET_FORMATS:
        raise FlagError(f"--dataset-format {a.dataset_format}: expected one of {', '.join(DATASET_FORMATS)}")
    check_model_dir("--model", a.model)
    check_out_path("--out", str(out), {"--data": a.data})
    if Path(a.model).resolve() == out.resolve():
        raise FlagError(f"--out {out} is the --model dir; reports go in a directory of their own")
    if out.exists() and not out.is_dir():
        raise FlagError(f"--out {out}: is a file; give a directory for the report")
    if (out / METRICS_FILE).exists() and not a.force:
        raise FlagError(f"--out {out} already holds a report; pass --force to overwrite it")
    if a.data:
        from .data import load_rows

        load_rows(a.data)  # a missing, empty or unreadable file fails here, before the model loads
    if a.rewardbench:
        from .rewardbench import load_rewardbench

        load_rewardbench(a.rewardbench)  # a bad row fails here, naming it, before the model loads


def main(argv: list[str] | None = None) -> int:
    """`qrm eval --model DIR --data FILE [--out DIR] [--probes]`."""
    import argparse

    p = argparse.ArgumentParser(prog="qrm eval", description="Accuracy, calibration, length bias and probes.")
    p.add_argument("--model", required=True, help="adapter dir from qrm train, or an export from qrm merge")
    p.add_argument("--data", help="pairs in any format qrm train reads")
    p.add_argument("--out", help="output dir (default: <model>/eval-<data name>)")
    p.add_argument("--probes", action="store_true", help="also run the bundled probe sets")
    p.add_argument(
        "--rewardbench",
        metavar="FILE",
        help="a local file in RewardBench layout (prompt, chosen, rejected, subset; rejected may be a list): "
        "per-subset accuracy, Chat/Chat Hard/Safety/Reasoning scores and their mean",
    )
    p.add_argument("--dataset-format", default="auto")
    p.add_argument("--prompt-column", default="prompt")
    p.add_argument("--chosen-column", default="chosen")
    p.add_argument("--rejected-column", default="rejected")
    p.add_argument("--subset-column", help="column with a subset/category name, for per-subset numbers")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--force", action="store_true", help="overwrite an existing report in --out")
    a = p.parse_args(argv)
    if not a.data and not a.probes and not a.rewardbench:
        p.error("give --data, --probes, --rewardbench, or several")
    from .cli import user_error
    from .config import DataArguments

    name = Path(a.data or a.rewardbench or "probes").name.split(".")[0]
    out = Path(a.out) if a.out else Path(a.model) / f"eval-{name}"
    try:
        _check_eval_flags(a, out)
    except (FlagError, DataError) as e:
        return user_error("qrm eval", e)
    dargs = None
    if a.data:
        dargs = DataArguments(
            dataset=a.data,
            dataset_format=a.dataset_format,
            prompt_column=a.prompt_column,
            chosen_column=a.chosen_column,
            rejected_column=a.rejected_column,
        )
    try:
        m = evaluate_model(a.model, a.data, out, a.probes, dargs, a.subset_column, a.batch_size, a.rewardbench)
    except (UserError, FileNotFoundError) as e:
        return user_error("qrm eval", e)
    if "accuracy" in m:
        lo, hi = m["accuracy_ci95"]
        print(f"accuracy {m['accuracy']:.3f} (95% CI {lo:.3f}-{hi:.3f}) on {m['n_pairs']} pairs; ECE {m['ece']:.3f}")
        for w in m.get("warnings", []):
            print(f"warning: {w}")
    for probe, v in (m.get("extra", m).get("probes") or {}).items():
        print(f"probe {probe}: accuracy {v['accuracy']:.3f} on {v['n']} pairs")
    if m.get("rewardbench"):
        rb = m["rewardbench"]
        parts = [
            f"{k} {100 * v['score']:.1f}" if v["score"] is not None else f"{k} partial"
            for k, v in rb["sections"].items()
        ]
        score = "n/a" if rb["score"] is None else f"{100 * rb['score']:.1f}"
        print(f"RewardBench score {score} ({', '.join(parts) or 'no known subset'})")
        if rb.get("fit"):
            f = rb["fit"]
            print(
                f"RewardBench: every pair fitted to {f['max_length']} tokens: {f['rows_prompt_cut']} rows with the "
                f"prompt cut from the left, {f['rows_response_cut']} with a response cut to its last tokens"
            )
    print(f"report: {out}")
    return 0
