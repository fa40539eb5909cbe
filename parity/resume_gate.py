"""Resume inside the gate (SPEC S155): the first half of a resume test, run in its own process.

`parity/test_resume_parity.py` writes a parity case's config with `runtime.draws: contract`
(the training loop then feeds each step the harness's numpy draws, S131, so the run is the
case's golden trajectory), runs

    python -m parity.resume_gate --backend torch|jax --config CFG --out DIR --stop-after K

which trains through the one training loop (`loop/train.py`) and sends itself SIGTERM after
step K: the loop stops there and saves a checkpoint of step K + 1, as on a real preemption.
The test then resumes with the backend's own CLI (`python -m <backend>.cli train CFG --out
DIR`) in a fresh process and compares the whole metrics.jsonl with the uninterrupted golden."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys


class _StopAfter:
    """A backend whose `train_step` sends this process SIGTERM after step `after`; every other
    member is the wrapped backend's."""

    def __init__(self, backend, after: int):
        self._backend, self._after = backend, after
        self.name, self.prog, self.run, self.primary = backend.name, backend.prog, backend.run, backend.primary

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def train_step(self, state, step, batch, draws=None, probe=None):
        out = self._backend.train_step(state, step, batch, draws, probe)
        if step == self._after:
            os.kill(os.getpid(), signal.SIGTERM)
        return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m parity.resume_gate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["torch", "jax"], required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--stop-after", type=int, required=True, help="the last step trained before the stop")
    a = ap.parse_args(argv)
    from contract.runlog import load_run
    run = load_run(a.config)
    if a.backend == "jax" and run.cfg.runtime.dtype == "float64":
        import jax
        jax.config.update("jax_enable_x64", True)
    if a.backend == "torch":
        import torch
        torch.set_num_threads(1)
    from loop.backends import make_backend
    from loop.train import train
    summary = train(_StopAfter(make_backend(a.backend, run), a.stop_after), a.out, progress=False)  # pyright: ignore[reportArgumentType]
    print(json.dumps({k: summary[k] for k in ("start_step", "step", "interrupted", "signal", "last_checkpoint")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
