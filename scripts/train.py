"""Train a reward model: `accelerate launch scripts/train.py --recipe recipes/<backbone>/<recipe>.yaml [--field value]`.

Same code path as `qrm train`."""

import sys


def main() -> int:
    from qrm.cli import run  # one handler for every command: exit codes and one-line errors as `qrm train`

    return run("train", sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
