"""Test-only driver for multi-process runs: `qrm train` under `accelerate launch`, with per-rank fault injection and a
record of what each rank wrote and scored (never imported by qrm itself).

    accelerate launch --cpu --num_processes 2 tests/mp_driver.py --record DIR [--fault SPEC [--fault-rank R]] ARGS

`--fault hang-after-save:K` stops every rank right after checkpoint-K is published and writes `DIR/hung-rank<R>`;
the test then SIGKILLs the whole job (launcher and every rank), as a lost node or a batch system's OOM killer would.
`--fault signal-at-step:K:TERM` sends SIGTERM to rank R only (tests/fault_driver.py's `Fault`), as a preempted node
would. `--record DIR` writes `DIR/rank<R>.json`: the files this rank created, replaced or removed under output_dir
(Python's audit events, plus torch.save and safetensors, which write from C++/Rust), the eval pairs it scored
and the exit code `qrm.train.main` returned on it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from fault_driver import Fault, add_callback_to_trainer  # run as a script, so tests/ is on sys.path
from transformers import TrainerCallback

RANK = int(os.environ.get("RANK", 0))
WRITE_EVENTS = {"os.rename", "os.remove", "os.mkdir", "shutil.copyfile", "shutil.rmtree", "os.link", "os.symlink"}


class HangAfterSave(TrainerCallback):
    """Stop this rank for good once checkpoint-K is on disk, telling the test it may kill the job now."""

    def __init__(self, step: int, record: Path) -> None:
        self.step, self.record = step, record

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            sys.stdout.flush()
            (self.record / f"hung-rank{RANK}").write_text(str(os.getpid()))
            while True:  # until the SIGKILL
                time.sleep(60)


class Recorder:
    """What this rank wrote under `root` and which eval pairs it scored."""

    def __init__(self, root: str, path: Path) -> None:
        self.root, self.path = os.path.realpath(root), path
        self.writes: list[str] = []
        self.scored: list[str] = []
        self.rc: int | None = None

    def _note(self, target: Any) -> None:
        try:
            full = os.path.realpath(os.fspath(target))
        except TypeError:
            return
        if full.startswith(self.root) and not (os.path.isdir(full) and full == self.root):
            self.writes.append(os.path.relpath(full, self.root))

    def audit(self, event: str, args: tuple) -> None:
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            mode = args[1] if len(args) > 1 and isinstance(args[1], str) else "r"
            flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
            if any(c in mode for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                self._note(args[0])
        elif event in WRITE_EVENTS and args:
            for target in args[1:2] if event in ("os.rename", "shutil.copyfile", "os.link") else args[:1]:
                self._note(target)

    def dump(self) -> None:
        self.path.write_text(json.dumps({"rank": RANK, "rc": self.rc, "writes": self.writes, "scored": self.scored}))


def _install_recorder(rec: Recorder) -> None:
    import safetensors.torch
    import torch

    import qrm.reward_model

    sys.addaudithook(rec.audit)
    save, save_file, score = torch.save, safetensors.torch.save_file, qrm.reward_model.score_pair_rows

    def torch_save(obj: Any, f: Any, *a: Any, **k: Any) -> Any:
        if isinstance(f, (str, os.PathLike)):
            rec._note(f)
        return save(obj, f, *a, **k)

    def st_save_file(tensors: Any, filename: Any, *a: Any, **k: Any) -> Any:
        rec._note(filename)
        return save_file(tensors, filename, *a, **k)

    def score_pair_rows(model: Any, rows: Any, *a: Any, **k: Any) -> Any:
        rec.scored.extend(json.dumps([r["chosen_ids"], r["rejected_ids"]]) for r in rows)
        return score(model, rows, *a, **k)

    torch.save, safetensors.torch.save_file, qrm.reward_model.score_pair_rows = (
        torch_save,
        st_save_file,
        score_pair_rows,
    )
    import peft.peft_model
    import transformers.modeling_utils

    # they imported save_file by name before this ran
    peft.peft_model.safe_save_file = transformers.modeling_utils.safe_save_file = st_save_file


def main(argv: list[str]) -> int:
    import qrm.train as qtrain

    opts: dict[str, str] = {}
    while argv and argv[0] in ("--fault", "--fault-rank", "--record"):
        opts[argv[0]], argv = argv[1], argv[2:]
    rec = None
    if "--record" in opts:
        out = argv[argv.index("--output_dir") + 1]
        rec = Recorder(out, Path(opts["--record"]) / f"rank{RANK}.json")
        _install_recorder(rec)
    callback = None
    spec = opts.get("--fault")
    if spec and spec.startswith("hang-after-save:"):  # every rank
        callback = HangAfterSave(int(spec.split(":")[1]), Path(opts["--record"]))
    elif spec and RANK == int(opts.get("--fault-rank", 0)):
        callback = Fault(spec)
    add_callback_to_trainer(callback)
    rc = None
    try:
        rc = qtrain.main(argv)
        return rc
    finally:
        if rec is not None:
            rec.rc = rc
            rec.dump()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
