#!/usr/bin/env python
"""`qrm serve` throughput: dynamic batching against one text per forward pass, measured in one run.

Starts two servers on the same model, `dynamic` (the defaults: batches of up to 64 texts / 16,384 tokens, 5 ms
wait) and `one-at-a-time` (`--max-batch-size 1 --max-wait-ms 0`), then sends each the same OpenRLHF-style load,
alternating rounds: `--requests` POST /get_reward requests of `--texts-per-request` HH-RLHF prompt + response
texts (OpenRLHF sends one per request), `--concurrency` in flight at a time. Prints requests/s, texts/s, latency and
the ratio dynamic ÷ one-at-a-time, checks both servers return the same rewards, and writes
benchmarks/results/serve_<device>.json (machine, versions, per-round numbers).

    python benchmarks/serve_bench.py                          # tiny random Llama export, CPU
    python benchmarks/serve_bench.py --model exports/demo-minilm
    python benchmarks/serve_bench.py --model DIR --device cuda --threads 0
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
HH_TEST = ROOT / "data" / "hh-rlhf-helpful" / "helpful-base.test.jsonl"
MODES = {"dynamic": [], "one-at-a-time": ["--max-batch-size", "1", "--max-wait-ms", "0"]}


def tiny_export(work: Path, backbone: str) -> Path:
    """A random Llama saved whole as a `*ForSequenceClassification` export: `tiny` (hidden 64, 2 layers, the tests'
    model) or `tiny-llama` (benchmarks/trl_vs_qrm.py's, hidden 256, 4 layers)."""
    out = work / f"{backbone}-export"
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from benchmarks.tiny import build_tiny_llama
    from benchmarks.trl_vs_qrm import HH_TRAIN, resolve_backbone

    if backbone == "tiny":
        with open(HH_TRAIN) as f:  # as tests/conftest.py builds it
            texts = [json.loads(line)["chosen"] for _, line in zip(range(400), f, strict=False)]
        base = build_tiny_llama(work / "models" / "tiny-llama-h64-l2", texts)
    else:
        base, _ = resolve_backbone(backbone, work, "cpu")
    hf_logging.set_verbosity_error()  # the base is saved as *ForCausalLM: its score head is new, on purpose
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(base, num_labels=1).save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


def start(model: Path, mode: str, args: argparse.Namespace, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if args.threads:  # set before torch starts its OpenMP pool
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    cmd = [sys.executable, "-m", "qrm.cli", "serve", "--model", str(model), "--port", "0", *MODES[mode]]
    cmd += ["--max-length", str(args.max_length)] + (["--device", args.device] if args.device else [])
    with open(log, "w") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def wait_url(proc: subprocess.Popen, log: Path, timeout: float = 300) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        m = re.search(r"qrm serve: (http://\S+) ", log.read_text())
        if m:
            return m.group(1)
        if proc.poll() is not None:
            raise SystemExit(f"server exited:\n{log.read_text()[-2000:]}")
        time.sleep(0.2)
    raise SystemExit(f"server not ready in {timeout} s:\n{log.read_text()[-2000:]}")


def payloads(n_requests: int, per_request: int) -> list[dict]:
    from qrm.data import split_implicit

    pairs = []
    with open(HH_TEST) as f:
        for line in f:
            row = json.loads(line)
            p, c, r = split_implicit(row["chosen"], row["rejected"])
            pairs += [(p, c), (p, r)]
    out = []
    for i in range(n_requests):
        picked = [pairs[(i * per_request + k) % len(pairs)] for k in range(per_request)]
        out.append({"query": [p + r for p, r in picked], "prompts": [p for p, _ in picked]})
    return out


async def load(url: str, bodies: list[dict], concurrency: int) -> dict:
    """Send every body with at most `concurrency` in flight; wall time, latencies and the rewards."""
    import httpx

    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = [0.0] * len(bodies)
    rewards: list[list[float]] = [[] for _ in bodies]
    retries: list[int] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def one(i: int) -> None:
            async with sem:
                t = time.perf_counter()
                for attempt in range(3):  # as OpenRLHF's client does, retry a dropped keep-alive connection
                    try:
                        resp = await client.post("/get_reward", json=bodies[i])
                        break
                    except httpx.TransportError:
                        retries.append(i)
                        if attempt == 2:
                            raise
                latencies[i] = time.perf_counter() - t
                resp.raise_for_status()
                rewards[i] = resp.json()["rewards"]

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(len(bodies))))
        wall = time.perf_counter() - t0
        health = (await client.get("/health")).json()
    texts = sum(len(b["query"]) for b in bodies)
    lat = sorted(latencies)
    return {
        "seconds": wall,
        "requests_per_s": len(bodies) / wall,
        "texts_per_s": texts / wall,
        "latency_ms_p50": 1000 * lat[len(lat) // 2],
        "latency_ms_p99": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
        "rewards": rewards,
        "retries": len(retries),
        "server": {k: health[k] for k in ("texts", "batches", "largest_batch")},
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="Export or adapter dir (default: a tiny random Llama export).")
    ap.add_argument("--backbone", default="tiny", choices=["tiny", "tiny-llama"], help="Random model without --model.")
    ap.add_argument("--device", default=None, help="Server device (default: the GPU when there is one).")
    ap.add_argument("--requests", type=int, default=256, help="Requests per round and mode.")
    ap.add_argument("--texts-per-request", type=int, default=1, help="1 = OpenRLHF's remote reward client.")
    ap.add_argument("--concurrency", type=int, default=32, help="Requests in flight at a time.")
    ap.add_argument("--rounds", type=int, default=2, help="Rounds; each runs both modes, alternating.")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1, help="Torch threads per server (0: torch's default).")
    ap.add_argument("--work", default=str(ROOT / "outputs" / "serve-bench"), help="Tiny model and logs (cached).")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import httpx

    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the `finally` that stops the servers
    work = Path(args.work)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    model = Path(args.model) if args.model else tiny_export(work, args.backbone)
    procs = {m: start(model, m, args, work / "logs" / f"serve-{m}.log") for m in MODES}
    try:
        urls = {m: wait_url(p, work / "logs" / f"serve-{m}.log") for m, p in procs.items()}
        bodies = payloads(args.requests, args.texts_per_request)
        warm = payloads(args.concurrency, args.texts_per_request)
        rounds: list[dict] = []
        for r in range(args.rounds):
            for mode in MODES if r % 2 == 0 else reversed(MODES):
                asyncio.run(load(urls[mode], warm, args.concurrency))  # connections, caches
                res = asyncio.run(load(urls[mode], bodies, args.concurrency))
                rounds.append({"round": r, "mode": mode, **res})
                print(f"round {r} {mode:>13}: {res['requests_per_s']:8.1f} req/s {res['texts_per_s']:8.1f} texts/s "
                      f"p50 {res['latency_ms_p50']:7.1f} ms p99 {res['latency_ms_p99']:7.1f} ms", flush=True)  # fmt: skip
        health = httpx.get(urls["dynamic"] + "/health").json()
    finally:
        for p in procs.values():
            p.terminate()
        codes = {m: p.wait(120) for m, p in procs.items()}
    dyn = [x for x in rounds if x["mode"] == "dynamic"]
    one = [x for x in rounds if x["mode"] == "one-at-a-time"]
    delta = max(abs(a - b) for x, y in zip(dyn, one, strict=True) for ra, rb in zip(x["rewards"], y["rewards"], strict=True) for a, b in zip(ra, rb, strict=True))  # fmt: skip
    med = lambda rows, k: statistics.median(x[k] for x in rows)  # noqa: E731
    summary = {
        k: {"dynamic": med(dyn, k), "one-at-a-time": med(one, k), "ratio": med(dyn, k) / med(one, k)}
        for k in ("requests_per_s", "texts_per_s", "latency_ms_p50", "latency_ms_p99")
    }
    summary["max_abs_reward_delta"] = delta
    summary["exit_codes_after_sigterm"] = codes
    print(f"dynamic ÷ one-at-a-time: requests/s ×{summary['requests_per_s']['ratio']:.2f}, texts/s "
          f"×{summary['texts_per_s']['ratio']:.2f}; max |Δreward| between the modes {delta:.1e}")  # fmt: skip
    return write(args, model, health, rounds, summary)


