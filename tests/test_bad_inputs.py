"""Every bad input to every `qrm` command: one line naming what is wrong, exit 2, no traceback, nothing lost.

One table: (id, command line, expected exit code, words the error line must hold, environment). Each case runs
`qrm.cli.main(argv)` in this process, as the `qrm` console script does. For every case the test checks that

- the exit code is the expected one and stderr holds exactly one `error:` line, with every expected word in it;
- there is no traceback;
- no file of the workspace (inputs, earlier runs, recipes) changed, appeared or disappeared (sha256 before and after),
  so the error came before any output was written, and before any weight was loaded (qrm writes provenance into a
  fresh output_dir right before it loads the backbone; no case's output_dir appears).
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import HH_TRAIN, MINILM, hh_rows, write_jsonl

import qrm.cli
from qrm.source import resolve_path

W = "{W}"  # the workspace directory, filled in per run

BASE_RECIPE = """\
# a small valid recipe; each case breaks one thing
model_name_or_path: {model}
dataset: {W}/pairs.jsonl
output_dir: {W}/out-fresh
max_length: 64
max_steps: 1
per_device_train_batch_size: 2
bnb_4bit_compute_dtype: float32
bf16: false
save_strategy: "no"
report_to: none
"""
BASE = ["train", "--recipe", f"{W}/base.yaml"]


def T(*args: str) -> list[str]:
    """`qrm train` with the base recipe and these overrides."""
    return [*BASE, *args]


def D(data: str, *args: str) -> list[str]:
    """`qrm train` on another training file."""
    return T("--dataset", f"{W}/{data}", *args)


OFFLINE = {"HF_HUB_OFFLINE": "1"}
TRANSFORMERS_ONLY = {"HF_HUB_OFFLINE": None, "TRANSFORMERS_OFFLINE": "1"}

# (id, argv, exit code, words in the error line, environment changes)
CASES: list[tuple[str, list[str], int, tuple[str, ...], dict[str, Any]]] = [
    # ---------------------------------------------------------------- recipe values, named with their source
    ("lr-zero", T("--learning_rate", "0"), 2, ("command line --learning_rate", "learning_rate=0.0", "> 0"), {}),
    ("lr-negative", T("--learning_rate", "-0.0001"), 2, ("learning_rate=-0.0001", "> 0"), {}),
    ("lr-nan", T("--learning_rate", "nan"), 2, ("learning_rate=nan", "finite"), {}),
    ("lr-inf", T("--learning_rate", "inf"), 2, ("learning_rate=inf", "finite"), {}),
    ("lr-text", T("--learning_rate", "fast"), 2, ("command line --learning_rate", "invalid float value"), {}),
    ("batch-zero", T("--per_device_train_batch_size", "0"), 2, ("per_device_train_batch_size=0", ">= 1"), {}),
    ("batch-negative", T("--per_device_train_batch_size", "-2"), 2, ("per_device_train_batch_size=-2",), {}),
    ("batch-fraction", T("--per_device_train_batch_size", "1.5"), 2, ("per_device_train_batch_size", "int"), {}),
    ("train-eval-batch-zero", T("--per_device_eval_batch_size", "0"), 2, ("per_device_eval_batch_size=0",), {}),
    ("accum-zero", T("--gradient_accumulation_steps", "0"), 2, ("gradient_accumulation_steps=0",), {}),
    ("lora-r-zero", T("--lora_r", "0"), 2, ("command line --lora_r", "lora_r=0", ">= 1"), {}),
    ("lora-r-negative", T("--lora_r", "-4"), 2, ("lora_r=-4",), {}),
    ("lora-alpha-zero", T("--lora_alpha", "0"), 2, ("lora_alpha=0", "> 0"), {}),
    ("dropout-one", T("--lora_dropout", "1.0"), 2, ("lora_dropout=1.0", "< 1"), {}),
    ("dropout-negative", T("--lora_dropout", "-0.1"), 2, ("lora_dropout=-0.1", ">= 0"), {}),
    ("dropout-nan", T("--lora_dropout", "nan"), 2, ("lora_dropout=nan", "finite"), {}),
    (
        "epochs-negative",
        T("--max_steps", "-1", "--num_train_epochs", "-1"),
        2,
        ("num_train_epochs=-1.0", "> 0"),
        {},
    ),
    ("epochs-zero", T("--max_steps", "-1", "--num_train_epochs", "0"), 2, ("num_train_epochs=0.0",), {}),
    ("max-steps-zero", T("--max_steps", "0"), 2, ("max_steps=0", ">= 1"), {}),
    ("max-pairs-zero", T("--max_pairs", "0"), 2, ("max_pairs=0", ">= 1"), {}),
    ("max-pairs-negative", T("--max_pairs", "-5"), 2, ("max_pairs=-5",), {}),
    ("compute-dtype", T("--bnb_4bit_compute_dtype", "float33"), 2, ("bnb_4bit_compute_dtype='float33'",), {}),
    ("storage-dtype", T("--bnb_4bit_quant_storage", "int3"), 2, ("bnb_4bit_quant_storage='int3'",), {}),
    ("quant-type", T("--bnb_4bit_quant_type", "nf3"), 2, ("bnb_4bit_quant_type='nf3'", "nf4 or fp4"), {}),
    ("dataset-format", T("--dataset_format", "tsv"), 2, ("dataset_format='tsv'", "implicit"), {}),
    ("eval-fraction-one", T("--eval_fraction", "1.0"), 2, ("eval_fraction=1.0", "< 1"), {}),
    ("eval-fraction-negative", T("--eval_fraction", "-0.1"), 2, ("eval_fraction=-0.1",), {}),
    ("max-length-tiny", T("--max_length", "4"), 2, ("max_length=4", ">= 8"), {}),
    ("margin-inf", T("--better_margin", "inf"), 2, ("better_margin=inf", "finite"), {}),
    ("margin-minus-inf", T("--slightly_better_margin=-inf"), 2, ("slightly_better_margin=-inf", "finite"), {}),
    ("verify-pairs-negative", T("--verify_pairs", "-1"), 2, ("verify_pairs=-1",), {}),
    (
        "eval-dataset-and-fraction",  # both in one place (a recipe file's line vs a flag: the flag wins)
        ["train", "--recipe", f"{W}/with_eval.yaml", "--eval_dataset", f"{W}/pairs.jsonl", "--eval_fraction", "0.2"],
        2,
        ("eval_dataset", "command line --eval_dataset", "command line --eval_fraction", "keep one"),
        {},
    ),
    (
        "lora-target-typo",
        T("--lora_target_modules", "q_projx"),
        2,
        ("lora_target_modules", "q_projx", "BertForSequenceClassification", "query"),
        {},
    ),
    (
        "lora-target-one-of-two",
        T("--lora_target_modules", "query", "valeu"),
        2,
        ("['valeu']", "match no Linear module"),
        {},
    ),
    ("unknown-flag", T("--learning_rat", "1e-4"), 2, ("command line", "unknown field", "--learning_rat"), {}),
    # ---------------------------------------------------------------- recipe files
    ("recipe-missing", ["train", "--recipe", f"{W}/nope.yaml"], 2, ("nope.yaml", "recipe file not found"), {}),
    ("recipe-is-dir", ["train", "--recipe", f"{W}/emptydir"], 2, ("emptydir", "is a directory"), {}),
    ("recipe-no-path", ["train", "--recipe"], 2, ("--recipe needs a path",), {}),
    (
        "recipe-yaml-syntax",
        ["train", "--recipe", f"{W}/syntax.yaml"],
        2,
        ("syntax.yaml:4:14:", "YAML syntax error", "line 3"),
        {},
    ),
    ("recipe-unknown-key", ["train", "--recipe", f"{W}/unknown.yaml"], 2, ("unknown.yaml", "lora_rank"), {}),
    ("recipe-bad-value-line", ["train", "--recipe", f"{W}/lr0.yaml"], 2, ("lr0.yaml:12:", "learning_rate=0"), {}),
    (
        "recipe-bad-type-line",
        ["train", "--recipe", f"{W}/batch_abc.yaml"],
        2,
        ("batch_abc.yaml:7:", "per_device_train_batch_size", "invalid int value: 'abc'"),
        {},
    ),
    ("recipe-not-mapping", ["train", "--recipe", f"{W}/list.yaml"], 2, ("list.yaml", "YAML mapping"), {}),
    ("recipe-not-utf8", ["train", "--recipe", f"{W}/latin1.yaml"], 2, ("latin1.yaml", "not UTF-8"), {}),
    ("recipe-empty", ["train", "--recipe", f"{W}/empty.yaml"], 2, ("empty.yaml", "the recipe file is empty"), {}),
    ("recipe-no-model", ["train", "--recipe", f"{W}/no_model.yaml"], 2, ("model_name_or_path is required",), {}),
    # ---------------------------------------------------------------- the backbone
    (
        "model-missing-dot-path",
        T("--model_name_or_path", "./nope-model"),
        2,
        ("command line --model_name_or_path", "./nope-model", "no such directory"),
        {},
    ),
    (
        "model-one-slash-offline",
        T("--model_name_or_path", "models/tiny"),
        2,
        ("'models/tiny'", "no such local path", "HF_HUB_OFFLINE=1 is set"),
        OFFLINE,
    ),
    (
        "model-one-slash-transformers-offline",
        T("--model_name_or_path", "models/tiny"),
        2,
        ("no such local path", "TRANSFORMERS_OFFLINE=1 is set"),
        TRANSFORMERS_ONLY,
    ),
    ("model-is-file", T("--model_name_or_path", f"{W}/notes.txt"), 2, ("is a file", "model directory"), {}),
    ("model-empty-dir", T("--model_name_or_path", f"{W}/emptydir"), 2, ("no config.json", "holds no model"), {}),
    ("model-adapter-dir", T("--model_name_or_path", f"{W}/fake_adapter"), 2, ("LoRA adapter dir",), {}),
    ("model-no-weights", T("--model_name_or_path", f"{W}/config_only"), 2, ("config.json but no weights",), {}),
    ("model-config-not-json", T("--model_name_or_path", f"{W}/bad_config"), 2, ("is not valid JSON",), {}),
    ("model-pkg-missing", T("--model_name_or_path", "pkg:no_such_pkg_qrm/model"), 2, ("not installed",), {}),
    # ---------------------------------------------------------------- data files
    ("data-missing", D("missing.jsonl"), 2, ("missing.jsonl", "no such file"), {}),
    (
        "data-one-slash-offline",
        T("--dataset", "someone/prefs"),
        2,
        ("someone/prefs", "no such local file", "HF_HUB_OFFLINE=1 is set"),
        OFFLINE,
    ),
    ("data-dir", D("emptydir"), 2, ("emptydir", "is a directory"), {}),
    ("data-empty", D("empty.jsonl"), 2, ("empty.jsonl", "the file is empty"), {}),
    ("data-blank-lines", D("blank.jsonl"), 2, ("blank.jsonl", "only blank lines"), {}),
    ("data-empty-csv", D("empty.csv"), 2, ("empty.csv", "the file is empty"), {}),
    ("data-truncated-gzip", D("trunc.jsonl.gz"), 2, ("trunc.jsonl.gz", "truncated or corrupt gzip"), {}),
    ("data-not-gzip", D("plain.jsonl.gz"), 2, ("plain.jsonl.gz", "corrupt gzip"), {}),
    ("data-utf8-jsonl", D("latin1.jsonl"), 2, ("latin1.jsonl", "line 2", "not valid UTF-8"), {}),
    ("data-utf8-csv", D("latin1.csv"), 2, ("latin1.csv", "line 3 (row 2 after the header)", "UTF-8"), {}),
    ("data-bad-json-row", D("badjson.jsonl"), 2, ("badjson.jsonl", "row 2", "invalid JSON"), {}),
    ("data-suffix", D("notes.txt"), 2, ("notes.txt", "unsupported file type"), {}),
    ("data-json-object", D("object.json"), 2, ("object.json", "columns ['data']", "explicit needs"), {}),
    ("data-ragged-csv", D("ragged.csv"), 2, ("ragged.csv", "row 2 (line 3)", "4 fields", "header has 3"), {}),
    (
        "data-undetectable",
        D("cols.jsonl"),
        2,
        ("cols.jsonl", "columns ['answer_x', 'question_x']", "explicit needs", "ratings needs"),
        {},
    ),
    (
        "format-implicit-but-explicit",
        D("pairs.jsonl", "--dataset_format", "implicit"),
        2,
        ("pairs.jsonl", "dataset_format is 'implicit'", "looks like 'explicit'"),
        {},
    ),
    (
        "format-explicit-but-implicit",
        D("hh.jsonl", "--dataset_format", "explicit"),
        2,
        ("hh.jsonl", "dataset_format is 'explicit'", "looks like 'implicit'"),
        {},
    ),
    (
        "format-explicit-but-conversational",
        D("conv.jsonl", "--dataset_format", "explicit"),
        2,
        ("conv.jsonl", "looks like 'conversational'"),
        {},
    ),
    (
        "format-ratings-but-explicit",
        D("pairs.jsonl", "--dataset_format", "ratings"),
        2,
        ("dataset_format is 'ratings'", "looks like 'explicit'"),
        {},
    ),
    ("implicit-no-prefix", D("noprefix.jsonl"), 2, ("noprefix.jsonl", "row 2", "share no common start"), {}),
    ("implicit-earlier-turn", D("earlier.jsonl"), 2, ("earlier.jsonl", "row 1", "differ in an earlier turn"), {}),
    ("implicit-first-turn", D("firstturn.jsonl"), 2, ("row 1", "inside the first Human turn"), {}),
    ("implicit-empty-response", D("prefixonly.jsonl"), 2, ("row 1", "response would be empty"), {}),
    (
        "implicit-rejected-is-the-prompt",  # an HH pair whose rejected text is the prompt alone (empty response)
        D("hh_prompt_only.jsonl"),
        2,
        ("hh_prompt_only.jsonl", "row 2", "field 'rejected' is the shared prompt alone", "response would be empty"),
        {},
    ),
    (
        "auto-stray-prompt-row-5",  # implicit rows, one stray `prompt` key on row 5: named there, not on row 1
        D("stray_prompt.jsonl"),
        2,
        ("stray_prompt.jsonl", "row 5: field(s) ['prompt']", "'explicit'", "row 1 is 'implicit'"),
        {},
    ),
    ("row-missing-field", D("missing_field.jsonl"), 2, ("missing_field.jsonl", "row 2", "'rejected'"), {}),
    ("row-empty-text", D("empty_chosen.jsonl"), 2, ("row 1", "field 'chosen' is empty"), {}),
    ("row-wrong-type", D("type_chosen.jsonl"), 2, ("type_chosen.jsonl", "row 2", "'chosen'"), {}),
    ("margin-row-inf", D("margin_inf.jsonl", "--margin_column", "margin"), 2, ("row 2", "finite number"), {}),
    (
        "margin-row-minus-inf",
        D("margin_ninf.jsonl", "--margin_column", "margin"),
        2,
        ("row 1", "finite number, got -inf"),
        {},
    ),
    ("margin-row-nan", D("margin_nan.jsonl", "--margin_column", "margin"), 2, ("row 1", "finite number, got nan"), {}),
    ("no-usable-pair", D("same.jsonl"), 2, ("same.jsonl", "no usable pair left", "'identical': 3"), {}),
    ("sharegpt-bad-role", D("badrole.json"), 2, ("row 1", "message 1", "unknown role 'alien'"), {}),
    (
        "eval-split-empties-train",
        D("one_pair.jsonl", "--eval_fraction", "0.5"),
        2,
        ("one_pair.jsonl", "eval_fraction=0.5", "leaves no training pair"),
        {},
    ),
    (
        "eval-file-other-format",
        T("--eval_dataset", f"{W}/hh.jsonl"),
        2,
        ("hh.jsonl", "eval data reads as 'implicit'", "'explicit'"),
        {},
    ),
    ("all-pairs-too-long", T("--max_length", "8"), 2, ("every pair's responses alone exceed max_length=8",), {}),
    # ---------------------------------------------------------------- output_dir
    (
        "out-holds-other-run",
        T("--output_dir", f"{W}/run_other"),
        2,
        ("run_other", "not empty", "no complete checkpoint", "--replace_output_dir true"),
        {},
    ),
    (
        "out-holds-user-files",
        T("--output_dir", f"{W}/run_user"),
        2,
        ("run_user", "README.md", "--replace_output_dir true"),
        {},
    ),
    (
        "out-checkpoint-other-recipe",
        T("--output_dir", f"{W}/run_ckpt"),
        2,
        ("refusing to resume", "learning_rate=0.5", "--replace_output_dir true"),
        {},
    ),
    (
        "out-checkpoint-user-readme",
        T("--output_dir", f"{W}/run_ckpt_readme"),
        2,
        ("README.md that qrm did not write", "--replace_output_dir true"),
        {},
    ),
    ("out-resume-never", T("--output_dir", f"{W}/run_ckpt", "--resume", "never"), 2, ("resume: never",), {}),
    (
        "out-explicit-resume-missing",
        T("--resume", f"{W}/no-such-checkpoint"),
        2,
        ("no-such-checkpoint", "expected auto, never or a checkpoint directory"),
        {},
    ),
    ("out-is-data-file", T("--output_dir", f"{W}/pairs.jsonl"), 2, ("output_dir", "is a file"), {}),
    (
        "out-inside-model",
        T("--output_dir", "{MODEL}/run"),
        2,
        ("lies inside, the input model_name_or_path",),
        {},
    ),
    # ---------------------------------------------------------------- qrm eval
    ("eval-no-model", ["eval", "--model", f"{W}/nope", "--data", f"{W}/pairs.jsonl"], 2, ("--model", "no such"), {}),
    (
        "eval-empty-model-dir",
        ["eval", "--model", f"{W}/emptydir", "--data", f"{W}/pairs.jsonl"],
        2,
        ("--model", "holds no adapter_config.json"),
        {},
    ),
    (
        "eval-batch-zero",
        ["eval", "--model", f"{W}/fake_adapter", "--data", f"{W}/pairs.jsonl", "--batch-size", "0"],
        2,
        ("--batch-size 0", ">= 1"),
        {},
    ),
    (
        "eval-format",
        ["eval", "--model", f"{W}/fake_adapter", "--data", f"{W}/pairs.jsonl", "--dataset-format", "tsv"],
        2,
        ("--dataset-format tsv",),
        {},
    ),
    (
        "eval-out-is-data",
        ["eval", "--model", f"{W}/fake_adapter", "--data", f"{W}/pairs.jsonl", "--out", f"{W}/pairs.jsonl"],
        2,
        ("--out", "is the input --data"),
        {},
    ),
    (
        "eval-data-missing",
        ["eval", "--model", f"{W}/fake_adapter", "--data", f"{W}/missing.jsonl", "--out", f"{W}/ev"],
        2,
        ("missing.jsonl", "no such file"),
        {},
    ),
    (
        "eval-data-not-utf8",
        ["eval", "--model", f"{W}/fake_adapter", "--data", f"{W}/latin1.jsonl", "--out", f"{W}/ev"],
        2,
        ("latin1.jsonl", "UTF-8"),
        {},
    ),
    (
        "eval-out-has-report",
        ["eval", "--model", f"{W}/fake_adapter", "--data", f"{W}/pairs.jsonl", "--out", f"{W}/old_eval"],
        2,
        ("already holds a report", "--force"),
        {},
    ),
    (
        "eval-out-is-file",
        ["eval", "--model", f"{W}/fake_adapter", "--data", f"{W}/pairs.jsonl", "--out", f"{W}/notes.txt"],
        2,
        ("--out", "is a file"),
        {},
    ),
    ("eval-nothing-to-do", ["eval", "--model", f"{W}/fake_adapter"], 2, ("--data, --probes",), {}),
    # ---------------------------------------------------------------- qrm score
    (
        "score-out-is-data",
        ["score", "--model", f"{W}/fake_adapter", "--data", f"{W}/pairs.jsonl", "--out", f"{W}/pairs.jsonl"],
        2,
        ("--out", "is the input --data"),
        {},
    ),
    (
        "score-out-in-model",
        ["score", "--model", f"{W}/fake_adapter", "--data", f"{W}/pairs.jsonl", "--out", f"{W}/fake_adapter/r.jsonl"],
        2,
        ("lies inside the input --model",),
        {},
    ),
    (
        "score-out-exists",
        ["score", "--model", f"{W}/fake_adapter", "--data", f"{W}/pairs.jsonl", "--out", f"{W}/notes.txt"],
        2,
        ("--out", "exists", "--force"),
        {},
    ),
    (
        "score-out-dir",
        ["score", "--model", f"{W}/fake_adapter", "--data", f"{W}/pairs.jsonl", "--out", f"{W}/emptydir"],
        2,
        ("--out", "is a directory"),
        {},
    ),
    (
        "score-batch-zero",
        ["score", "--model", f"{W}/fake_adapter", "--data", f"{W}/pairs.jsonl", "--batch-size", "0"],
        2,
        ("--batch-size 0",),
        {},
    ),
    (
        "score-max-length",
        ["score", "--model", f"{W}/fake_adapter", "--data", f"{W}/pairs.jsonl", "--max-length", "2"],
        2,
        ("--max-length 2", ">= 8"),
        {},
    ),
    (
        "score-format",
        ["score", "--model", f"{W}/fake_adapter", "--data", f"{W}/pairs.jsonl", "--format", "pairs"],
        2,
        ("--format pairs", "expected one of"),
        {},
    ),
    ("score-no-model", ["score", "--model", f"{W}/nope", "--data", f"{W}/pairs.jsonl"], 2, ("--model", "no such"), {}),
    (
        "score-model-is-file",
        ["score", "--model", f"{W}/notes.txt", "--data", f"{W}/pairs.jsonl"],
        2,
        ("--model", "is a file"),
        {},
    ),
    (
        "score-truncated-gzip",
        ["score", "--model", f"{W}/fake_adapter", "--data", f"{W}/trunc.jsonl.gz"],
        2,
        ("trunc.jsonl.gz", "truncated or corrupt gzip"),
        {},
    ),
    (
        "score-empty-data",
        ["score", "--model", f"{W}/fake_adapter", "--data", f"{W}/empty.jsonl"],
        2,
        ("empty.jsonl", "empty"),
        {},
    ),
    # ---------------------------------------------------------------- qrm merge
    (
        "merge-out-is-adapter",
        ["merge", "--adapter", f"{W}/fake_adapter", "--out", f"{W}/fake_adapter", "--force"],
        2,
        ("--out", "fake_adapter"),
        {},
    ),
    (
        "merge-out-in-adapter",
        ["merge", "--adapter", f"{W}/fake_adapter", "--out", f"{W}/fake_adapter/export"],
        2,
        ("--out", "lies inside the input --adapter"),
        {},
    ),
    (
        "merge-out-not-empty",
        ["merge", "--adapter", f"{W}/fake_adapter", "--out", f"{W}/run_other"],
        2,
        ("not empty", "--force"),
        {},
    ),
    (
        "merge-verify-data-in-out",
        ["merge", "--adapter", f"{W}/fake_adapter", "--out", W, "--verify-data", f"{W}/pairs.jsonl", "--force"],
        2,
        ("--verify-data", "lies inside --out", "replaced"),
        {},
    ),
    (
        "merge-batch-zero",
        ["merge", "--adapter", f"{W}/fake_adapter", "--out", f"{W}/exp", "--batch-size", "0"],
        2,
        ("--batch-size 0",),
        {},
    ),
    (
        "merge-shard-size",
        ["merge", "--adapter", f"{W}/fake_adapter", "--out", f"{W}/exp", "--max-shard-size", "big"],
        2,
        ("--max-shard-size big",),
        {},
    ),
    (
        "merge-min-agreement",
        ["merge", "--adapter", f"{W}/fake_adapter", "--out", f"{W}/exp", "--min-agreement", "1.5"],
        2,
        ("--min-agreement 1.5",),
        {},
    ),
    ("merge-no-adapter", ["merge", "--adapter", f"{W}/emptydir", "--out", f"{W}/exp"], 2, ("adapter_config",), {}),
    (
        "merge-method",
        ["merge", "--adapter", f"{W}/fake_adapter", "--out", f"{W}/exp", "--method", "requantize"],
        2,
        ("--method", "invalid choice"),
        {},
    ),
    # ---------------------------------------------------------------- qrm push
    ("push-no-dir", ["push", "--path", f"{W}/nope", "--repo-id", "me/rm"], 2, ("no such directory",), {}),
    ("push-not-a-model", ["push", "--path", f"{W}/emptydir", "--repo-id", "me/rm"], 2, ("neither an adapter",), {}),
    ("push-bad-repo-id", ["push", "--path", f"{W}/export", "--repo-id", "me/r m!"], 2, ("invalid --repo-id",), {}),
    ("push-pickle", ["push", "--path", f"{W}/pickled", "--repo-id", "me/rm"], 2, ("refusing pickles",), {}),
    (
        "push-offline",
        ["push", "--path", f"{W}/export", "--repo-id", "me/rm"],
        2,
        ("HF_HUB_OFFLINE=1 is set",),
        OFFLINE,
    ),
    (
        "push-transformers-offline",
        ["push", "--path", f"{W}/export", "--repo-id", "me/rm"],
        2,
        ("TRANSFORMERS_OFFLINE=1 is set",),
        TRANSFORMERS_ONLY,
    ),
    (
        "push-adapter-only-on-export",
        ["push", "--path", f"{W}/export", "--repo-id", "me/rm", "--adapter-only"],
        2,
        ("--adapter-only needs an adapter dir",),
        {},
    ),
    # ---------------------------------------------------------------- qrm plan
    ("plan-missing", ["plan", "--recipe", f"{W}/nope.yaml"], 2, ("recipe file not found",), {}),
    (
        "plan-yaml-syntax",
        ["plan", "--recipe", f"{W}/syntax.yaml"],
        2,
        ("syntax.yaml:4:14:", "YAML syntax error", "line 3"),
        {},
    ),
    ("plan-gpus-zero", ["plan", "--recipe", f"{W}/base.yaml", "--num-gpus", "0"], 2, ("--num-gpus 0",), {}),
    ("plan-lora-r", ["plan", "--recipe", f"{W}/base.yaml", "--lora_r", "0"], 2, ("command line --lora_r",), {}),
    ("plan-no-config", ["plan", "--recipe", f"{W}/hub_model.yaml"], 2, ("never downloads",), {}),
    # ---------------------------------------------------------------- the command itself
    ("unknown-command", ["trian"], 2, ("unknown command 'trian'",), {}),
    ("no-command", [], 2, (), {}),
]


def _files(root: Path) -> dict[str, str]:
    """Every file and directory under `root` with the sha256 of its bytes ("dir" for directories)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _checkpoint(folder: Path, recipe: str, readme: str | None = None) -> None:
    """An output_dir with one complete checkpoint, as `qrm train` leaves it after a save."""
    import torch
    from safetensors.torch import save_file

    ck = folder / "checkpoint-2"
    ck.mkdir(parents=True)
    (ck / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    save_file({"lora_A.weight": torch.zeros(2, 2)}, ck / "adapter_model.safetensors")
    torch.save({}, ck / "optimizer.pt")
    torch.save({}, ck / "scheduler.pt")
    for d in (ck, folder):
        (d / "qrm_recipe.yaml").write_text(recipe)
        (d / "qrm_versions.json").write_text("{}")
    if readme is not None:
        (folder / "README.md").write_text(readme)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Inputs, recipes and earlier runs, each broken in one way."""
    w = tmp_path_factory.mktemp("bad-inputs")
    model = resolve_path(MINILM)
    base = BASE_RECIPE.format(model=MINILM, W=w)
    (w / "base.yaml").write_text(base)
    (w / "with_eval.yaml").write_text(base + f"eval_dataset: {w}/pairs.jsonl\n")
    (w / "lr0.yaml").write_text(base + "learning_rate: 0\n")
    (w / "batch_abc.yaml").write_text(
        base.replace("per_device_train_batch_size: 2", "per_device_train_batch_size: abc")
    )
    (w / "syntax.yaml").write_text("model_name_or_path: x\ndataset: y\nlora_r: [4, 8\nlearning_rate: 1\n")
    (w / "unknown.yaml").write_text(base + "lora_rank: 8\n")
    (w / "empty.yaml").write_text("\n")
    (w / "list.yaml").write_text("- model_name_or_path\n- dataset\n")
    (w / "latin1.yaml").write_bytes(base.encode() + "# r\xe9sum\xe9\n".encode("latin-1"))
    (w / "no_model.yaml").write_text(base.replace(f"model_name_or_path: {MINILM}\n", ""))
    (w / "hub_model.yaml").write_text(base.replace(MINILM, "some-org/some-model"))

    long = " and then some more words to make the answer long enough"
    pairs = [
        {"prompt": f"Question {i}?", "chosen": f"Good answer {i}{long}", "rejected": f"Bad answer {i}{long}"}
        for i in range(6)
    ]
    write_jsonl(w / "pairs.jsonl", pairs)
    write_jsonl(w / "one_pair.jsonl", pairs[:1])
    write_jsonl(w / "hh.jsonl", hh_rows(4, HH_TRAIN))
    (w / "empty.jsonl").write_text("")
    (w / "empty.csv").write_text("")
    (w / "blank.jsonl").write_text("\n  \n\n")
    raw = (w / "pairs.jsonl").read_bytes()
    (w / "trunc.jsonl.gz").write_bytes(gzip.compress(raw)[: len(gzip.compress(raw)) // 2])
    (w / "plain.jsonl.gz").write_bytes(raw)
    lines = raw.splitlines(keepends=True)
    (w / "latin1.jsonl").write_bytes(lines[0] + lines[1].replace(b"Good", "G\xf6od".encode("latin-1")))
    (w / "latin1.csv").write_bytes(b"prompt,chosen,rejected\np,c,r\np2,c\xe92,r2\n")
    (w / "badjson.jsonl").write_bytes(lines[0] + b"{not json\n")
    (w / "notes.txt").write_text("my notes\n")
    (w / "object.json").write_text(json.dumps({"data": [{"prompt": "p", "chosen": "c", "rejected": "r"}]}))
    (w / "ragged.csv").write_text("prompt,chosen,rejected\np,c,r\np,c,r,extra\n")
    write_jsonl(w / "cols.jsonl", [{"question_x": "q", "answer_x": "a"}])
    msgs = lambda t: [{"role": "user", "content": "hi"}, {"role": "assistant", "content": t}]  # noqa: E731
    write_jsonl(
        w / "conv.jsonl", [{"prompt": [{"role": "user", "content": "hi"}], "chosen": msgs("a"), "rejected": msgs("b")}]
    )
    hh = "\n\nHuman: {h}\n\nAssistant: {a}"
    write_jsonl(
        w / "noprefix.jsonl",
        [{"chosen": "The sky is blue", "rejected": "The sky is grey"}, {"chosen": "Alpha beta", "rejected": "Gamma"}],
    )
    write_jsonl(
        w / "earlier.jsonl",
        [
            {
                "chosen": hh.format(h="Hi", a="Hello there") + hh.format(h="Name?", a="Bob"),
                "rejected": hh.format(h="Hi", a="Go away") + hh.format(h="Name?", a="No"),
            }
        ],
    )
    write_jsonl(w / "firstturn.jsonl", [{"chosen": hh.format(h="Hi A", a="x"), "rejected": hh.format(h="Hi B", a="y")}])
    write_jsonl(w / "prefixonly.jsonl", [{"chosen": "The answer is blue", "rejected": "The answer is blue and green"}])
    hh_pairs = [
        {"chosen": hh.format(h=f"Q{i}", a=f"A{i}"), "rejected": hh.format(h=f"Q{i}", a=f"B{i}")} for i in range(6)
    ]
    write_jsonl(w / "hh_prompt_only.jsonl", [hh_pairs[0], {**hh_pairs[1], "rejected": "\n\nHuman: Q1\n\nAssistant:"}])
    write_jsonl(w / "stray_prompt.jsonl", [*hh_pairs[:4], {**hh_pairs[4], "prompt": "Q4"}, hh_pairs[5]])
    write_jsonl(w / "missing_field.jsonl", [pairs[0], {"prompt": "p", "chosen": "c"}])
    write_jsonl(w / "empty_chosen.jsonl", [{**pairs[0], "chosen": ""}, pairs[1]])
    write_jsonl(w / "type_chosen.jsonl", [pairs[0], {**pairs[1], "chosen": 5}])
    write_jsonl(w / "margin_inf.jsonl", [{**pairs[0], "margin": "1.0"}, {**pairs[1], "margin": "inf"}])
    write_jsonl(w / "margin_ninf.jsonl", [{**pairs[0], "margin": "-inf"}])
    write_jsonl(w / "margin_nan.jsonl", [{**pairs[0], "margin": "nan"}])
    write_jsonl(w / "same.jsonl", [{"prompt": "p", "chosen": "x", "rejected": "x"}] * 3)
    (w / "badrole.json").write_text(
        json.dumps(
            [
                {
                    "conversations": [{"from": "alien", "value": "hi"}],
                    "chosen": {"from": "gpt", "value": "a"},
                    "rejected": {"from": "gpt", "value": "b"},
                }
            ]
        )
    )
    (w / "emptydir").mkdir()
    for name, text in (("config_only", '{"model_type": "bert"}'), ("bad_config", "{not json")):
        (w / name).mkdir()
        (w / name / "config.json").write_text(text)
        if name == "bad_config":
            (w / name / "model.safetensors").write_bytes(b"x")
    (w / "fake_adapter").mkdir()
    (w / "fake_adapter" / "adapter_config.json").write_text("{}")
    (w / "old_eval").mkdir()
    (w / "old_eval" / "metrics.json").write_text('{"accuracy": 0.7}')
    (w / "export").mkdir()
    (w / "export" / "config.json").write_text("{}")
    (w / "export" / "model.safetensors").write_bytes(b"x")
    (w / "pickled").mkdir()
    (w / "pickled" / "adapter_config.json").write_text("{}")
    (w / "pickled" / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    # Earlier runs that must survive every refused command byte for byte.
    other = w / "run_other"
    other.mkdir()
    (other / "qrm_recipe.yaml").write_text("learning_rate: 0.1\n")
    (other / "adapter_model.safetensors").write_bytes(b"weights of another run")
    (other / "metrics.json").write_text('{"eval_accuracy": 0.71}')
    (other / "eval").mkdir()
    (other / "eval" / "report.md").write_text("# old report\n")
    user = w / "run_user"
    user.mkdir()
    (user / "README.md").write_text("# my experiment notes\n")
    (user / "results.csv").write_text("a,b\n1,2\n")
    _checkpoint(w / "run_ckpt", "learning_rate: 0.5\n")
    _checkpoint(w / "run_ckpt_readme", "learning_rate: 0.5\n", readme="# my notes, not a model card\n")
    assert (Path(model) / "config.json").is_file()
    return w


def _fill(argv: list[str], w: Path) -> list[str]:
    model = resolve_path(MINILM)
    return [a.replace(W, str(w)).replace("{MODEL}", model) for a in argv]


@pytest.mark.parametrize(("argv", "code", "words", "env"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(
    workspace: Path,
    argv: list[str],
    code: int,
    words: tuple[str, ...],
    env: dict[str, Any],
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key, value in env.items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    model_dir = Path(resolve_path(MINILM))
    before, model_before = _files(workspace), sorted(p.name for p in model_dir.iterdir())
    capsys.readouterr()
    rc = qrm.cli.main(_fill(argv, workspace))
    err = capsys.readouterr().err
    assert rc == code, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    for word in _fill(list(words), workspace):
        assert word in errors[0], f"{word!r} not in {errors[0]!r}"
    assert _files(workspace) == before, "a file of the workspace changed, appeared or disappeared"
    assert sorted(p.name for p in model_dir.iterdir()) == model_before


def test_the_table_is_big_enough() -> None:
    assert len(CASES) >= 80 and len({c[0] for c in CASES}) == len(CASES)
    commands = {c[1][0] for c in CASES if c[1]}
    assert {"train", "eval", "merge", "score", "push", "plan"} <= commands


def test_debug_shows_the_traceback(workspace: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("QRM_DEBUG", "1")
    assert qrm.cli.main(_fill(T("--lora_r", "0"), workspace)) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("qrm train: error:")


def test_internal_error_prints_one_line_and_writes_the_log(capsys) -> None:
    try:
        {}["missing"]
    except KeyError as exc:
        rc = qrm.cli.internal_error("qrm test", exc)
    err = capsys.readouterr().err.strip()
    assert rc == qrm.cli.INTERNAL_ERROR_EXIT and len(err.splitlines()) == 1
    assert err.startswith("qrm test: internal error: KeyError:") and "full traceback in " in err
    log = Path(err.split("full traceback in ")[1].rstrip(")"))
    assert "Traceback" in log.read_text() and "KeyError" in log.read_text()
    log.unlink()


def test_replace_moves_the_old_run_aside_and_starts_clean(workspace: Path, tmp_path: Path, capsys) -> None:
    """`--replace_output_dir true`: the old run (and a user's README.md) survive byte for byte beside the new run,
    and nothing of the old run stays mixed into it."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(workspace / "run_other", out)
    (out / "README.md").write_text("# my notes\n")
    old = _files(out)
    argv = T("--output_dir", str(out), "--replace_output_dir", "true", "--per_device_train_batch_size", "3")
    assert qrm.cli.main(_fill(argv, workspace)) == 0, capsys.readouterr().err
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(moved) == 1 and _files(moved[0]) == old
    new = _files(out)
    assert "eval/report.md" not in new and "adapter_model.safetensors" in new
    assert new["adapter_model.safetensors"] != old["adapter_model.safetensors"]
    assert "library_name: peft" in (out / "README.md").read_text()  # PEFT's card; the user's is in the old run
