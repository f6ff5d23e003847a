"""Reading preference-data files: local jsonl/json/csv/tsv/parquet (optionally gzipped) or a Hub dataset, with every
way a file can be unreadable (empty, truncated gzip, not UTF-8, ragged CSV, invalid JSON) named by file and line or
row (1-based), before `datasets` sees it or in place of its own messages."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from .errors import DataError

LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".tsv": "csv"}


def load_rows(source: str, split: str = "train") -> tuple[Any, str]:
    """Load a local file (jsonl/json/csv/parquet, optionally .gz) or a hub dataset id with `datasets`."""
    import datasets

    path = Path(source)
    if path.is_dir():
        raise DataError(f"{source}: is a directory; expected a .jsonl, .json, .csv, .tsv or .parquet file")
    if path.exists():
        suffixes = [s for s in path.suffixes if s != ".gz"]
        kind = LOCAL_SUFFIXES.get(suffixes[-1] if suffixes else "")
        if kind is None:
            raise DataError(f"{source}: unsupported file type; use .jsonl, .json, .csv, .tsv or .parquet")
        if kind != "parquet":  # binary, checked by its reader
            check_text_file(path, csv=kind == "csv")
        elif path.stat().st_size == 0:
            raise DataError(f"{source}: the file is empty")
        kwargs = {"delimiter": "\t"} if suffixes[-1] == ".tsv" else {}
        from datasets.utils import logging as ds_logging

        level = ds_logging.get_verbosity()
        # The loader logs "Failed to load JSON ... in row N" counting rows from 0; qrm names the row itself, from 1.
        ds_logging.set_verbosity(ds_logging.CRITICAL)
        try:
            ds = datasets.load_dataset(kind, data_files=str(path), split="train", **kwargs)
        except Exception as e:  # arrow type errors are cryptic: find the row ourselves when we can
            if kind == "json":
                _diagnose_json(path)
            if kind == "csv":
                _diagnose_csv(path, **kwargs)
            raise DataError(f"{source}: could not be read as {kind}: {type(e).__name__}: {e}") from None
        finally:
            ds_logging.set_verbosity(level)
        return ds, str(path)
    from .files import offline_variable

    if HUB_DATASET_ID.match(source) and not source.startswith((".", "/", "~")):
        if offline := offline_variable():
            raise DataError(
                f"{source}: no such local file, and {offline} is set, so it is not fetched as a hub dataset"
            )
        try:
            return datasets.load_dataset(source, split=split), f"{source}[{split}]"
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise DataError(
                f"{source}: no such local file, and not loadable as a hub dataset (split {split!r}): "
                f"{type(e).__name__}: {first}"
            ) from None
    raise DataError(f"{source}: no such file")


# owner/name: what `datasets` would try on the Hub for a path that does not exist here.
HUB_DATASET_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_text_file(path: Path, csv: bool = False) -> None:
    """Fail on an empty file, a truncated or corrupt gzip, or bytes that are not UTF-8, naming the line."""
    import gzip
    import zlib

    gz = path.suffix == ".gz"
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    opener = gzip.open if gz else open
    line_no, blank = 0, True
    try:
        with opener(path, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                blank = blank and not raw.strip()
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    row = f" (row {line_no - 1} after the header)" if csv and line_no > 1 else ""
                    raise DataError(
                        f"{path}: line {line_no}{row}: not valid UTF-8 (byte {e.start + 1} of the line: "
                        f"{raw[e.start : e.start + 1]!r}); re-save the file as UTF-8"
                    ) from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{path}: truncated or corrupt gzip after line {line_no}: {e}") from None
    if blank:
        raise DataError(f"{path}: the file is empty{' (only blank lines)' if line_no else ''}")


def _diagnose_csv(path: Path, delimiter: str = ",") -> None:
    """Re-read a CSV file with the csv module to name the row (1-based, after the header) that has too many fields."""
    import csv
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, None)
        if not header:
            raise DataError(f"{path}: no header row")
        for i, fields_ in enumerate(reader, start=1):
            if fields_ and len(fields_) != len(header):
                raise DataError(
                    f"{path}: row {i} (line {reader.line_num}): {len(fields_)} fields, the header has {len(header)}"
                )


def _diagnose_json(path: Path) -> None:
    """Re-read a JSON/JSONL file line by line to name the row that broke arrow's type inference."""
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        text = f.read()
    try:
        rows = json.loads(text)
        if not isinstance(rows, list):
            raise DataError(f"{path}: a .json file must hold a list of objects (or use .jsonl)")
    except json.JSONDecodeError:
        rows = []
        for i, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: row {i}: invalid JSON ({e.msg})") from None
    types: dict[str, tuple[str, int]] = {}
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {i}: expected a JSON object, got {type(row).__name__}")
        for k, v in row.items():
            t = type(v).__name__
            if v is None:
                continue
            if k in types and types[k][0] != t:
                raise DataError(f"{path}: row {i}: field {k!r} is {t} but row {types[k][1]} has {types[k][0]}")
            types.setdefault(k, (t, i))
