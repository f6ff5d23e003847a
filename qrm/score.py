"""`qrm score`: rewards for every row of a file (`score_file`), one JSON line per row, with an adapter dir or an
export; the scoring itself is `qrm.reward_model`'s."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import DataError, FlagError, UserError
from .reward_model import RewardModel, score_fitting, score_pair_rows, tokenize_fitting, tokenize_responses

SCORE_FORMATS = ("auto", "responses", "explicit", "implicit", "conversational", "sharegpt", "ratings")


def score_file(
    model: str | Path,
    data: str | Path,
    out: str | Path | None = None,
    batch_size: int = 16,
    prompt_column: str = "prompt",
    response_column: str = "response",
    dataset_format: str = "auto",
    chosen_column: str = "chosen",
    rejected_column: str = "rejected",
    max_length: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score every row of `data` with `model` and write one JSON line per row (`qrm score`).

    Args:
        model (`str` or `Path`): an export (`qrm merge`) or adapter dir (`qrm train`).
        data (`str` or `Path`): a jsonl/json/csv/parquet file.
        out (`str` or `Path`, *optional*, defaults to `None`): the JSONL file to write; stdout when None.
        batch_size (`int`, *optional*, defaults to `16`): sequences per forward pass.
        prompt_column (`str`, *optional*, defaults to `"prompt"`): prompt column of rows scored one by one.
        response_column (`str`, *optional*, defaults to `"response"`): response column of rows scored one by one.
        dataset_format (`str`, *optional*, defaults to `"auto"`): `auto`, `responses`, or a pair format of
            `qrm.data`; rows without the prompt and response columns are read as preference pairs.
        chosen_column (`str`, *optional*, defaults to `"chosen"`): preferred response of a pair.
        rejected_column (`str`, *optional*, defaults to `"rejected"`): dispreferred response of a pair.
        max_length (`int`, *optional*, defaults to `None`): defaults to the training recipe's.
        progress (`bool`, *optional*, defaults to `True`): show a progress bar.

    Returns:
        `dict`: `rows`, `scored`, `skipped`, `mode` (`responses` or `pairs`) and `out`. Rows are numbered from 1 as
        in qrm's data errors: a response row gets {"row", "reward"}, a pair {"row", "chosen_reward",
        "rejected_reward", "margin"}; a row that could not be scored gets "skipped" with the reason."""
    from .config import DataArguments
    from .data import load_rows

    ds, where = load_rows(str(data))
    rows = list(ds)
    if not rows:
        raise DataError(f"{where}: the file holds no rows")
    dargs = DataArguments(
        dataset=str(data),
        dataset_format=dataset_format,
        prompt_column=prompt_column,
        chosen_column=chosen_column,
        rejected_column=rejected_column,
    )
    mode, prompt_column, response_column = _score_mode(rows, dargs, where, response_column)
    rm = RewardModel.from_pretrained(model, max_length=max_length)
    if mode == "responses":
        lines = _score_responses(rm, rows, where, (prompt_column, response_column), batch_size, progress)
    else:
        lines = _score_pairs(rm, rows, dargs, where, batch_size, progress)
    text = "".join(json.dumps(line) + "\n" for line in lines)
    if out is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    skipped = sum(1 for line in lines if "skipped" in line)
    return {"rows": len(rows), "scored": len(rows) - skipped, "skipped": skipped, "mode": mode, "out": out}


def _score_mode(rows: list[dict], dargs: Any, where: str, response_column: str) -> tuple[str, str, str]:
    """("responses" or "pairs", prompt column, response column): rows with both columns are responses, a ratings
    file is scored answer by answer, anything else is read as preference pairs."""
    from .data import detect_format

    fmt, prompt_column, columns = dargs.dataset_format, dargs.prompt_column, set(rows[0])
    if fmt in ("auto", "responses") and {prompt_column, response_column} <= columns:
        return "responses", prompt_column, response_column
    if fmt in ("auto", "ratings"):
        fmt = fmt if fmt != "auto" else detect_format(list(columns), rows[0], dargs, where)[0]
        if fmt == "ratings":  # one answer per row: score each answer rather than best-vs-worst pairs
            return "responses", prompt_column if prompt_column in columns else "question", dargs.response_column
    return "pairs", prompt_column, response_column


