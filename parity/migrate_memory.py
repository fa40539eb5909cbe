"""Peak memory of the streaming verifier against a load-everything comparison (SPEC S133).

    python -m parity.migrate_memory [--features 2048] [--C 2048] [--dir DIR]

Builds a synthetic oracle checkpoint big enough that holding a tree shows (a TMS-shaped
target of `--features` x `--features/2` with two sites of `--C` components, float64, one
training step so both AdamW groups hold moments: with the defaults ~290 MB per checkpoint,
largest leaf 32 MB), migrates it to JAX, and to the oracle's sharded format (DCP, for 2
ranks) which is migrated to JAX in turn, then runs fresh processes and prints each one's
peak resident set (VmHWM of /proc/self/status), for the pair oracle one-process / JAX and
again for oracle DCP / JAX:
- `baseline`: imports and opens both checkpoints, loads no leaf;
- `streaming`: `python -m parity.verify SRC DST` (one leaf pair at a time);
- `load-all`: the same comparison with `--load-all` (both trees held);
and, for the DCP checkpoint alone, `dcp-leaf`: the peak before and after loading its
largest leaf through `DcpReader.load` (one key, whole, no process group).
The directory is removed afterwards unless `--dir` is given."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

CHILD = r"""
import json, math, os, sys
os.environ.setdefault("JAX_PLATFORMS", "cpu")
mode, src, dst = sys.argv[1:4]
from parity.verify import main
from parity.migrate_io import open_checkpoint
def hwm():  # VmHWM: this process image's peak resident set (ru_maxrss would carry the parent's peak across exec)
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 1024
if mode == "baseline":
    a, b = open_checkpoint(src), open_checkpoint(dst)
    a.leaves(); b.leaves()
    rc = 0
elif mode == "dcp-leaf":
    a = open_checkpoint(src)
    info = a.leaves()
    size = lambda n: math.prod(info[n].shape)
    a.load(min(info, key=size))  # DCP's first-call setup outside the measured read
    name = max(info, key=size)
    before = hwm()
    x = a.load(name)
    print(json.dumps({"mode": mode, "rc": 0, "peak_rss_mb": hwm(), "before_mb": before, "leaf_mb": x.nbytes / 2**20}))
    sys.exit(0)
else:
    rc = main([src, dst] + (["--load-all"] if mode == "load-all" else []), out=lambda line: None)
print(json.dumps({"mode": mode, "rc": rc, "peak_rss_mb": hwm()}))
"""


def build(d: Path, features: int, C: int) -> tuple[Path, Path, Path, Path]:
    """(oracle checkpoint, its JAX migration, its migration to the oracle's sharded format
    for 2 ranks, that one's JAX migration) of the synthetic run in `d`."""
    from safetensors.numpy import save_file

    from contract.data import batch_for_step
    from loop.backends import make_backend
    from parity.migrate import migrate
    from tests.helpers import run_of, tms_config

    hidden = features // 2
    g = np.random.default_rng(0)
    w = (g.standard_normal((hidden, features)) / np.sqrt(features)).astype(np.float32)
    save_file({"linear1.weight": w, "linear2.weight": np.ascontiguousarray(w.T),
               "linear2.bias": np.zeros(features, np.float32)}, str(d / "big.safetensors"))
    (d / "big.json").write_text(json.dumps({"kind": "tms", "training": {}, "config": {
        "n_features": features, "n_hidden": hidden, "feature_probability": 0.01}}))
    cfg = tms_config(str(d / "big.safetensors"), sites=[{"pattern": "linear1", "C": C}, {"pattern": "linear2", "C": C}],
                     runtime={"dtype": "float64", "draws": "contract"}, batch_size=2, steps=2, eval={"every": 0})
    run = run_of(cfg)
    b = make_backend("torch", run)
    state, _ = b.train_step(b.new_state(), 0, batch_for_step(run, 0, 0))
    src = b.save_checkpoint(d / "oracle", state, 1, {})
    del state, b
    dcp = migrate(src, "torch", d / "dcp", mesh_data=2)
    return src, migrate(src, "jax", d / "jax"), dcp, migrate(dcp, "jax", d / "dcp_jax", mesh_data=1)


def measure(src: Path, dst: Path, modes=("baseline", "streaming", "load-all")) -> list[dict]:
    out = []
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    for mode in modes:
        p = subprocess.run([sys.executable, "-c", CHILD, mode, str(src), str(dst)], capture_output=True, text=True, env=env)
        if p.returncode != 0:
            raise RuntimeError(f"{mode}: exit {p.returncode}\n{p.stderr[-2000:]}")
        out.append(json.loads(p.stdout.strip().splitlines()[-1]))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="parity.migrate_memory", description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--features", type=int, default=2048)
    ap.add_argument("--C", type=int, default=2048)
    ap.add_argument("--dir", help="keep the checkpoints here (default: a temp dir, removed)")
    a = ap.parse_args(argv)
    d = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="vpd-migrate-mem-"))
    d.mkdir(parents=True, exist_ok=True)
    try:
        src, dst, dcp, dcp_dst = build(d, a.features, a.C)
        size = {k: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 2**20
                for k, p in (("src", src), ("dst", dst), ("dcp", dcp))}
        from parity.migrate_io import open_checkpoint
        leaves = open_checkpoint(src).leaves()
        big = max(int(np.prod(li.shape)) * np.dtype(li.dtype).itemsize for li in leaves.values()) / 2**20
        print(f"checkpoints: oracle {size['src']:.0f} MB, oracle DCP {size['dcp']:.0f} MB, JAX {size['dst']:.0f} MB; "
              f"{len(leaves)} oracle leaves, largest {big:.0f} MB")
        for label, s, t in (("oracle one-process / JAX", src, dst), ("oracle DCP / JAX", dcp, dcp_dst)):
            print(label)
            for r in measure(s, t):
                print(f"  {r['mode']:<10} peak RSS {r['peak_rss_mb']:8.0f} MB  (verifier exit {r['rc']})")
        r = measure(dcp, dcp_dst, ("dcp-leaf",))[0]
        print(f"DCP leaf read: {r['leaf_mb']:.0f} MB leaf, peak RSS {r['before_mb']:.0f} MB -> {r['peak_rss_mb']:.0f} MB "
              f"(+{r['peak_rss_mb'] - r['before_mb']:.0f} MB)")
    finally:
        if not a.dir:
            shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
