"""Every recipe under recipes/ parses, says how to run it, fits the hardware it names, and trains when shrunk."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# Globbed, not listed: a recipe is covered the day it is added.
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))
BACKBONES = sorted({p.parent for p in RECIPES if (p.parent / "config.json").is_file()})
RUN = re.compile(
    r"^#.*?(?:accelerate launch --config_file (?P<config>\S+) scripts/train\.py|qrm train) --recipe (?P<recipe>\S+)"
)
# Recipes launched on GPUs; the CPU ones (the demo, gemma-3-270m/hh_helpful_cpu.yaml) run with `qrm train`.
GPU_RECIPES = [p for p in RECIPES if p.parent in BACKBONES and RUN.match(p.read_text().splitlines()[0])["config"]]
HARDWARE = re.compile(r"^# Hardware: (?P<gpus>\d+) x (?P<gb>\d+) GB", re.MULTILINE)
# Architecture families the recipes must span (issue: >= 4 families, 1B to 13B).
FAMILIES = {"llama", "qwen2", "mistral", "gemma2"}


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _ids(paths: list[Path]) -> list[str]:
    return [_rel(p) for p in paths]


def _local_backbone(model: str) -> bool:
    # pkg:<wheel>/<dir> and local directories carry their own config.json; only hub ids need one shipped here
    return model.startswith("pkg:") or model.startswith((".", "/"))


def test_recipes_cover_the_issue() -> None:
    from transformers import AutoConfig

    assert len(BACKBONES) >= 8
    families = {AutoConfig.from_pretrained(d).model_type for d in BACKBONES}
    assert FAMILIES <= families, families


@pytest.mark.parametrize("path", RECIPES, ids=_ids(RECIPES))
def test_recipe_parses(path: Path) -> None:
    from qrm.config import parse_recipe

    margs, _, dargs, targs = parse_recipe(["--recipe", str(path)])
    assert margs.model_name_or_path and dargs.dataset
    assert targs.output_dir.startswith("outputs/"), targs.output_dir
    assert targs.report_to in ([], ["none"], "none")


@pytest.mark.parametrize("path", RECIPES, ids=_ids(RECIPES))
def test_first_line_is_the_run_command(path: Path) -> None:
    first = path.read_text().splitlines()[0]
    m = RUN.match(first)
    assert m, f"{_rel(path)}: first line must be a comment with the command that runs it, got {first!r}"
    assert m["recipe"] == _rel(path), f"the command runs {m['recipe']}, not this file"
    if m["config"]:
        assert (ROOT / m["config"]).is_file(), f"{m['config']} does not exist"


@pytest.mark.parametrize("path", RECIPES, ids=_ids(RECIPES))
def test_floats_are_yaml_floats(path: Path) -> None:
    """PyYAML reads `1e-4` as a string; recipes write `1.0e-4` so the file means what it says."""
    raw = yaml.safe_load(path.read_text())
    for key in ("learning_rate", "lora_dropout", "warmup_steps", "center_rewards_coefficient"):
        if key in raw:
            assert isinstance(raw[key], (int, float)) and not isinstance(raw[key], bool), (key, raw[key])


@pytest.mark.parametrize("path", GPU_RECIPES, ids=_ids(GPU_RECIPES))
def test_gpu_recipe_conventions(path: Path) -> None:
    text = path.read_text()
    raw = yaml.safe_load(text)
    hw = HARDWARE.search(text)
    assert hw, f"{_rel(path)}: needs a '# Hardware: N x M GB ...' line"
    assert raw["bf16"] is True and raw.get("activation_checkpointing", raw.get("gradient_checkpointing")) is True
    assert raw["report_to"] == "none"
    assert raw["eval_strategy"] == "steps" and raw["save_steps"] == raw["eval_steps"]
    sharded = "fsdp" in RUN.match(text.splitlines()[0])["config"] or "zero3" in text.splitlines()[0]
    # FSDP and ZeRO-3 shard the packed 4-bit weights: they must be stored in the bf16 param dtype
    assert (raw.get("bnb_4bit_quant_storage") == "bfloat16") == sharded
    assert (int(hw["gpus"]) > 1) == sharded


@pytest.mark.parametrize("path", GPU_RECIPES, ids=_ids(GPU_RECIPES))
def test_recipe_fits_the_hardware_it_names(path: Path) -> None:
    from qrm.plan import plan

    hw = HARDWARE.search(path.read_text())
    p = plan(path, num_gpus=int(hw["gpus"]), gpu_memory_gb=float(hw["gb"]))
    assert p["fits"], f"{_rel(path)} needs {p['peak_gb']:.1f} GiB per GPU, more than {hw['gb']} GB"


LAUNCHED = [p for p in RECIPES if RUN.match(p.read_text().splitlines()[0])["config"]]


@pytest.mark.parametrize("path", LAUNCHED, ids=_ids(LAUNCHED))
def test_recipe_runs_under_its_launcher(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The accelerate config named on the first line and the recipe agree: an FSDP config shards the packed 4-bit
    weights in the recipe's storage dtype (and would refuse uint8 storage), a single-GPU config shards nothing."""
    from qrm.config import parse_recipe
    from qrm.distributed import check_launch, detect_launch, launch_env
    from qrm.errors import LaunchError

    m = RUN.match(path.read_text().splitlines()[0])
    margs, _, _, targs = parse_recipe(["--recipe", str(path)])
    for key, value in launch_env(ROOT / m["config"]).items():
        monkeypatch.setenv(key, value)
    check_launch(margs, targs)
    launch = detect_launch(targs)
    if "fsdp" in m["config"]:
        assert (launch.sharding, launch.param_dtype) == ("fsdp", margs.bnb_4bit_quant_storage)
        margs.bnb_4bit_quant_storage = "uint8"
        with pytest.raises(LaunchError, match="bnb_4bit_quant_storage=uint8"):
            check_launch(margs, targs)
    else:
        assert launch.sharding is None, f"{m['config']} shards parameters ({launch.name})"


