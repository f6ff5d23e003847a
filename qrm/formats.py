"""Which preference format a file's rows are in: detection from a row's fields (`dataset_format: auto`), and the
checks that every row, and the recipe's declared format, agree with it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .config import DataArguments
from .errors import DataError


def format_needs(args: DataArguments) -> str:
    """What columns each format needs, with this recipe's column names."""
    a = args
    return (
        f"explicit needs {a.prompt_column!r}, {a.chosen_column!r}, {a.rejected_column!r} (strings); "
        f"implicit needs {a.chosen_column!r} and {a.rejected_column!r} (full texts sharing the prompt); "
        f"conversational needs {a.chosen_column!r} and {a.rejected_column!r} as message lists; "
        f"sharegpt needs {a.conversations_column!r}, {a.chosen_column!r}, {a.rejected_column!r}; "
        f"ratings needs {a.prompt_column!r} (or 'question'), {a.response_column!r}, {a.score_column!r}; "
        f"graded needs {a.completion_a_column!r}, {a.completion_b_column!r}, {a.preference_column or 'preference'!r}"
    )


def detect_format(
    columns: Sequence[str], first: dict[str, Any], args: DataArguments, where: str | None = None
) -> tuple[str, str]:
    """Guess the format from column names and the first row; returns (format, explanation)."""
    cols = set(columns)
    if args.conversations_column in cols and args.chosen_column in cols:
        return "sharegpt", f"columns {args.conversations_column!r} + {args.chosen_column!r}"
    if {args.completion_a_column, args.completion_b_column} <= cols and (
        args.preference_column or "preference"
    ) in cols:
        return "explicit", "graded preferences over two completions"
    prompt_col = args.prompt_column if args.prompt_column in cols else "question"
    if {args.response_column, args.score_column} <= cols and prompt_col in cols:
        return "ratings", f"columns {prompt_col!r}, {args.response_column!r}, {args.score_column!r}"
    if args.chosen_column in cols and args.rejected_column in cols:
        if isinstance(first.get(args.chosen_column), list):
            return "conversational", "chosen/rejected are message lists"
        if args.prompt_column in cols:
            if isinstance(first.get(args.prompt_column), list):
                return "conversational", "prompt is a message list"
            return (
                "explicit",
                f"string columns {args.prompt_column!r}, {args.chosen_column!r}, {args.rejected_column!r}",
            )
        return "implicit", "chosen/rejected are full texts with a shared prompt"
    raise DataError(
        f"{where or 'data'}: cannot detect the preference format from columns {sorted(cols)}: {format_needs(args)}; "
        "set dataset_format and the *_column fields"
    )


def present_fields(row: dict[str, Any]) -> list[str]:
    """The row's fields that hold a value: a JSONL file read as one table gives every row every key of the file,
    null where the row had none."""
    return [k for k, v in row.items() if v is not None]


def check_rows_share_format(rows: list[dict[str, Any]], fmt: str, why: str, args: DataArguments, where: str) -> None:
    """With `dataset_format: auto`, a later row whose own fields make it another format (a stray `prompt` in
    implicit data, say) is named, instead of being read by row 1's format."""
    first = set(present_fields(rows[0]))
    for i, row in enumerate(rows[1:], start=2):
        extra = sorted(set(present_fields(row)) - first)
        if not extra:
            continue
        try:
            seen, its_why = detect_format(present_fields(row), row, args, where)
        except DataError:
            continue  # nothing recognisable: the format's own field checks name what is wrong
        if seen != fmt:
            raise DataError(
                f"{where}: row {i}: field(s) {extra} make it {seen!r} data ({its_why}) but row 1 is {fmt!r} ({why}); "
                "every row of a file must have one format: remove the field(s), or set dataset_format"
            )


def check_declared_format(fmt: str, first: dict[str, Any], args: DataArguments, where: str) -> None:
    """Data in another format than the recipe's `dataset_format` is refused before any row is half-read."""
    try:
        seen, why = detect_format(present_fields(first), first, args, where)
    except DataError:
        return  # nothing recognisable: the declared format's own field checks name what is missing
    graded = {args.completion_a_column, args.completion_b_column} <= set(first)
    if seen == fmt or (fmt == "conversational" and seen == "sharegpt") or (fmt == "explicit" and graded):
        return
    raise DataError(
        f"{where}: dataset_format is {fmt!r} but row 1 looks like {seen!r} data ({why}); "
        f"set dataset_format: {seen} (or auto), or fix the *_column fields"
    )
