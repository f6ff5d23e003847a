"""Checks `qrm train` runs before any weight is loaded and before the first file is written.

The backbone: `model_name_or_path` exists (or is a Hub id the Hub may serve), holds a model, and every
`lora_target_modules` entry names one of its Linear modules (checked on a meta-device instance).

Output safety, what `qrm train` may do with its `output_dir`:

- An empty or missing `output_dir`: start afresh.
- A non-empty one: continue the run it holds when `resume` finds a complete checkpoint trained with the same recipe
  and data (changed fields are named, `resume_force: true` overrides); otherwise refuse, unless
  `replace_output_dir: true`, which renames the old directory to `<output_dir>.replaced-<time>` (nothing is deleted,
  and nothing of the old run stays mixed with the new one).
- A `README.md` that neither PEFT nor TRL wrote is the user's: a resumed run, whose adapter save would replace it, is refused.
- `output_dir` may not be, or lie inside, an input (data file, model directory), nor be a file.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from .errors import RecipeError, SourceError
from .files import CARD_FILE, MODEL_CONFIG, is_adapter_dir

logger = logging.getLogger("qrm")

REPLACED_SUFFIX = ".replaced-"


def _blame(sources: Any, key: str) -> str:
    return sources(key) if callable(sources) else "recipe"


def inside(path: str | os.PathLike, container: str | os.PathLike) -> bool:
    """Whether `path` is `container` or lies under it (resolved, so `./a/../b` and symlinks count)."""
    p, c = Path(path).expanduser().resolve(), Path(container).expanduser().resolve()
    return p == c or c in p.parents


def check_output_dir(output_dir: str, inputs: dict[str, str | None], sources: Any = None) -> None:
    """Refuse an `output_dir` that is a file, or equal to or inside one of `inputs` (field name -> local path)."""

    where = _blame(sources, "output_dir")
    if Path(output_dir).is_file():
        raise RecipeError(f"{where}: output_dir={output_dir!r} is a file; it must be a directory")
    for key, value in inputs.items():
        if value and Path(value).exists() and inside(output_dir, value):
            raise RecipeError(
                f"{where}: output_dir={output_dir!r} is, or lies inside, the input {key}={value!r} "
                f"({_blame(sources, key)}); training would write into it: choose another output_dir"
            )


def _user_readme(out: Path) -> bool:
    readme = out / CARD_FILE
    if not readme.is_file():
        return False
    from huggingface_hub.repocard import metadata_load

    try:
        meta = metadata_load(readme) or {}
    except (OSError, ValueError):
        return True
    # PEFT's card (every adapter save rewrites it) and TRL's (RewardTrainer writes it beside every checkpoint,
    # trl/trainer/base_trainer.py create_model_card) are the run's own; any other README is the user's.
    return not (meta.get("library_name") == "peft" or "reward-trainer" in (meta.get("tags") or []))


def decide_output_dir(targs: Any, resolved: dict[str, Any], train_rows: list[dict], sources: Any = None) -> Any:
    """Return the checkpoint to resume from (or None: start afresh), moving an old run aside when the recipe says
    `replace_output_dir`; raise `RecipeError` when the directory holds files this run must not touch. Writes
    nothing except that rename."""
    from .config import data_fingerprint, resolved_recipe
    from .resume import last_good_checkpoint, resume_checkpoint

    out = Path(targs.output_dir)
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    _barrier()  # every rank has looked before the main process may move the directory: all take the same branch
    mode = str(getattr(targs, "resume", None) or "auto")
    explicit = getattr(targs, "resume_from_checkpoint", None) or (mode if mode not in ("auto", "never") else None)
    current = (resolved_recipe(resolved), {"data_fingerprint": data_fingerprint(train_rows)})
    if not entries:
        # An explicit checkpoint elsewhere is still checked (usable, same recipe and data) before anything is written.
        return None if explicit is None else resume_checkpoint(targs, current=current)
    flag = "--replace_output_dir true"
    if getattr(targs, "replace_output_dir", False):
        return _move_aside(out)
    has_checkpoint = explicit is not None or (
        mode != "never" and last_good_checkpoint(out, require_optimizer=not targs.save_only_model) is not None
    )
    shown = ", ".join(entries[:6]) + (f", … ({len(entries)} entries)" if len(entries) > 6 else "")
    where = _blame(sources, "output_dir")
    if not has_checkpoint:
        why = "resume: never" if mode == "never" else "no complete checkpoint to resume"
        raise RecipeError(
            f"{where}: output_dir {out} is not empty ({shown}) and holds {why}; pass {flag} to move it aside to "
            f"{out.name}{REPLACED_SUFFIX}<time> and start afresh, or choose another output_dir"
        )
    if explicit is not None and not inside(explicit, out):
        raise RecipeError(
            f"{where}: output_dir {out} is not empty ({shown}) and resume={explicit} lies outside it; choose an empty "
            f"output_dir, or pass {flag}"
        )
    if _user_readme(out):
        raise RecipeError(
            f"{where}: output_dir {out} holds a README.md that qrm did not write; resuming would replace it with the "
            f"adapter's model card: move it, or pass {flag}"
        )
    try:
        return resume_checkpoint(targs, current=current)
    except RecipeError as e:
        raise RecipeError(f"{e}; or pass {flag} to move the old run aside and start afresh") from None


def _move_aside(out: Path) -> None:
    """Rename the old run to a timestamped sibling (main process only); the new run starts in an empty dir."""

    target = out.with_name(f"{out.name}{REPLACED_SUFFIX}{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while target.exists():
        n += 1
        target = target.with_name(f"{out.name}{REPLACED_SUFFIX}{time.strftime('%Y%m%d-%H%M%S')}-{n}")
    if int(os.environ.get("RANK", 0)) == 0:
        try:
            os.replace(out, target)
        except OSError as e:
            raise RecipeError(f"replace_output_dir: cannot move {out} aside to {target}: {e.strerror}") from None
        logger.warning("replace_output_dir: moved the old contents of %s to %s", out, target)
        print(f"[qrm] replace_output_dir: the old run in {out} was moved to {target}", flush=True)
    _barrier()  # no rank writes into output_dir before the old run is out of the way


def _barrier() -> None:
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def load_tokenizer_or_explain(margs: Any, targs: Any, sources: Any = None) -> Any:
    """`qrm.model.load_tokenizer`, with a Hub or path failure turned into one line that says what was tried."""
    from .model import load_tokenizer

    try:
        return load_tokenizer(margs, trust_remote_code=targs.trust_remote_code)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if Path(margs.model_name_or_path).expanduser().is_dir() or margs.model_name_or_path.startswith("pkg:"):
            raise RecipeError(
                f"{_blame(sources, 'model_name_or_path')}: model_name_or_path={margs.model_name_or_path!r}: its "
                f"tokenizer cannot be loaded: {first}"
            ) from None
        raise RecipeError(
            f"{_blame(sources, 'model_name_or_path')}: model_name_or_path={margs.model_name_or_path!r}: not a local "
            f"directory, and the Hub could not provide it: {first}"
        ) from None


WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.pt", "*.gguf")
_HUB_MODEL_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def check_model_source(margs: Any, where: Any = None) -> str | None:
    """Check `model_name_or_path` before anything is loaded; returns the local directory, or None for a Hub id.

    A path that does not exist here is taken for a Hub id only when it looks like one (`name` or `owner/name`); with
    HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE set it must then be in the Hub cache.
    """
    from .files import offline_variable

    src = where("model_name_or_path") if callable(where) else (where or "recipe")
    name = margs.model_name_or_path
    head = f"{src}: model_name_or_path={name!r}"
    from .source import check_gguf_ready, gguf_source

    try:
        if gguf_source(name) is not None:
            check_gguf_ready(name)  # cheap: the conversion itself runs when the tokenizer loads
            return None
        if name.startswith("pkg:"):
            from .source import resolve_path

            name = resolve_path(name)
    except SourceError as e:
        raise RecipeError(f"{src}: {e}") from None
    path = Path(name).expanduser()
    if path.is_file():
        raise RecipeError(f"{head}: is a file; expected a model directory (with config.json), a .gguf file or a Hub id")
    if path.is_dir():
        if (path / MODEL_CONFIG).is_file():
            try:
                json.loads((path / MODEL_CONFIG).read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as e:
                raise RecipeError(f"{head}: {path / MODEL_CONFIG} is not valid JSON: {e}") from None
            if not any(any(path.glob(pattern)) for pattern in WEIGHT_PATTERNS):
                raise RecipeError(f"{head}: the directory has a config.json but no weights (*.safetensors, *.bin)")
            return str(path)
        hint = " (it is a LoRA adapter dir: give its base model)" if is_adapter_dir(path) else ""
        raise RecipeError(f"{head}: directory has no config.json, so it holds no model{hint}")
    if not _HUB_MODEL_ID.match(name):
        raise RecipeError(f"{head}: no such directory")
    if offline := offline_variable():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, MODEL_CONFIG, revision=margs.model_revision), str):
            raise RecipeError(
                f"{head}: no such local path, and {offline} is set, so it is not fetched from the Hub as a repo id "
                "(nor is it in the Hub cache)"
            )
    return None


def check_lora_targets(local_dir: str, largs: Any, where: Any = None, trust_remote_code: bool = False) -> None:
    """Every `lora_target_modules` entry must match a Linear of the backbone, checked on a meta-device instance
    (no weights, no memory) the way PEFT matches names: the full name or its last dotted components."""
    if list(largs.lora_target_modules) == ["all-linear"]:
        return
    import torch
    from transformers import AutoConfig

    from .model import meta_model

    src = where("lora_target_modules") if callable(where) else (where or "recipe")
    try:
        config = AutoConfig.from_pretrained(local_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise RecipeError(f"{local_dir}/config.json: cannot be read: {str(e).splitlines()[0]}") from None
    model = meta_model(config, trust_remote_code=trust_remote_code)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    missing = [t for t in largs.lora_target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise RecipeError(
            f"{src}: lora_target_modules {missing} match no Linear module of {type(model).__name__}; "
            f"its Linear modules are named {leaves} (or use all-linear)"
        )
