"""Test-only driver: `qrm train` with a fault injected at a chosen step (never imported by qrm itself).

    python tests/fault_driver.py --fault kill-after-save:K  [qrm train arguments]
    python tests/fault_driver.py --fault signal-at-step:K:TERM  [qrm train arguments]

`kill-after-save:K` SIGKILLs the process right after checkpoint-K is published (the `on_save` callback runs after
the save returned), as an OOM killer or a lost node would. `signal-at-step:K:SIG` sends SIG to the process when
optimizer step K begins, as SLURM or a spot-instance reclaim would. Without `--fault` it is plain `qrm train`.
The training goes through `qrm.train.main`, so it uses whatever trainer, sampler and collator qrm uses.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from transformers import TrainerCallback


class Fault(TrainerCallback):
    """Kill or signal this process at a chosen optimizer step."""

    def __init__(self, spec: str) -> None:
        kind, step, *rest = spec.split(":")
        self.kind, self.step = kind, int(step)
        self.sig = getattr(signal, f"SIG{rest[0]}") if rest else signal.SIGKILL
        if kind not in ("kill-after-save", "signal-at-step"):
            raise SystemExit(f"unknown fault {spec!r}")

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.kind == "kill-after-save" and state.global_step == self.step:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # global_step counts finished optimizer steps, so step K begins when it reads K - 1.
        if self.kind == "signal-at-step" and state.global_step == self.step - 1:
            os.kill(os.getpid(), self.sig)


def main(argv: list[str]) -> int:
    import qrm.train as qtrain

    fault = None
    if argv[:1] == ["--fault"]:
        fault, argv = Fault(argv[1]), argv[2:]
    add_callback_to_trainer(fault)
    return qtrain.main(argv)


def add_callback_to_trainer(callback: TrainerCallback | None) -> None:
    """Make `qrm.train.build_trainer` add `callback` (when given) to every trainer it builds."""
    import qrm.train as qtrain

    build = qtrain.build_trainer

    def build_with_callback(*args: Any, **kwargs: Any) -> Any:
        trainer, prepared = build(*args, **kwargs)
        if callback is not None:
            trainer.add_callback(callback)
        return trainer, prepared

    qtrain.build_trainer = build_with_callback


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
