"""A rank that dies (tests/test_oracle_ranks_cli.py): the oracle's CLI, except that rank
VPD_TEST_DIE_RANK kills itself (SIGKILL, no cleanup) before training step VPD_TEST_DIE_STEP.
Run as `python -m tests.rank_fault train CONFIG ...` under a launcher; the product code is
untouched (the fault is patched in here)."""
from __future__ import annotations

import os
import signal
import sys

from oracle_torch import backend, cli

_train_step = backend.OracleBackend.train_step


def _dying_train_step(self, state, step, batch, draws=None, probe=None):
    if self.ranks.rank == int(os.environ["VPD_TEST_DIE_RANK"]) and step == int(os.environ["VPD_TEST_DIE_STEP"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return _train_step(self, state, step, batch, draws, probe)


backend.OracleBackend.train_step = _dying_train_step

if __name__ == "__main__":
    sys.exit(cli.main())
