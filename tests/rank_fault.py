"""A rank that dies (tests/test_oracle_ranks_cli.py): the oracle's CLI, except that rank
VPD_TEST_DIE_RANK kills itself (SIGKILL, no cleanup) before training step VPD_TEST_DIE_STEP,
or, with VPD_TEST_DIE_IN_SAVE set, instead of writing its shards of the checkpoint of that
step. Run as `python -m tests.rank_fault train CONFIG ...` under a launcher; the product
code is untouched (the fault is patched in here)."""
from __future__ import annotations

import os
import signal
import sys

from oracle_torch import backend, cli, sharded_checkpoint

RANK, STEP, IN_SAVE = int(os.environ["VPD_TEST_DIE_RANK"]), int(os.environ["VPD_TEST_DIE_STEP"]), "VPD_TEST_DIE_IN_SAVE" in os.environ
_train_step, _write_shards = backend.OracleBackend.train_step, sharded_checkpoint.write_shards


def _dying_train_step(self, state, step, batch, draws=None, probe=None):
    if self.ranks.rank == RANK and step == STEP and not IN_SAVE:
        os.kill(os.getpid(), signal.SIGKILL)
    return _train_step(self, state, step, batch, draws, probe)


def _dying_write_shards(tmp, tensors):
    if int(os.environ["RANK"]) == RANK and IN_SAVE and f"step_{STEP:08d}" in tmp.name:
        os.kill(os.getpid(), signal.SIGKILL)
    _write_shards(tmp, tensors)


backend.OracleBackend.train_step = _dying_train_step
sharded_checkpoint.write_shards = _dying_write_shards

if __name__ == "__main__":
    sys.exit(cli.main())
