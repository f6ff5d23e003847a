"""Plain vs ODIN (`length_debias: odin`) on the offline demo: the README's "Length bias: ODIN" table.

Trains recipes/demo/minilm_hh_helpful.yaml as shipped (length-grouped batches) and with random batches (the ODIN
recipe's sampler, the same-sampler baseline), and recipes/demo/minilm_hh_helpful_odin.yaml (the plain recipe plus the
ODIN block and random batches); runs `qrm eval --probes` on the held-out split for each, and prints a markdown table:
held-out accuracy, Spearman of reward with response length, accuracy when the chosen response is the shorter /
longer one, ECE and the three probe sets. Runs go in parallel, one torch thread each (sized for a 2-core CPU).

    python benchmarks/length_debias.py --out outputs/length-debias
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

RECIPES = {
    "plain": "recipes/demo/minilm_hh_helpful.yaml",
    "plain-random": "recipes/demo/minilm_hh_helpful.yaml --train_sampling_strategy random",
    "odin": "recipes/demo/minilm_hh_helpful_odin.yaml",
}
TEST = "data/hh-rlhf-helpful/helpful-base.test.jsonl"


def _run(name: str, out: Path, env: dict[str, str]) -> subprocess.Popen:
    cmd = (
        f"qrm train --recipe {RECIPES[name]} --output_dir {out / name} && "
        f"qrm eval --model {out / name} --data {TEST} --probes --out {out / name / 'eval-probes'} --force"
    )
    log = open(out / f"{name}.log", "w")
    return subprocess.Popen(["bash", "-c", cmd], stdout=log, stderr=subprocess.STDOUT, env=env)


def table(out: Path) -> str:
    """The markdown table from the two runs' `eval-probes/metrics.json`."""
    lines = []
    for name in RECIPES:
        m = json.loads((out / name / "eval-probes" / "metrics.json").read_text())
        probes = m["extra"]["probes"]
        if not lines:
            head = ["run", "held-out accuracy", "Spearman(reward, length)", "acc. chosen shorter", "acc. chosen longer"]
            head += ["ECE", *probes]
            lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        short, long_ = m["accuracy_when_chosen_shorter"], m["accuracy_when_chosen_longer"]
        cells = [
            name,
            f"{m['accuracy']:.3f}",
            f"{m['length_reward_spearman']:+.3f}",
            f"{short['accuracy']:.3f} (n={short['n']})",
            f"{long_['accuracy']:.3f} (n={long_['n']})",
            f"{m['ece']:.3f}",
            *(f"{g['accuracy']:.3f} ({round(g['accuracy'] * g['n'])}/{g['n']})" for g in probes.values()),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Train both, evaluate both, print and write `<out>/summary.md`."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="outputs/length-debias")
    p.add_argument("--table-only", action="store_true", help="only rebuild the table from finished runs")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if not a.table_only:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        procs = {name: _run(name, out, env) for name in RECIPES}
        failed = [name for name, proc in procs.items() if proc.wait() != 0]
        if failed:
            print(f"failed: {failed}; see {out}/<run>.log", file=sys.stderr)
            return 1
    text = table(out)
    (out / "summary.md").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
