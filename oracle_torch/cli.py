"""vpd-oracle: train with the torch oracle (one process, or N data ranks with
runtime.mesh.data: N, oracle_torch/launch.py). The command line is the shared one of
loop/cli.py; see there (or `--help`) for the options and exit codes."""
from __future__ import annotations

import sys

from loop import cli


def main(argv: list[str] | None = None) -> int:
    return cli.main("torch", argv)


if __name__ == "__main__":
    sys.exit(main())
