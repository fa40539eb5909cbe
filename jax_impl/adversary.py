"""Adversarial mask sources: fresh PGD and persistent PGD (SPEC S80-S87).
Mirrors oracle_torch/adversary.py; the parameters are an argument here (the oracle's model
holds them). The fresh-PGD ascent loop is a `lax.scan` (`sign_ascent`)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from contract.adversary import n_channels, source_shape
from contract.backend import NO_PROBE, Probe
from contract.config import FreshPGDTerm, SourceOptimizer
from contract.draws import draw_name
from contract.resolve import ReconTerm, fresh_cfg, persistent_cfg
from jax_impl.components import SiteMode
from jax_impl.context import StepContext
from jax_impl.losses import output_divergence
from jax_impl.recon import route_from_uniforms


def expand_rows(src, batch_rows: int, scope: str):
    """S83: under scope nsc, batch row b uses source row b mod n; other scopes broadcast."""
    if scope != "nsc":
        return src
    return src[jnp.arange(batch_rows) % src.shape[0]]


def source_modes(ctx: StepContext, live, ci: dict, srcs: dict, routes, scope: str) -> dict:
    """The SiteModes of one forward with adversarial sources (S80, S81, S83)."""
    modes = {}
    for j, name in enumerate(live):
        C = ctx.run.site(name).C
        src = expand_rows(srcs[name], ctx.batch.shape[0], scope).astype(ci[name].dtype)  # no-op unless bf16 compute
        mask = ci[name] + (1 - ci[name]) * src[..., :C]
        dm = src[..., C] if ctx.run.cfg.use_delta_component else None
        modes[name] = SiteMode(mask, dm, None if routes is None else routes[..., j])
    return modes


def entry_routes(term: ReconTerm, ei: int, draws: dict, probe: Probe = NO_PROBE):
    """The routes of entry ei, drawn once (draw 0) and shared by every ascent and the loss (S80)."""
    if term.entries[ei].routing != "uniform_k":
        return None
    r = route_from_uniforms(draws[draw_name(term.index, ei, 0, "route_k")],
                            draws[draw_name(term.index, ei, 0, "route_order")])
    return probe.pin(f"route.t{term.index}.e{ei}.d0", r)


def source_divergence(ctx: StepContext, params: dict, live, ci: dict, srcs: dict, routes, scope: str):
    """(D, output) of one forward with the given sources."""
    out = ctx.model.masked_forward(ctx.frozen, params, ctx.batch, source_modes(ctx, live, ci, srcs, routes, scope))
    return output_divergence(ctx.run.cfg.output_loss, out, ctx.clean), out


# ------------------------------------------------------------------ fresh PGD
def fresh_init(ctx: StepContext, tc: FreshPGDTerm, name: str, draws: dict, key: str):
    """S80: random (from the draw plan) | ones | zeroes."""
    if tc.init == "random":
        return draws[key]
    shape = source_shape(ctx.batch_shape, tc.scope, n_channels(ctx.run.cfg, ctx.run.site(name).C))
    return (jnp.ones if tc.init == "ones" else jnp.zeros)(shape, dtype=ctx.clean.dtype)


def sign_ascent(ctx: StepContext, params: dict, live, ci_det: dict, srcs: dict, routes, scope: str, step_size: float,
                n_steps: int) -> dict:
    """S80: n_steps of src <- clamp(src + step_size * sign(dD/dsrc), 0, 1), components and CI
    detached. A lax.scan over the steps."""
    params = jax.lax.stop_gradient(params)

    def body(srcs, _):
        grad = jax.grad(lambda s: source_divergence(ctx, params, live, ci_det, s, routes, scope)[0])(srcs)
        return {n: jnp.clip(srcs[n] + step_size * jnp.sign(grad[n]), 0.0, 1.0) for n in srcs}, None

    srcs, _ = jax.lax.scan(body, srcs, None, length=n_steps)
    return srcs


def fresh_pgd_term(ctx: StepContext, params: dict, term: ReconTerm, ci_lower: dict, draws: dict,
                   probe: Probe = NO_PROBE):
    """S80: per entry, fresh sources, routing drawn once and shared by every ascent and the
    final loss; the final forward uses the (stop-gradient) sources with live CI and V/U."""
    tc = fresh_cfg(ctx.run, term)
    total = 0.0
    for ei, e in enumerate(term.entries):
        routes = entry_routes(term, ei, draws, probe=probe)
        srcs = {n: fresh_init(ctx, tc, n, draws, draw_name(term.index, ei, 0, f"{n}.pgd_init")) for n in e.live}
        ci_det = {n: jax.lax.stop_gradient(ci_lower[n]) for n in e.live}
        srcs = sign_ascent(ctx, params, e.live, ci_det, srcs, routes, tc.scope, tc.step_size, tc.n_steps)
        srcs = jax.lax.stop_gradient(srcs)
        d, out = source_divergence(ctx, params, e.live, ci_lower, srcs, routes, tc.scope)
        tag = f"t{term.index}.e{ei}.d0"
        probe.put(f"masked_out.{tag}", out)
        for n, s in srcs.items():
            probe.put(f"source.{tag}.{n}", s)
        total = total + d
    return total / len(term.entries)


# ------------------------------------------------------------------ persistent PGD
def adam_ascent(srcs: dict, grads: dict, opt: dict, lr, oc: SourceOptimizer) -> tuple[dict, dict]:
    """S84: ascent of a bundle, then clamp to [0, 1]. Adam with bias correction
    (`src += lr * m_hat / (sqrt(v_hat) + eps)`, eps outside the sqrt) or sign.
    Returns (sources, optimizer state)."""
    if oc.type == "sign":
        return {n: jnp.clip(srcs[n] + lr * jnp.sign(grads[n]), 0.0, 1.0) for n in srcs}, opt
    b1, b2 = oc.betas
    t = opt["t"] + 1
    m = {n: b1 * opt["m"][n] + (1 - b1) * grads[n] for n in srcs}
    v = {n: b2 * opt["v"][n] + (1 - b2) * grads[n] * grads[n] for n in srcs}
    out = {}
    for n in srcs:
        # bias corrections in the host precision, then cast (as torch does with a Python scalar)
        m_hat = m[n] / (1 - b1 ** t).astype(m[n].dtype)
        v_hat = v[n] / (1 - b2 ** t).astype(v[n].dtype)
        out[n] = jnp.clip(srcs[n] + lr * m_hat / (jnp.sqrt(v_hat) + oc.eps), 0.0, 1.0)
    return out, {"m": m, "v": v, "t": t}


def init_source_opt(srcs: dict) -> dict:
    return {"m": {n: jnp.zeros_like(s) for n, s in srcs.items()},
            "v": {n: jnp.zeros_like(s) for n, s in srcs.items()}, "t": jnp.asarray(0, jnp.int32)}


def persistent_warmup(ctx: StepContext, params: dict, term: ReconTerm, ci_det: dict, srcs: dict, opt: dict,
                      lr) -> tuple[dict, dict]:
    """S84 (1): n_warmup ascents on the term's recon loss, components and CI detached,
    every site live and routed everywhere. Returns (sources, optimizer state)."""
    tc = persistent_cfg(ctx.run, term)
    params = jax.lax.stop_gradient(params)
    for _ in range(tc.n_warmup):
        grads = jax.grad(lambda s: source_divergence(ctx, params, ctx.run.site_names, ci_det, s, None, tc.scope)[0])(srcs)
        srcs, opt = adam_ascent(srcs, grads, opt, lr, tc.optimizer)
    return srcs, opt


def persistent_pgd_term(ctx: StepContext, params: dict, term: ReconTerm, ci_lower: dict, srcs: dict, draws: dict,
                        probe: Probe = NO_PROBE):
    """S84 (2): the main loss with the sources as leaves (their gradient is the final ascent)."""
    tc = persistent_cfg(ctx.run, term)
    total = 0.0
    for ei, e in enumerate(term.entries):
        routes = entry_routes(term, ei, draws, probe=probe)
        d, out = source_divergence(ctx, params, e.live, ci_lower, srcs, routes, tc.scope)
        probe.put(f"masked_out.t{term.index}.e{ei}.d0", out)
        total = total + d
    return total / len(term.entries)
