"""Train a reward model: `accelerate launch scripts/train.py --recipe recipes/<backbone>/<recipe>.yaml [--field value]`.

Same code path as `qrm train`."""

import sys


def main() -> int:
    from qrm.train import main as train_main

    return train_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
