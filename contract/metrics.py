"""Metric names shared by both backends and the training loop (framework-free).

A metrics line of the loop holds the metrics of one training step (`loss/*`, `grad_norm/*`,
`param_norm/*`, `l0/*`, `sched/*`) and/or one eval (`eval/*`); both backends name them the
same way so their metrics.jsonl files read alike and the parity harness compares them key
by key (SPEC S60)."""
from __future__ import annotations

from collections.abc import Iterable

from contract.resolve import ResolvedRun
from contract.schedules import hparams

# the five masks the eval measures the output loss under (SPEC S87)
EVAL_VARIANTS = ("ci", "stochastic", "unmasked", "rounded", "zero")


def term_key(i: int, t) -> str:
    """The metric key of loss term `i` (`loss/<term_key>`): its index and type."""
    return f"{i}.{t.type}"


def metric_order(run: ResolvedRun, param_names: Iterable[str]) -> dict[str, int]:
    """Rank of every metric key in the order a metrics line is written: eval metrics, then the
    step's losses, gradient norms, parameter norms, L0, schedule values, warmup notes.
    `param_names`: the trainable tensors in init order (contract/init.py)."""
    cfg = run.cfg
    keys = [f"eval/l0/{s.name}" for s in run.sites]
    if cfg.target.kind == "llama":
        keys.append("eval/ce/target")
        for v in EVAL_VARIANTS:
            keys += [f"eval/kl/{v}", f"eval/ce/{v}"]
        keys.append("eval/pgd/kl")
    else:
        keys += [f"eval/mse/{v}" for v in EVAL_VARIANTS] + ["eval/pgd/mse"]
    keys += [f"loss/{term_key(i, t)}" for i, t in enumerate(cfg.loss_terms)] + ["loss/total"]
    keys += [f"grad_norm/{n}" for n in param_names if not n.startswith("sources.")]
    keys += ["grad_norm/components", "grad_norm/ci_fn"]
    for t in run.recon_terms:  # persistent PGD bundles (S84)
        if t.source == "persistent_pgd":
            keys += [f"grad_norm/sources.{t.bundle}.{s.name}" for s in run.sites] + [f"param_norm/sources.{t.bundle}"]
    keys += ["param_norm/components", "param_norm/ci_fn"] + [f"l0/{s.name}" for s in run.sites]
    keys += [f"sched/{k}" for k in hparams(cfg, 0)]
    keys += ["warmup/faithfulness_first", "warmup/faithfulness_last"]
    return {k: i for i, k in enumerate(keys)}


def ordered(line: dict, order: dict[str, int]) -> dict:
    """`line` with its keys in `order` (keys it does not know last, in their given order)."""
    return dict(sorted(line.items(), key=lambda kv: order.get(kv[0], len(order))))
