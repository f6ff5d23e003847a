"""The `qrm` command: one subcommand per concern, each implemented by its module's `main(argv)`."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("qrm.train", "train a reward model from a recipe"),
    "plan": ("qrm.plan", "estimate peak GPU memory for a recipe before launch"),
    "eval": ("qrm.evaluate", "accuracy, calibration, length bias and probes for a trained model"),
    "merge": ("qrm.export", "merge the adapter into a standalone model and verify it"),
    "score": ("qrm.export", "score (prompt, response) rows or pairs with a model"),
    "push": ("qrm.hub", "push a model or adapter to the Hugging Face Hub"),
    "bench": ("qrm.bench", "time qrm against TRL's RewardTrainer on the same model and data"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: qrm <command> [options]\n\ncommands:")
        for name, (_, help_) in COMMANDS.items():
            print(f"  {name:<7}{help_}")
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"qrm: unknown command {cmd!r}; one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[cmd][0])
    entry = getattr(module, f"{cmd}_main", None) or module.main
    return int(entry(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
