"""Regenerate goldens after a sanctioned change: runs the ORACLE for the named cases (or
all), rewrites them, prints old-vs-new deltas, appends the reason to goldens/CHANGELOG.md.
`--update-lock` is the sanctioned way to change oracle_torch/: it rewrites
goldens/oracle.lock in the same logged step.

  python -m parity.regen --reason "why" [--cases NAME ...] [--update-lock]
"""
from __future__ import annotations

import argparse
import datetime
import sys

from parity.cases import CASES
from parity.degeneracy import degeneracy_problems, zero_gradient_groups
from parity.goldens import GOLDENS, case_dir, load_golden, rel_err, write_golden
from parity.lock import lock_problem, write_lock
from parity.runners import run_oracle


def _deltas(old, records) -> list[tuple[float, str, float, float]]:
    out = []
    # the steps both runs have (a regeneration may change a case's number of steps)
    for k, (o, n) in enumerate(zip(old.trajectory, records, strict=False)):
        for key in set(o) & set(n):
            out.append((rel_err(float(o[key]), float(n[key]), 1e-12), f"step {k} {key}", o[key], n[key]))
    return sorted(out, reverse=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m parity.regen", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reason", required=True, help="why the goldens change (logged)")
    ap.add_argument("--cases", nargs="*", help="case names (default: all)")
    ap.add_argument("--update-lock", action="store_true", help="sanction a change of oracle_torch/ (rewrites goldens/oracle.lock)")
    a = ap.parse_args(argv)
    if not a.reason.strip():
        ap.error("--reason must say why")
    names = a.cases or list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        print(f"unknown case(s): {unknown}; known: {sorted(CASES)}", file=sys.stderr)
        return 2
    problem = lock_problem()
    if problem and not a.update_lock:
        print(f"refusing to regenerate: {problem}", file=sys.stderr)
        return 2
    date = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    if a.update_lock:
        lock = write_lock(a.reason, date)
        print(f"oracle lock updated: {lock['oracle_hash'][:16]}")
    log = [f"\n## {date} — {a.reason}\n", f"cases: {', '.join(names)}" + (" (oracle lock updated)" if a.update_lock else "") + "\n"]
    refused: list[str] = []
    for name in names:
        case = CASES[name]
        old = load_golden(name) if (case_dir(name) / "manifest.json").exists() else None
        records, grads, warm = run_oracle(case.inputs())
        degenerate = degeneracy_problems(case.run(), case.init()) + zero_gradient_groups(records)
        if degenerate:  # S153: a case that checks nothing about its masks, sources or a group gets no golden
            print(f"{name}: refused, degenerate case (no golden written):\n  " + "\n  ".join(degenerate), file=sys.stderr)
            log.append(f"- {name}: refused (degenerate)\n")
            refused.append(name)
            continue
        write_golden(case, records, grads, warm, a.reason)
        if old is None:
            print(f"{name}: new golden ({len(records)} steps)")
            log.append(f"- {name}: new\n")
            continue
        d = _deltas(old, records)
        worst = d[0] if d else (0.0, "-", None, None)
        if worst[0] == 0.0:
            print(f"{name}: unchanged (every value bit-identical)")
            log.append(f"- {name}: unchanged\n")
            continue
        print(f"{name}: largest rel change {worst[0]:.2e} at {worst[1]} ({worst[2]} -> {worst[3]})")
        for e, where, o, n in d[1:4]:
            if e > 0:
                print(f"    {e:.2e} at {where} ({o} -> {n})")
        log.append(f"- {name}: largest rel change {worst[0]:.2e} at {worst[1]}\n")
    with open(GOLDENS / "CHANGELOG.md", "a") as f:
        f.writelines(log)
    return 2 if refused else 0


if __name__ == "__main__":
    sys.exit(main())