def write(args: argparse.Namespace, model: Path, health: dict, rounds: list[dict], summary: dict) -> int:
    from importlib.metadata import version

    from benchmarks.trl_vs_qrm_results import device_slug, machine_info

    device = health["device"]
    gpu = None
    if device.startswith("cuda"):
        import torch

        gpu = torch.cuda.get_device_name(0)
    versions = {p: version(p) for p in ("torch", "transformers", "fastapi", "uvicorn", "httpx")}
    info = machine_info(gpu, versions)
    slug = device_slug("cuda" if gpu else "cpu", info)
    record = {
        "benchmark": "qrm-serve",
        "schema": 1,
        "machine": info,
        "device": device,
        "model": {"path": str(model), "class": health["model"], "max_length": health["max_length"]},
        "load": {k: getattr(args, k) for k in ("requests", "texts_per_request", "concurrency", "rounds", "threads")},
        "modes": {m: f"qrm serve {' '.join(flags)}".strip() for m, flags in MODES.items()},
        "loadavg_at_end": os.getloadavg(),  # the machine is shared: both modes ran under the same load, alternating
        "summary": summary,
        "rounds": [{k: v for k, v in x.items() if k != "rewards"} for x in rounds],
    }
    shape = "" if args.texts_per_request == 1 else f"-{args.texts_per_request}-texts-per-request"
    # one file per (device, model, load shape): a run on another model never replaces the default model's record
    tag = "-" + re.sub(r"[^a-z0-9]+", "-", Path(args.model).name.lower()).strip("-") if args.model else ""
    out = Path(args.out) / f"serve_{slug}{tag}{shape}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
