"""Recon terms as plan x mask-source strategy (SPEC S25-S29). A plan's
entries (contract.resolve) list live sites, routing and number of draws; each draw is one
masked forward; the term is the mean output divergence over all forwards of all entries.
Draw names and the routing rule come from contract/draws.py."""
from __future__ import annotations

import torch

from contract.backend import NO_PROBE, Probe
from contract.draws import draw_name
from contract.resolve import ReconTerm, ResolvedRun
from oracle_torch.components import SiteMode
from oracle_torch.context import StepContext
from oracle_torch.losses import summed


def route_from_uniforms(route_k: torch.Tensor, route_order: torch.Tensor) -> torch.Tensor:
    """S51: k = min(1 + floor(u n), n); site i routes iff fewer than k uniforms are below its own."""
    n = route_order.shape[-1]
    k = torch.clamp(1 + torch.floor(route_k * n), max=n)
    rank = (route_order[..., None, :] < route_order[..., :, None]).sum(-1)
    return rank < k[..., None]


def bernoulli_from_uniform(u: torch.Tensor) -> torch.Tensor:
    return (u < 0.5).to(u.dtype)


def site_modes(run: ResolvedRun, term: ReconTerm, ei: int, d: int, ci_lower: dict, draws: dict,
               probe: Probe = NO_PROBE) -> dict[str, SiteMode]:
    """The SiteModes of forward (entry ei, draw d) of a recon term (S26, S27). `probe.pins`
    (stage bundles) may replace this forward's routes and masks: `route.<tag>`, `mask.<tag>.<site>`."""
    e = term.entries[ei]
    tag = f"t{term.index}.e{ei}.d{d}"
    routes = None
    if e.routing == "uniform_k":
        routes = route_from_uniforms(draws[draw_name(term.index, ei, d, "route_k")],
                                     draws[draw_name(term.index, ei, d, "route_order")])
        routes = probe.pin(f"route.{tag}", routes)
    modes = {}
    for j, name in enumerate(e.live):
        ci = ci_lower[name]
        route = None if routes is None else routes[..., j]
        if term.source == "stochastic":
            src = draws[draw_name(term.index, ei, d, f"{name}.source")]
            if run.cfg.sampling == "binomial":
                src = bernoulli_from_uniform(src)
            mask = ci + (1 - ci) * src
            dm = draws[draw_name(term.index, ei, d, f"{name}.delta")] if run.cfg.use_delta_component else None
            modes[name] = SiteMode(mask, dm, route)
        elif term.source == "ci_masked":  # constant(0): mask = ci, no delta path
            modes[name] = SiteMode(ci, None, route)
        elif term.source == "unmasked":  # constant(1): mask = 1, no delta path
            modes[name] = SiteMode(torch.ones_like(ci), None, route)
        else:
            raise ValueError(f"loss_terms.{term.index}: source {term.source!r} is not implemented")
        if f"mask.{tag}.{name}" in probe.pins:
            modes[name].mask = probe.pins[f"mask.{tag}.{name}"]
    return modes


def routes_of(modes: dict, live):
    """The routes of one forward, bool [..., n_live]."""
    return torch.stack([modes[n].route for n in live], -1)


def recon_term(ctx: StepContext, term: ReconTerm, ci_lower: dict, draws: dict,
               probe: Probe = NO_PROBE) -> torch.Tensor:
    """S28: the mean output divergence over every forward of every entry of one mask-source term."""
    total: torch.Tensor | float = 0.0
    n = 0
    for ei, e in enumerate(term.entries):
        for d in range(e.n_draws):
            modes = site_modes(ctx.run, term, ei, d, ci_lower, draws, probe=probe)
            out = ctx.model.masked_forward(ctx.batch, modes)
            if probe.record is not None:
                tag = f"t{term.index}.e{ei}.d{d}"
                probe.put(f"masked_out.{tag}", out)
                if e.routing == "uniform_k":
                    probe.put(f"route.{tag}", routes_of(modes, e.live))
                for name, m in modes.items():
                    probe.put(f"mask.{tag}.{name}", m.mask)
            total = total + ctx.divergence(out)
            n += 1
    return summed(total, f"loss_terms.{term.index}: the forwards of its entries") / n
