"""Adversarial mask sources: fresh PGD and persistent PGD (ALGORITHM §6; SPEC S80-S87).
Mirrors oracle_torch/adversary.py. The fresh-PGD ascent loop is a `lax.scan`
(`sign_ascent`); `sign_ascent_python` is the plain loop a test compares it with."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from contract.adversary import n_channels, source_shape
from contract.draws import draw_name
from jax_impl.components import SiteMode
from jax_impl.losses import output_divergence
from jax_impl.recon import route_from_uniforms


def expand_rows(src, batch_rows: int, scope: str):
    """S83: under scope nsc, batch row b uses source row b mod n; other scopes broadcast."""
    if scope != "nsc":
        return src
    return src[jnp.arange(batch_rows) % src.shape[0]]


def source_modes(run, live, ci: dict, srcs: dict, routes, scope: str, batch_rows: int) -> dict:
    modes = {}
    for j, name in enumerate(live):
        C = run.site(name).C
        src = expand_rows(srcs[name], batch_rows, scope).astype(ci[name].dtype)  # no-op unless bf16 compute
        mask = ci[name] + (1 - ci[name]) * src[..., :C]
        dm = src[..., C] if run.cfg.use_delta_component else None
        modes[name] = SiteMode(mask, dm, None if routes is None else routes[..., j])
    return modes


def entry_routes(term, ei: int, draws: dict, pins: dict):
    if term.entries[ei].routing != "uniform_k":
        return None
    r = route_from_uniforms(draws[draw_name(term.index, ei, 0, "route_k")],
                            draws[draw_name(term.index, ei, 0, "route_order")])
    return pins.get(f"route.t{term.index}.e{ei}.d0", r)


def source_divergence(run, model, frozen, params, live, batch, clean, ci, srcs, routes, scope):
    """D of one forward with the given sources."""
    out = model.masked_forward(frozen, params, batch, source_modes(run, live, ci, srcs, routes, scope, batch.shape[0]))
    return output_divergence(run.cfg.output_loss, out, clean), out


# ------------------------------------------------------------------ fresh PGD
def fresh_init(tc, run, name: str, draws: dict, key: str, batch_shape, dtype):
    """S80: random (from the draw plan) | ones | zeroes."""
    if tc.init == "random":
        return draws[key]
    shape = source_shape(tuple(batch_shape), tc.scope, n_channels(run.cfg, run.site(name).C))
    return (jnp.ones if tc.init == "ones" else jnp.zeros)(shape, dtype=dtype)


def _ascent_step(run, model, frozen, params, live, batch, clean, ci_det, routes, scope, step_size, srcs):
    grad = jax.grad(lambda s: source_divergence(run, model, frozen, params, live, batch, clean, ci_det, s, routes, scope)[0])(srcs)
    return {n: jnp.clip(srcs[n] + step_size * jnp.sign(grad[n]), 0.0, 1.0) for n in srcs}


def sign_ascent(run, model, frozen, params, live, batch, clean, ci_det, srcs, routes, scope, step_size: float, n_steps: int):
    """S80: n_steps of src <- clamp(src + step_size * sign(dD/dsrc), 0, 1), components and CI
    detached. A lax.scan over the steps."""
    params = jax.lax.stop_gradient(params)

    def body(s, _):
        return _ascent_step(run, model, frozen, params, live, batch, clean, ci_det, routes, scope, step_size, s), None

    srcs, _ = jax.lax.scan(body, srcs, None, length=n_steps)
    return srcs


def sign_ascent_python(run, model, frozen, params, live, batch, clean, ci_det, srcs, routes, scope, step_size, n_steps):
    """The same ascent as a Python loop (reference for the scan)."""
    params = jax.lax.stop_gradient(params)
    for _ in range(n_steps):
        srcs = _ascent_step(run, model, frozen, params, live, batch, clean, ci_det, routes, scope, step_size, srcs)
    return srcs


def fresh_pgd_term(run, model, frozen, params, term, batch, clean, ci_lower: dict, draws: dict, record=None, pins=None):
    """S80: per entry, fresh sources, routing drawn once and shared by every ascent and the
    final loss; the final forward uses the (stop-gradient) sources with live CI and V/U."""
    tc = run.cfg.loss_terms[term.index]
    pins = pins or {}
    bs = tuple(batch.shape[:len(run.batch_shape)])
    total = 0.0
    for ei, e in enumerate(term.entries):
        routes = entry_routes(term, ei, draws, pins)
        srcs = {n: fresh_init(tc, run, n, draws, draw_name(term.index, ei, 0, f"{n}.pgd_init"), bs, clean.dtype)
                for n in e.live}
        ci_det = {n: jax.lax.stop_gradient(ci_lower[n]) for n in e.live}
        srcs = sign_ascent(run, model, frozen, params, e.live, batch, clean, ci_det, srcs, routes, tc.scope,
                           tc.step_size, tc.n_steps)
        srcs = jax.lax.stop_gradient(srcs)
        d, out = source_divergence(run, model, frozen, params, e.live, batch, clean, ci_lower, srcs, routes, tc.scope)
        if record is not None:
            tag = f"t{term.index}.e{ei}.d0"
            record[f"masked_out.{tag}"] = out
            for n, s in srcs.items():
                record[f"source.{tag}.{n}"] = s
        total = total + d
    return total / len(term.entries)


# ------------------------------------------------------------------ persistent PGD
def adam_ascent(srcs: dict, grads: dict, opt: dict, lr, oc) -> tuple[dict, dict]:
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


def persistent_warmup(run, model, frozen, params, term, batch, clean, ci_det: dict, srcs: dict, opt: dict, lr):
    """S84 (1): n_warmup ascents on the term's recon loss, components and CI detached,
    every site live and routed everywhere. Returns (sources, optimizer state)."""
    tc = run.cfg.loss_terms[term.index]
    params = jax.lax.stop_gradient(params)
    for _ in range(tc.n_warmup):
        grads = jax.grad(lambda s: source_divergence(run, model, frozen, params, run.site_names, batch, clean,
                                                     ci_det, s, None, tc.scope)[0])(srcs)
        srcs, opt = adam_ascent(srcs, grads, opt, lr, tc.optimizer)
    return srcs, opt


def persistent_pgd_term(run, model, frozen, params, term, batch, clean, ci_lower: dict, srcs: dict, draws: dict,
                        record=None, pins=None):
    """S84 (2): the main loss with the sources as leaves (their gradient is the final ascent)."""
    tc = run.cfg.loss_terms[term.index]
    pins = pins or {}
    total = 0.0
    for ei, e in enumerate(term.entries):
        routes = entry_routes(term, ei, draws, pins)
        d, out = source_divergence(run, model, frozen, params, e.live, batch, clean, ci_lower, srcs, routes, tc.scope)
        if record is not None:
            record[f"masked_out.t{term.index}.e{ei}.d0"] = out
        total = total + d
    return total / len(term.entries)
