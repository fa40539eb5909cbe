"""Adversarial mask sources: fresh PGD and persistent PGD (SPEC S80-S87).
A source tensor per live site has the scope's leading shape and C(+1) channels; the mask
is `ci + (1 - ci) * src[..., :C]` and the delta mask `src[..., C]` (raw)."""
from __future__ import annotations

import torch

from contract.adversary import n_channels, source_shape
from contract.backend import NO_PROBE, Probe
from contract.config import FreshPGDTerm, SourceOptimizer
from contract.draws import draw_name
from contract.resolve import ReconTerm, fresh_cfg, persistent_cfg
from oracle_torch.components import SiteMode
from oracle_torch.context import StepContext
from oracle_torch.losses import summed
from oracle_torch.recon import route_from_uniforms


def expand_rows(src: torch.Tensor, rows: torch.Tensor, scope: str) -> torch.Tensor:
    """S83: under scope nsc, batch row b uses source row b mod n, b the global index of each
    of this batch's `rows` (S108); other scopes broadcast."""
    if scope != "nsc":
        return src
    return src[rows % src.shape[0]]


def source_modes(ctx: StepContext, live, ci: dict, srcs: dict, routes, scope: str) -> dict[str, SiteMode]:
    """The SiteModes of one forward with adversarial sources (S80, S81, S83)."""
    modes = {}
    for j, name in enumerate(live):
        C = ctx.run.site(name).C
        src = expand_rows(srcs[name], ctx.ranks.row_ids(ctx.batch.shape[0]), scope)
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


def source_divergence(ctx: StepContext, live, ci: dict, srcs: dict, routes, scope: str):
    """(D, output) of one forward with the given sources."""
    out = ctx.model.masked_forward(ctx.batch, source_modes(ctx, live, ci, srcs, routes, scope))
    return ctx.divergence(out), out


def source_grads(ctx: StepContext, d: torch.Tensor, leaves: dict, scope: str, retain_graph: bool = False) -> list:
    """d(d)/d(source) for each source leaf: the global gradient on every rank (S109)."""
    grads = torch.autograd.grad(d, list(leaves.values()), retain_graph=retain_graph)
    return [ctx.ranks.source_grad(g, scope == "bsc") for g in grads]


# ------------------------------------------------------------------ fresh PGD
def fresh_init(ctx: StepContext, tc: FreshPGDTerm, name: str, draws: dict, key: str) -> torch.Tensor:
    """S80: random (from the draw plan) | ones | zeroes."""
    if tc.init == "random":
        return draws[key].clone()
    shape = source_shape(ctx.batch_shape, tc.scope, n_channels(ctx.run.cfg, ctx.run.site(name).C))
    return (torch.ones if tc.init == "ones" else torch.zeros)(shape, dtype=ctx.clean.dtype)


def sign_ascent(ctx: StepContext, live, ci_det: dict, srcs: dict, routes, scope: str, step_size: float,
                n_steps: int) -> dict:
    """S80: n_steps of src <- clamp(src + step_size * sign(dD/dsrc), 0, 1), components and CI
    detached (the gradient is taken w.r.t. the sources only)."""
    for _ in range(n_steps):
        leaves = {n: s.detach().requires_grad_(True) for n, s in srcs.items()}
        d, _ = source_divergence(ctx, live, ci_det, leaves, routes, scope)
        grads = source_grads(ctx, d, leaves, scope)
        srcs = {n: (leaves[n].detach() + step_size * torch.sign(g)).clamp(0.0, 1.0)
                for n, g in zip(leaves, grads, strict=True)}
    return srcs


def fresh_pgd_term(ctx: StepContext, term: ReconTerm, ci_lower: dict, draws: dict, probe: Probe = NO_PROBE):
    """S80: per entry, fresh sources, routing drawn once and shared by every ascent and the
    final loss; the final forward uses the (stop-gradient) sources with live CI and V/U."""
    tc = fresh_cfg(ctx.run, term)
    total: torch.Tensor | float = 0.0
    for ei, e in enumerate(term.entries):
        routes = entry_routes(term, ei, draws, probe=probe)
        srcs = {n: fresh_init(ctx, tc, n, draws, draw_name(term.index, ei, 0, f"{n}.pgd_init")) for n in e.live}
        ci_det = {n: ci_lower[n].detach() for n in e.live}
        srcs = sign_ascent(ctx, e.live, ci_det, srcs, routes, tc.scope, tc.step_size, tc.n_steps)
        d, out = source_divergence(ctx, e.live, ci_lower, srcs, routes, tc.scope)
        tag = f"t{term.index}.e{ei}.d0"
        probe.put(f"masked_out.{tag}", out)
        for n, s in srcs.items():
            probe.put(f"source.{tag}.{n}", s)
        total = total + d
    return summed(total, f"loss_terms.{term.index}: its entries") / len(term.entries)


# ------------------------------------------------------------------ persistent PGD
def adam_ascent(srcs: dict, grads: dict, opt: dict, lr: float, oc: SourceOptimizer) -> None:
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


def persistent_warmup(ctx: StepContext, term: ReconTerm, ci_det: dict, srcs: dict, opt: dict, lr: float) -> None:
    """S84 (1): n_warmup ascents on the term's recon loss, components and CI detached,
    every site live and routed everywhere. Updates `srcs` and `opt` in place."""
    tc = persistent_cfg(ctx.run, term)
    for _ in range(tc.n_warmup):
        leaves = {n: s.detach().requires_grad_(True) for n, s in srcs.items()}
        d, _ = source_divergence(ctx, ctx.run.site_names, ci_det, leaves, None, tc.scope)
        grads = dict(zip(leaves, source_grads(ctx, d, leaves, tc.scope), strict=True))
        adam_ascent(srcs, grads, opt, lr, tc.optimizer)


def persistent_pgd_term(ctx: StepContext, term: ReconTerm, ci_lower: dict, srcs: dict, draws: dict,
                        probe: Probe = NO_PROBE):
    """S84 (2): the main loss with the sources as leaves (their gradient is the final ascent)."""
    tc = persistent_cfg(ctx.run, term)
    total: torch.Tensor | float = 0.0
    for ei, e in enumerate(term.entries):
        routes = entry_routes(term, ei, draws, probe=probe)
        d, out = source_divergence(ctx, e.live, ci_lower, srcs, routes, tc.scope)
        probe.put(f"masked_out.t{term.index}.e{ei}.d0", out)
        total = total + d
    return summed(total, f"loss_terms.{term.index}: its entries") / len(term.entries)
