#!/usr/bin/env python
"""Merge a qrm adapter into a standalone reward model and verify it: `python scripts/merge.py --adapter DIR --out DIR`.

Same as `qrm merge`; see `--help`. Exit status 0: written and verified; 1: written but verification failed;
2: nothing written (bad input)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Run `qrm merge` with the given (or command-line) arguments."""
    # Imported here so `--help` and import checks stay cheap; torch loads only when merging.
    from qrm.cli import run  # one handler for every command: exit codes and one-line errors as `qrm merge`

    return run("merge", sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
    sys.exit(main())