def test_backbone_dirs_have_a_config() -> None:
    """Every recipe directory whose recipes name a hub model ships that model's config.json."""
    from qrm.config import load_recipe_file

    for d in sorted({p.parent for p in RECIPES}):
        models = {load_recipe_file(p)["model_name_or_path"] for p in d.glob("*.yaml")}
        if all(_local_backbone(m) for m in models):
            continue
        assert (d / "config.json").is_file(), f"{_rel(d)}: ship the backbone's config.json (no weights)"
        hub = {m for m in models if not _local_backbone(m)}  # beside it, an offline copy (pkg:) may be named
        assert len(hub) == 1, f"{_rel(d)}: one backbone per directory, got {hub}"


@pytest.mark.parametrize("backbone", BACKBONES, ids=[d.name for d in BACKBONES])
def test_config_json_loads(backbone: Path) -> None:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(backbone)
    raw = json.loads((backbone / "config.json").read_text())
    assert cfg.model_type == raw["model_type"]
    assert cfg.hidden_size == raw["hidden_size"] and cfg.num_hidden_layers == raw["num_hidden_layers"]


def _pairs(path: Path, n: int = 16) -> Path:
    words = "the assistant answers the question helpfully and honestly while the other answer is rude or wrong".split()
    rows = [
        {
            "prompt": " ".join(words[k % 7 : k % 7 + 6]),
            "chosen": " ".join(words[3 : 12 - k % 3]),
            "rejected": " ".join(words[10 : 16 - k % 2]),
        }
        for k in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# one recipe per backbone: the config.json is what differs, the other recipes share it
SHRUNK = [next(p for p in GPU_RECIPES if p.parent == d) for d in BACKBONES]


@pytest.mark.parametrize("recipe", SHRUNK, ids=[p.parent.name for p in SHRUNK])
def test_recipe_trains_two_steps_shrunk(recipe: Path, tmp_path: Path) -> None:
    """The recipe's own architecture (its config.json, shrunk to 2 layers x 64) in 4 bit + LoRA, 2 steps on CPU."""
    import math

    from transformers import AutoConfig

    from benchmarks.tiny import build_tiny_model
    from qrm.config import parse_recipe
    from qrm.train import train

    data = _pairs(tmp_path / "pairs.jsonl")
    texts = [" ".join(json.loads(line).values()) for line in data.read_text().splitlines()] * 5
    model_dir = build_tiny_model(tmp_path / "model", AutoConfig.from_pretrained(recipe.parent), texts)
    overrides = {
        "model_name_or_path": str(model_dir),
        "dataset": str(data),
        "dataset_format": "explicit",
        "eval_dataset": "",
        "eval_strategy": "no",
        "save_strategy": "no",
        "max_steps": "2",
        "per_device_train_batch_size": "2",
        "gradient_accumulation_steps": "1",
        "max_length": "64",
        "lora_r": "4",
        "lora_alpha": "8",
        "logging_steps": "1",
        "output_dir": str(tmp_path / "out"),
    }
    argv = ["--recipe", str(recipe)] + [x for k, v in overrides.items() for x in (f"--{k}", v)]
    margs, largs, dargs, targs = parse_recipe(argv)
    assert margs.load_in_4bit and largs.lora_target_modules == ["all-linear"]
    metrics = train(margs, largs, dargs, targs)
    assert metrics["global_step"] == 2
    assert math.isfinite(metrics["train_loss"])
    assert (tmp_path / "out" / "adapter_config.json").is_file()
