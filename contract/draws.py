"""The draw plan: every random tensor one training step consumes (SPEC S50-S53).

Every draw is U[0,1); distributions the algorithm needs are derived from uniforms by
fixed rules that both backends implement identically (S50-S53):
- Bernoulli(1/2) source (binomial sampling): `u < 0.5`.
- uniform_k routing over n live sites, from `route_k [...]` and `route_order [..., n]`:
  `k = min(1 + floor(route_k * n), n)`; site i routes iff
  `#{j : route_order[j] < route_order[i]} < k` (i.e. the k smallest uniforms).
Names: `t{term}.e{entry}.d{draw}.{site}.source`, `....{site}.delta`,
`t{term}.e{entry}.d{draw}.route_k`, `....route_order`, `binomial.{site}`, and for fresh
PGD with init 'random' `t{term}.e{entry}.d0.{site}.pgd_init` (scope shape, S81). The
persistent-PGD source init (U[0,1), at start) is part of the initial state
(contract/init.py: `sources.<bundle>.<site>`).

Production: each backend samples the plan itself inside the step. Parity: the harness
samples it once with `sample_numpy` keyed by (seed, step, name) and feeds both.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from contract.adversary import n_channels, source_shape
from contract.config import FreshPGDTerm
from contract.resolve import ResolvedRun


@dataclass(frozen=True)
class DrawSpec:
    name: str
    shape: tuple[int, ...]
    dist: str = "uniform"  # the only primitive; see module doc
    batched: bool = False  # leading axis = the batch's (data ranks take their rows, S108); else replicated


def draw_name(term: int, entry: int, draw: int, leaf: str) -> str:
    return f"t{term}.e{entry}.d{draw}.{leaf}"


def draw_plan(run: ResolvedRun, batch_shape: tuple[int, ...] | None = None) -> list[DrawSpec]:
    bs = tuple(batch_shape or run.batch_shape)
    cfg = run.cfg
    plan: list[DrawSpec] = []
    if cfg.sampling == "binomial":
        plan += [DrawSpec(f"binomial.{s.name}", bs + (s.C,), batched=True) for s in run.sites]
    for t in run.recon_terms:
        for ei, e in enumerate(t.entries):
            for d in range(e.n_draws):
                if t.source == "stochastic":
                    for name in e.live:
                        C = run.site(name).C
                        plan.append(DrawSpec(draw_name(t.index, ei, d, f"{name}.source"), bs + (C,), batched=True))
                        if cfg.use_delta_component:
                            plan.append(DrawSpec(draw_name(t.index, ei, d, f"{name}.delta"), bs, batched=True))
                if t.source == "fresh_pgd":
                    tc = cfg.loss_terms[t.index]
                    assert isinstance(tc, FreshPGDTerm)  # source 'fresh_pgd' <=> a pgd_recon* term (RECON_TERMS)
                    if tc.init == "random":
                        for name in e.live:
                            shape = source_shape(bs, tc.scope, n_channels(cfg, run.site(name).C))
                            plan.append(DrawSpec(draw_name(t.index, ei, d, f"{name}.pgd_init"), shape,
                                                 batched=tc.scope == "bsc"))
                if e.routing == "uniform_k":
                    plan.append(DrawSpec(draw_name(t.index, ei, d, "route_k"), bs, batched=True))
                    plan.append(DrawSpec(draw_name(t.index, ei, d, "route_order"), bs + (len(e.live),), batched=True))
    return plan


def _name_key(name: str) -> list[int]:
    h = hashlib.sha256(name.encode()).digest()
    return [int.from_bytes(h[i:i + 4], "little") for i in range(0, 16, 4)]


def numpy_rng(seed: int, step: int, name: str) -> np.random.Generator:
    """The harness's generator for one named tensor: independent across names/steps."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, step] + _name_key(name))))


def sample_numpy(plan: list[DrawSpec], seed: int, step: int) -> dict[str, np.ndarray]:
    return {d.name: numpy_rng(seed, step, d.name).random(d.shape) for d in plan}


def route_from_uniforms(route_k: np.ndarray, route_order: np.ndarray) -> np.ndarray:
    """Reference (numpy) of the routing rule S51; backends mirror it. -> bool [..., n]."""
    n = route_order.shape[-1]
    k = np.minimum(1 + np.floor(route_k * n), n)
    rank = (route_order[..., None, :] < route_order[..., :, None]).sum(-1)
    return rank < k[..., None]


def bernoulli_from_uniform(u: np.ndarray) -> np.ndarray:
    return (u < 0.5).astype(u.dtype)


def eval_draw_plan(run: ResolvedRun, batch_shape: tuple[int, ...]) -> list[DrawSpec]:
    """The draws one eval batch consumes (only the `stochastic` variant is random)."""
    bs = tuple(batch_shape)
    plan = []
    for s in run.sites:
        plan.append(DrawSpec(f"eval.{s.name}.source", bs + (s.C,)))
        if run.cfg.use_delta_component:
            plan.append(DrawSpec(f"eval.{s.name}.delta", bs))
        if run.cfg.eval.pgd_steps:
            plan.append(DrawSpec(f"eval.{s.name}.pgd_init", source_shape(bs, "bsc", n_channels(run.cfg, s.C))))
    return plan


def eval_batch_shape(run: ResolvedRun) -> tuple[int, ...]:
    B = run.cfg.eval.batch_size
    if run.cfg.target.kind != "llama":
        return (B,)
    T = run.cfg.data.seq_len
    if T is None:
        raise ValueError("data.seq_len: required for the llama target")
    return (B, T)
