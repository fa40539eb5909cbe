"""Adversarial mask sources: fresh PGD and persistent PGD (ALGORITHM §6; SPEC S80-S87).
A source tensor per live site has the scope's leading shape and C(+1) channels; the mask
is `ci + (1 - ci) * src[..., :C]` and the delta mask `src[..., C]` (raw)."""
from __future__ import annotations

import torch

from contract.adversary import n_channels, source_shape
from contract.draws import draw_name
from oracle_torch.components import SiteMode
from oracle_torch.losses import output_divergence
from oracle_torch.recon import route_from_uniforms


def expand_rows(src: torch.Tensor, batch_rows: int, scope: str) -> torch.Tensor:
    """S83: under scope nsc, batch row b uses source row b mod n; other scopes broadcast."""
    if scope != "nsc":
        return src
    return src[torch.arange(batch_rows) % src.shape[0]]


def source_modes(run, live, ci: dict, srcs: dict, routes, scope: str, batch_rows: int) -> dict[str, SiteMode]:
    modes = {}
    for j, name in enumerate(live):
        C = run.site(name).C
        src = expand_rows(srcs[name], batch_rows, scope)
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


def source_divergence(run, model, live, batch, clean, ci, srcs, routes, scope):
    """D of one forward with the given sources."""
    out = model.masked_forward(batch, source_modes(run, live, ci, srcs, routes, scope, batch.shape[0]))
    return output_divergence(run.cfg.output_loss, out, clean), out


# ------------------------------------------------------------------ fresh PGD
def fresh_init(tc, run, name: str, draws: dict, key: str, batch_shape, dtype) -> torch.Tensor:
    """S80: random (from the draw plan) | ones | zeroes."""
    if tc.init == "random":
        return draws[key].clone()
    shape = source_shape(tuple(batch_shape), tc.scope, n_channels(run.cfg, run.site(name).C))
    return (torch.ones if tc.init == "ones" else torch.zeros)(shape, dtype=dtype)


def sign_ascent(run, model, live, batch, clean, ci_det, srcs, routes, scope, step_size: float, n_steps: int):
    """S80: n_steps of src <- clamp(src + step_size * sign(dD/dsrc), 0, 1), components and CI
    detached (the gradient is taken w.r.t. the sources only)."""
    for _ in range(n_steps):
        leaves = {n: s.detach().requires_grad_(True) for n, s in srcs.items()}
        d, _ = source_divergence(run, model, live, batch, clean, ci_det, leaves, routes, scope)
        grads = torch.autograd.grad(d, list(leaves.values()))
        srcs = {n: (leaves[n].detach() + step_size * torch.sign(g)).clamp(0.0, 1.0) for n, g in zip(leaves, grads)}
    return srcs


def fresh_pgd_term(run, model, term, batch, clean, ci_lower: dict, draws: dict, record=None, pins=None):
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
        ci_det = {n: ci_lower[n].detach() for n in e.live}
        srcs = sign_ascent(run, model, e.live, batch, clean, ci_det, srcs, routes, tc.scope, tc.step_size, tc.n_steps)
        d, out = source_divergence(run, model, e.live, batch, clean, ci_lower, srcs, routes, tc.scope)
        if record is not None:
            tag = f"t{term.index}.e{ei}.d0"
            record[f"masked_out.{tag}"] = out
            for n, s in srcs.items():
                record[f"source.{tag}.{n}"] = s
        total = total + d
    return total / len(term.entries)


# ------------------------------------------------------------------ persistent PGD
def adam_ascent(srcs: dict, grads: dict, opt: dict, lr: float, oc) -> None:
    """S84: in-place ascent of a bundle, then clamp to [0, 1]. Adam with bias correction
    (`src += lr * m_hat / (sqrt(v_hat) + eps)`, eps outside the sqrt) or sign."""
    if oc.type == "sign":
        for n in srcs:
            srcs[n] = (srcs[n] + lr * torch.sign(grads[n])).clamp(0.0, 1.0)
        return
    b1, b2 = oc.betas
    opt["t"] += 1
    t = opt["t"]
    for n in srcs:
        g = grads[n]
        opt["m"][n] = b1 * opt["m"][n] + (1 - b1) * g
        opt["v"][n] = b2 * opt["v"][n] + (1 - b2) * g * g
        m_hat = opt["m"][n] / (1 - b1 ** t)
        v_hat = opt["v"][n] / (1 - b2 ** t)
        srcs[n] = (srcs[n] + lr * m_hat / (torch.sqrt(v_hat) + oc.eps)).clamp(0.0, 1.0)


def init_source_opt(srcs: dict) -> dict:
    return {"m": {n: torch.zeros_like(s) for n, s in srcs.items()},
            "v": {n: torch.zeros_like(s) for n, s in srcs.items()}, "t": 0}


def persistent_warmup(run, model, term, batch, clean, ci_det: dict, srcs: dict, opt: dict, lr: float) -> None:
    """S84 (1): n_warmup ascents on the term's recon loss, components and CI detached,
    every site live and routed everywhere."""
    tc = run.cfg.loss_terms[term.index]
    for _ in range(tc.n_warmup):
        leaves = {n: s.detach().requires_grad_(True) for n, s in srcs.items()}
        d, _ = source_divergence(run, model, run.site_names, batch, clean, ci_det, leaves, None, tc.scope)
        grads = dict(zip(leaves, torch.autograd.grad(d, list(leaves.values()))))
        adam_ascent(srcs, grads, opt, lr, tc.optimizer)


def persistent_pgd_term(run, model, term, batch, clean, ci_lower: dict, srcs: dict, draws: dict, record=None, pins=None):
    """S84 (2): the main loss with the sources as leaves (their gradient is the final ascent)."""
    tc = run.cfg.loss_terms[term.index]
    pins = pins or {}
    total = 0.0
    for ei, e in enumerate(term.entries):
        routes = entry_routes(term, ei, draws, pins)
        d, out = source_divergence(run, model, e.live, batch, clean, ci_lower, srcs, routes, tc.scope)
        if record is not None:
            record[f"masked_out.t{term.index}.e{ei}.d0"] = out
        total = total + d
    return total / len(term.entries)
