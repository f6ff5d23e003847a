#!/usr/bin/env python
"""Score rows or preference pairs with a qrm export or adapter dir:
`python scripts/score.py --model DIR --data FILE [--out rewards.jsonl]`.

Same as `qrm score`; see `--help`. Writes one JSON line per input row."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Run `qrm score` with the given (or command-line) arguments."""
    from qrm.cli import run  # one handler for every command: exit codes and one-line errors as `qrm score`

    return run("score", sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
    sys.exit(main())
