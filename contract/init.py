"""The initial trainable state as a flat {name: float64 ndarray}, made from the seed with
numpy. Both backends start from it (production and parity alike), so a run's step 0 is
identical across frameworks by construction (S3). Names:

  components.{site}.V [d_in, C]     components.{site}.U [C, d_out]
  ci_fn.{site}.w{i} / .b{i}         per-site types (mlp, vector_mlp: leading [C, ...])
  ci_fn.global.w{i} / .b{i}         global_shared_mlp
  ci_fn.global.{in_proj,out_proj}.{w,b}, ci_fn.global.blocks.{j}.{q,k,v,o,mlp_w1,mlp_b1,mlp_w2,mlp_b2}
  sources.{bundle}.{site}           persistent-PGD sources (not trained by AdamW)
"""
from __future__ import annotations

import numpy as np

from contract.adversary import n_channels, source_shape
from contract.config import PersistentPGDTerm
from contract.resolve import ResolvedRun

INIT_STREAM = 0x1417


def _normal(g: np.random.Generator, shape, fan_in: int, gain: float) -> np.ndarray:
    return g.standard_normal(shape) * np.sqrt(gain / fan_in)


def mlp_dims(d_in: int, hidden: list[int], d_out: int) -> list[tuple[int, int]]:
    dims = [d_in, *hidden, d_out]
    return list(zip(dims[:-1], dims[1:], strict=True))


def _mlp(g, prefix: str, d_in: int, hidden: list[int], d_out: int, lead: tuple[int, ...] = ()) -> dict:
    out = {}
    layers = mlp_dims(d_in, hidden, d_out)
    for i, (a, b) in enumerate(layers):
        gain = 1.0 if i == len(layers) - 1 else 2.0  # hidden N(0, 2/fan_in), output N(0, 1/fan_in)
        out[f"{prefix}.w{i}"] = _normal(g, lead + (a, b), a, gain)
        out[f"{prefix}.b{i}"] = np.zeros(lead + (b,))
    return out


def init_components(run: ResolvedRun, g: np.random.Generator) -> dict:
    out = {}
    for s in run.sites:
        out[f"components.{s.name}.V"] = _normal(g, (s.d_in, s.C), s.d_in, 1.0)
        out[f"components.{s.name}.U"] = _normal(g, (s.C, s.d_out), s.C, 1.0)
    return out


def init_ci_fn(run: ResolvedRun, g: np.random.Generator) -> dict:
    c = run.cfg.ci_fn
    out: dict = {}
    if c.type == "mlp":
        for s in run.sites:
            out |= _mlp(g, f"ci_fn.{s.name}", 1, c.hidden, 1, (s.C,))
    elif c.type == "vector_mlp":
        for s in run.sites:
            out |= _mlp(g, f"ci_fn.{s.name}", s.d_in, c.hidden, 1, (s.C,))
    elif c.type == "shared_mlp":
        for s in run.sites:
            out |= _mlp(g, f"ci_fn.{s.name}", s.d_in, c.hidden, s.C)
    elif c.type == "global_shared_mlp":
        out |= _mlp(g, "ci_fn.global", sum(s.d_in for s in run.sites), c.hidden, sum(s.C for s in run.sites))
    elif c.type == "global_shared_transformer":
        d, h = c.d_model, c.mlp_hidden
        d_cat, c_tot = sum(s.d_in for s in run.sites), sum(s.C for s in run.sites)
        out["ci_fn.global.in_proj.w"] = _normal(g, (d_cat, d), d_cat, 2.0)
        out["ci_fn.global.in_proj.b"] = np.zeros(d)
        for j in range(c.n_blocks):
            p = f"ci_fn.global.blocks.{j}"
            for nm in ("q", "k", "v", "o"):
                out[f"{p}.{nm}"] = _normal(g, (d, d), d, 2.0)
            out[f"{p}.mlp_w1"] = _normal(g, (d, h), d, 2.0)
            out[f"{p}.mlp_b1"] = np.zeros(h)
            out[f"{p}.mlp_w2"] = _normal(g, (h, d), h, 2.0)
            out[f"{p}.mlp_b2"] = np.zeros(d)
        out["ci_fn.global.out_proj.w"] = _normal(g, (d, c_tot), d, 1.0)
        out["ci_fn.global.out_proj.b"] = np.zeros(c_tot)
    else:
        raise ValueError(f"ci_fn.type: unknown {c.type!r}")
    return out


def init_sources(run: ResolvedRun, g: np.random.Generator) -> dict:
    """Persistent-PGD sources, U[0,1) (S82): `sources.<bundle>.<site>` [scope shape, C(+1)]."""
    out = {}
    for t in run.recon_terms:
        if t.source != "persistent_pgd":
            continue
        tc = run.cfg.loss_terms[t.index]
        assert isinstance(tc, PersistentPGDTerm)  # source 'persistent_pgd' <=> a persistent_pgd_recon* term (RECON_TERMS)
        for s in run.sites:
            shape = source_shape(run.batch_shape, tc.scope, n_channels(run.cfg, s.C), tc.n_sources)
            out[f"sources.{t.bundle}.{s.name}"] = g.random(shape)
    return out


def init_state(run: ResolvedRun, seed: int | None = None) -> dict[str, np.ndarray]:
    seed = run.cfg.seed if seed is None else seed
    g = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, INIT_STREAM])))
    return init_components(run, g) | init_ci_fn(run, g) | init_sources(run, g)
