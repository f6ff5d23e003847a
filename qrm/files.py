"""The names of the files qrm writes and reads, and what kind of directory holds them: the one owner of that
knowledge. Every module that opens one of these files takes its name from here. Also the environment switch that
says whether a name may be looked up on the Hub at all (offline mode)."""

from __future__ import annotations

import os
from pathlib import Path

# Written by `qrm train` (output_dir and every checkpoint) and copied into exports.
RECIPE_FILE = "qrm_recipe.yaml"  # the resolved recipe, re-runnable with `qrm train --recipe`
VERSIONS_FILE = "qrm_versions.json"  # library versions, qrm's commit, the training data's fingerprint
PROVENANCE_FILES = (RECIPE_FILE, VERSIONS_FILE)
METRICS_FILE = "metrics.json"  # end-of-training metrics (train) / evaluation metrics (eval)
DATA_REPORT_FILE = "data_report.json"  # rows read, kept, dropped (and why) per data file
VERIFY_PAIRS_FILE = "verify_pairs.jsonl"  # held-out pairs with the trained model's rewards: exports are checked on them
LENGTH_HEAD_FILE = "length_head.safetensors"  # ODIN's length head, beside the adapter (never in an export)
LENGTH_ERASE_FILE = "length_erase.json"  # length_debias: erase: the head edit's figures (copied into exports)
REPORT_FILE = "report.md"  # qrm eval's human-readable report
CARD_FILE = "README.md"  # model card (export and Hub)

# Written by `qrm merge` into an export.
EXPORT_INFO_FILE = "qrm_export.json"  # what `qrm merge` did (kind, method, dtype, tokenizer change, load recipe)
VERIFICATION_FILE = "verification.json"  # the fresh-process verification figures of an export

# PEFT's adapter files, transformers' model files.
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_WEIGHTS, ADAPTER_CONFIG)
MODEL_CONFIG = "config.json"


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """Whether `path` is a PEFT adapter dir (what `qrm train` writes): it holds `adapter_config.json`."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def is_export_dir(path: str | os.PathLike) -> bool:
    """Whether `path` is a standalone transformers model (what `qrm merge` writes): `config.json`, no adapter."""
    return (Path(path) / MODEL_CONFIG).is_file() and not is_adapter_dir(path)


def dir_kind(path: str | os.PathLike) -> str | None:
    """ "adapter", "export", or None when `path` holds neither an `adapter_config.json` nor a `config.json`."""
    if is_adapter_dir(path):
        return "adapter"
    if is_export_dir(path):
        return "export"
    return None


# Hub offline mode: a model id or dataset id that is not local cannot be fetched. huggingface_hub turns it on for
# either variable (huggingface_hub/constants.py reads both).
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def offline_variable() -> str | None:
    """The environment variable that puts huggingface_hub in offline mode (`NAME=value`), or None when online."""
    # Same precedence as huggingface_hub: a non-empty HF_HUB_OFFLINE decides, even "0"; else TRANSFORMERS_OFFLINE.
    name = next((n for n in OFFLINE_VARIABLES if os.environ.get(n)), None)
    if name is None or os.environ[name].strip().upper() not in ("1", "ON", "YES", "TRUE"):
        return None
    return f"{name}={os.environ[name]}"
