"""Recon terms as plan x mask-source strategy (SPEC S25-S29). Mirrors
oracle_torch/recon.py, except that the oracle's per-term `recon_term` is `recon_terms` here:
all mask-source terms of a step together, their same-shape forwards stacked (S28b)."""
from __future__ import annotations

import jax.numpy as jnp

from contract.backend import NO_PROBE, Probe
from contract.draws import draw_name
from contract.resolve import ReconTerm, ResolvedRun
from jax_impl.components import SiteMode
from jax_impl.context import StepContext
from jax_impl.losses import output_divergence

# S28b: at most this many forwards per stacked call; a stack multiplies the activation memory
# of one forward by its size (n_mask_samples x terms can be large)
MAX_STACK = 4
MASK_SOURCES = ("stochastic", "ci_masked", "unmasked")  # the adversaries are in jax_impl/adversary.py


def route_from_uniforms(route_k, route_order):
    """S51: k = min(1 + floor(u n), n); site i routes iff fewer than k uniforms are below its own."""
    n = route_order.shape[-1]
    k = jnp.minimum(1 + jnp.floor(route_k * n), n)
    rank = (route_order[..., None, :] < route_order[..., :, None]).sum(-1)
    return rank < k[..., None]


def bernoulli_from_uniform(u):
    return (u < 0.5).astype(u.dtype)


def site_modes(run: ResolvedRun, term: ReconTerm, ei: int, d: int, ci_lower: dict, draws: dict,
               probe: Probe = NO_PROBE) -> dict:
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
            modes[name] = SiteMode(jnp.ones_like(ci), None, route)
        else:
            raise ValueError(f"loss_terms.{term.index}: source {term.source!r} is not implemented")
        if f"mask.{tag}.{name}" in probe.pins:
            modes[name].mask = probe.pins[f"mask.{tag}.{name}"].astype(ci.dtype)
    return modes


def routes_of(modes: dict, live):
    """The routes of one forward, bool [..., n_live]."""
    return jnp.stack([modes[n].route for n in live], -1)


def stack_modes(modes_list: list[dict], names) -> dict:
    """One SiteMode per site for forwards stacked along the batch axis. A forward routed
    everywhere gets an all-True route when another forward of the stack is routed (S6:
    `where(True, y, ·)` is y)."""
    out = {}
    for n in names:
        ms = [m[n] for m in modes_list]
        mask = jnp.concatenate([m.mask for m in ms])
        dm = None if ms[0].delta_mask is None else jnp.concatenate([m.delta_mask for m in ms])
        route = None
        if any(m.route is not None for m in ms):
            route = jnp.concatenate([m.route if m.route is not None else jnp.ones(m.mask.shape[:-1], bool) for m in ms])
        out[n] = SiteMode(mask, dm, route)
    return out


def recon_terms(ctx: StepContext, params: dict, terms: list[ReconTerm], ci_lower: dict, draws: dict,
                probe: Probe = NO_PROBE) -> dict:
    """{term index: value} for recon terms with mask sources (not the adversaries).

    S28b: the masked forwards of all these terms that share their live sites and their delta
    path run as ONE masked forward over the batch repeated along axis 0 (rows never mix in
    a forward, so each slice is that forward's output); each term then averages its own
    forwards' divergences in plan order, as the oracle's `recon_term` does."""
    run, model, frozen, batch = ctx.run, ctx.model, ctx.frozen, ctx.batch
    forwards = []  # (term, entry index, draw, modes)
    for term in terms:
        for ei, e in enumerate(term.entries):
            for d in range(e.n_draws):
                forwards.append((term, ei, d, site_modes(run, term, ei, d, ci_lower, draws, probe=probe)))
    groups: dict[tuple, list[int]] = {}
    for i, (term, ei, _, modes) in enumerate(forwards):
        key = (term.entries[ei].live, next(iter(modes.values())).delta_mask is not None)
        groups.setdefault(key, []).append(i)
    outs: dict[int, object] = {}
    B = batch.shape[0]
    stacks = [(live, idx[k:k + MAX_STACK]) for (live, _), idx in groups.items() for k in range(0, len(idx), MAX_STACK)]
    for live, idx in stacks:
        if len(idx) == 1:
            outs[idx[0]] = model.masked_forward(frozen, params, batch, forwards[idx[0]][3])
            continue
        modes = stack_modes([forwards[i][3] for i in idx], live)
        out = model.masked_forward(frozen, params, jnp.concatenate([batch] * len(idx)), modes)
        for j, i in enumerate(idx):
            outs[i] = out[j * B:(j + 1) * B]
    values, counts = {}, {}
    for i, (term, ei, d, modes) in enumerate(forwards):
        e, out = term.entries[ei], outs[i]
        if probe.record is not None:
            tag = f"t{term.index}.e{ei}.d{d}"
            probe.put(f"masked_out.{tag}", out)
            if e.routing == "uniform_k":
                probe.put(f"route.{tag}", routes_of(modes, e.live))
            for name, m in modes.items():
                probe.put(f"mask.{tag}.{name}", m.mask)
        values[term.index] = values.get(term.index, 0.0) + output_divergence(run.cfg.output_loss, out, ctx.clean)
        counts[term.index] = counts.get(term.index, 0) + 1
    return {k: v / counts[k] for k, v in values.items()}
