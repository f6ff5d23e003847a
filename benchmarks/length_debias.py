"""Plain vs `length_debias: erase` vs `length_debias: odin`, each switched on over a shipped recipe and nothing else
changed: the README's "Length bias" table.

Sets (each a shipped recipe, its held-out split, `qrm eval --probes` afterwards):
  helpful   recipes/demo/minilm_hh_helpful.yaml    MiniLM, 1,431 HH-RLHF helpful-base pairs, 527 held out (humans)
  tulu2     recipes/demo/minilm_tulu2_ratings.yaml MiniLM, 286 tulu-2 best-vs-worst pairs, 126 held out (AI judge)
  gemma     recipes/gemma-3-270m/hh_helpful_cpu.yaml  Gemma 3 270M (real decoder), 948 helpful pairs, 526 held out

Per run: held-out accuracy (95% CI) and its change from plain, Spearman(reward, response length), accuracy when the
chosen response is the shorter / the longer one, ECE, the three probe sets, training seconds. Runs go `--jobs` at a
time with one torch thread each (sized for a 2-core CPU); a run whose `eval-probes/metrics.json` exists is kept (rerun
with `--fresh` to train it again), so an interrupted benchmark picks up where it stopped.

    python benchmarks/length_debias.py --sets helpful tulu2 --out outputs/length-debias
    python benchmarks/length_debias.py --sets gemma --out outputs/length-debias     # ~45 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SETS = {
    "helpful": ("recipes/demo/minilm_hh_helpful.yaml", "data/hh-rlhf-helpful/helpful-base.test.jsonl"),
    "tulu2": ("recipes/demo/minilm_tulu2_ratings.yaml", "data/tulu2-bon-ratings/test.jsonl"),
    "gemma": ("recipes/gemma-3-270m/hh_helpful_cpu.yaml", "data/hh-rlhf-helpful/helpful-base.test.jsonl"),
}
METHODS = ("none", "erase", "odin")


def _command(name: str, method: str, run: Path) -> str:
    recipe, test = SETS[name]
    return (
        f"qrm train --recipe {recipe} --length_debias {method} --output_dir {run} && "
        f"qrm eval --model {run} --data {test} --probes --out {run / 'eval-probes'} --force"
    )


def _row(name: str, method: str, run: Path, plain: dict | None) -> list[str]:
    m = json.loads((run / "eval-probes" / "metrics.json").read_text())
    trained = json.loads((run / "metrics.json").read_text())
    short, long_ = m["accuracy_when_chosen_shorter"], m["accuracy_when_chosen_longer"]
    lo, hi = m["accuracy_ci95"]
    delta = "" if plain is None else f" ({100 * (m['accuracy'] - plain['accuracy']):+.1f})"
    dshort = (
        ""
        if plain is None
        else f" ({100 * (short['accuracy'] - plain['accuracy_when_chosen_shorter']['accuracy']):+.1f})"
    )
    return [
        name,
        method,
        f"{m['accuracy']:.3f}{delta} [{lo:.3f}, {hi:.3f}]",
        f"{m['length_reward_spearman']:+.3f}",
        f"{short['accuracy']:.3f}{dshort} (n={short['n']})",
        f"{long_['accuracy']:.3f} (n={long_['n']})",
        f"{m['ece']:.3f}",
        *(f"{round(g['accuracy'] * g['n'])}/{g['n']}" for g in m["extra"]["probes"].values()),
        f"{trained['train_runtime_s']:.0f}",
    ]


def table(out: Path, sets: list[str]) -> str:
    """The markdown table from the finished runs' `eval-probes/metrics.json` (plain first in each set)."""
    probes = None
    rows = []
    for name in sets:
        plain = None
        for method in METHODS:
            run = out / name / method
            if not (run / "eval-probes" / "metrics.json").is_file():
                continue
            m = json.loads((run / "eval-probes" / "metrics.json").read_text())
            probes = probes or list(m["extra"]["probes"])
            rows.append(_row(name, method, run, plain))
            plain = m if method == "none" else plain
    head = ["set", "length_debias", "held-out accuracy (vs plain) [95% CI]", "Spearman(reward, length)"]
    head += ["acc. chosen shorter (vs plain)", "acc. chosen longer", "ECE", *(probes or []), "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def _launch(todo: list[tuple[str, str]], out: Path, jobs: int) -> list[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    failed = []
    while todo or running:
        while todo and len(running) < jobs:
            name, method = todo.pop(0)
            run = out / name / method
            run.parent.mkdir(parents=True, exist_ok=True)
            log = open(out / name / f"{method}.log", "w")
            cmd = ["bash", "-c", _command(name, method, run)]
            running[f"{name}/{method}"] = (
                subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env),
                time.time(),
            )
        for key, (proc, t0) in list(running.items()):
            if proc.poll() is not None:
                del running[key]
                print(f"{key}: {'done' if proc.returncode == 0 else 'FAILED'} in {time.time() - t0:.0f} s", flush=True)
                if proc.returncode != 0:
                    failed.append(key)
        time.sleep(2)
    return failed


def main(argv: list[str] | None = None) -> int:
    """Train and evaluate what is not done yet, print the table and write `<out>/summary.md`."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sets", nargs="+", choices=list(SETS), default=["helpful", "tulu2"])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--out", default="outputs/length-debias")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one torch thread each")
    p.add_argument("--fresh", action="store_true", help="train again runs that already finished (moved aside first)")
    p.add_argument("--table-only", action="store_true", help="only rebuild the table from finished runs")
    a = p.parse_args(argv)
    out = Path(a.out)
    todo = []
    for name in a.sets:
        for method in a.methods:
            run = out / name / method
            done = (run / "eval-probes" / "metrics.json").is_file()
            if run.exists() and (a.fresh or not done) and not a.table_only:
                shutil.move(str(run), f"{run}.old-{int(time.time())}")  # never delete an earlier run
            if not a.table_only and (a.fresh or not done):
                todo.append((name, method))
    failed = _launch(todo, out, a.jobs) if todo else []
    if failed:
        print(f"failed: {failed}; see {out}/<set>/<method>.log", file=sys.stderr)
    text = table(out, a.sets)
    (out / "summary.md").write_text(text)
    print(text, end="")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