def _score_responses(
    rm: RewardModel, rows: list[dict], where: str, columns: tuple[str, str], batch_size: int, progress: bool
) -> list[dict[str, Any]]:

    for i, row in enumerate(rows, start=1):
        for col in columns:
            if not isinstance(row.get(col), str):
                raise DataError(f"{where}: row {i}: field {col!r} must be a string, got {row.get(col)!r}")
    prompts, responses = [row[columns[0]] for row in rows], [row[columns[1]] for row in rows]
    ids = tokenize_responses(rm.tokenizer, prompts, responses, rm.max_length)
    rewards = score_fitting(rm.model, ids, rm.tokenizer.pad_token_id, batch_size, progress)
    skipped = {"reward": None, "skipped": f"response exceeds max_length={rm.max_length}"}
    return [
        {"row": i + 1, "reward": reward} if reward is not None else {"row": i + 1, **skipped}
        for i, reward in enumerate(rewards)
    ]


def _score_pairs(
    rm: RewardModel, rows: list[dict], dargs: Any, where: str, batch_size: int, progress: bool
) -> list[dict[str, Any]]:
    from .data import build_pairs

    pairs, report = build_pairs(rows, dargs, where, rm.tokenizer)
    tok = tokenize_fitting(pairs, rm.tokenizer, rm.max_length, report)
    chosen, rejected = score_pair_rows(rm.model, tok, rm.tokenizer.pad_token_id, batch_size, progress)
    by_row = {r["row"]: (c, rj) for r, c, rj in zip(tok, chosen, rejected, strict=True)}
    paired = {p["row"] for p in pairs}
    lines: list[dict[str, Any]] = []
    for i in range(1, len(rows) + 1):
        if i in by_row:
            c, rj = by_row[i]
            lines.append({"row": i, "chosen_reward": c, "rejected_reward": rj, "margin": c - rj})
        else:
            why = f"response exceeds max_length={rm.max_length}" if i in paired else "not a usable pair"
            lines.append({"row": i, "chosen_reward": None, "rejected_reward": None, "skipped": why})
    return lines


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="qrm score",
        description="Score (prompt, response) rows or preference pairs with an export or adapter dir; JSONL out.",
    )
    ap.add_argument("--model", required=True, help="Export dir (qrm merge) or adapter dir (qrm train).")
    ap.add_argument("--data", required=True, help="jsonl/json/csv/parquet file.")
    ap.add_argument("--out", default=None, help="Output JSONL (default: stdout).")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--prompt-column", default="prompt")
    ap.add_argument(
        "--response-column", default="response", help="Rows with prompt and response columns are scored one by one."
    )
    ap.add_argument("--chosen-column", default="chosen")
    ap.add_argument("--rejected-column", default="rejected")
    ap.add_argument(
        "--format",
        default="auto",
        help="auto, responses, or a pair format of qrm.data (explicit, implicit, conversational, sharegpt, ratings).",
    )
    ap.add_argument("--max-length", type=int, default=None, help="Default: the training recipe's max_length.")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--force", action="store_true", help="Replace an existing --out file.")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """`qrm score`: write one JSON line of rewards per input row; returns the exit status (2 on bad input)."""
    args = _parser().parse_args(argv)
    from .cli import check_flags, check_model_dir, check_out_path, user_error

    try:
        check_flags("qrm score", batch_size=args.batch_size, max_length=args.max_length)
        if args.format not in SCORE_FORMATS:
            raise FlagError(f"--format {args.format}: expected one of {', '.join(SCORE_FORMATS)}")
        check_model_dir("--model", args.model)
        check_out_path("--out", args.out, {"--data": args.data, "--model": args.model})
        if args.out and Path(args.out).is_dir():
            raise FlagError(f"--out {args.out}: is a directory; give the path of the JSONL file to write")
        if args.out and Path(args.out).exists() and not args.force:
            raise FlagError(f"--out {args.out}: exists; pass --force to replace it")
        same = ("out", "batch_size", "prompt_column", "response_column", "chosen_column", "rejected_column")
        kwargs = {k: getattr(args, k) for k in (*same, "max_length")}
        summary = score_file(args.model, args.data, dataset_format=args.format, progress=not args.no_progress, **kwargs)
    except (UserError, FileNotFoundError) as e:
        return user_error("qrm score", e)
    print(
        f"scored {summary['scored']} of {summary['rows']} rows ({summary['mode']})"
        + (f", {summary['skipped']} skipped" if summary["skipped"] else "")
        + (f" -> {summary['out']}" if summary["out"] else ""),
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
