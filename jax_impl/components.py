"""The decomposed model, functionally: the target's site hook runs either the frozen path
or the masked decomposed path (SPEC S4-S8). Mirrors
oracle_torch/components.py: `SiteMode`, `inner_act`, `DecomposedModel.clean_forward`,
`DecomposedModel.masked_forward`, `DecomposedModel.weight`. Differs in how a live site is
evaluated: the delta path in the S4b form, on positions flattened to one axis."""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from contract.resolve import ResolvedRun, Site
from contract.targets import module_table
from jax_impl.targets import frozen_product, frozen_site, load_frozen, target_forward


@dataclass
class SiteMode:
    """How a live site runs in one forward. mask [..., C]; delta_mask [...] or None (no
    delta path); route bool [...] or None (routed everywhere)."""
    mask: jax.Array
    delta_mask: jax.Array | None
    route: jax.Array | None


def inner_act(site: Site, x, V):
    """x . V: for an embedding site the row V[token]."""
    return V[x] if site.kind == "embedding" else x @ V


class DecomposedModel:
    """Holds the frozen target (JAX layout, via contract.layout) and runs its forwards.
    `frozen` is passed explicitly to the forwards so jitted steps take it as an argument."""

    def __init__(self, run: ResolvedRun, dtype):
        self.run = run
        self.kind = run.cfg.target.kind
        _, self.target_cfg, self.frozen = load_frozen(run.cfg.target.weights, dtype)
        self.modules = {m.name: m for m in module_table(self.kind, self.target_cfg)}
        self.sites = {s.name: s for s in run.sites}

    def weight(self, frozen, name: str):
        """The right-multiply weight [d_in, d_out] (embedding: [vocab, d_emb])."""
        return frozen[f"{name}.weight"]

    def _site_fn(self, frozen, params, modes: dict, capture: dict | None):
        def site(name, x):
            if capture is not None:
                capture[name] = x
            m = modes.get(name)
            info = self.modules[name]
            if m is None:  # S5: a non-live site runs the frozen path exactly
                return frozen_site(frozen, info, x)
            # a live site runs on positions flattened to one axis (2-D matmuls: XLA's CPU
            # backward of a rank-3 matmul transposes its activations through copies)
            lead = x.shape if info.kind == "embedding" else x.shape[:-1]
            y = live_site(name, x.reshape((-1,) + x.shape[len(lead):]), flat_mode(m, lead))
            return y.reshape(lead + y.shape[1:])

        def live_site(name, x, m: SiteMode):
            info = self.modules[name]
            s = self.sites[name]
            V, U = params[f"components.{name}.V"], params[f"components.{name}.U"]
            a = inner_act(s, x, V)
            xw = None
            if m.delta_mask is None:
                y = (a * m.mask) @ U
            else:
                # S4b: m_Δ·x(W − VU) = m_Δ·xW + (xV ⊙ (−m_Δ))U: the delta path is the frozen
                # product plus the components under mask m − m_Δ. Equal in exact arithmetic, with
                # no [d_in, d_out] delta tensor and no backward through W − VU.
                dm = m.delta_mask[..., None]
                xw = frozen_product(frozen, info, x)
                y = (a * (m.mask - dm)) @ U + dm * xw
            bias = frozen[f"{name}.bias"] if s.kind == "linear" and s.has_bias else None
            if bias is not None:
                y = y + bias
            if m.route is None:
                return y
            # S6: routed-out positions take the frozen output itself (the same xW + b as S5)
            if xw is None:
                frozen_out = frozen_site(frozen, info, x)
            else:
                frozen_out = xw if bias is None else xw + bias
            return jnp.where(m.route[..., None], y, frozen_out)
        site.decomposed = frozenset(self.sites)  # lets the target refuse input embeddings with an embedding site
        return site

    def clean_forward(self, frozen, batch):
        """S7: every site frozen, stop-gradient. Returns (output, site inputs)."""
        cap: dict = {}
        out = target_forward(self.kind, self.target_cfg, frozen, batch, self._site_fn(frozen, {}, {}, cap))
        return jax.lax.stop_gradient(out), {k: jax.lax.stop_gradient(v) for k, v in cap.items() if k in self.sites}

    def masked_forward(self, frozen, params, batch, modes: dict):
        return target_forward(self.kind, self.target_cfg, frozen, batch, self._site_fn(frozen, params, modes, None))


def flat_mode(m: SiteMode, lead: tuple) -> SiteMode:
    """The SiteMode over positions `lead` flattened: mask [N, C], delta_mask [N], route [N]
    (adversarial sources may be shared over positions, so they are broadcast first)."""
    flat = lambda t: None if t is None else jnp.broadcast_to(t, lead).reshape(-1)
    mask = jnp.broadcast_to(m.mask, lead + m.mask.shape[-1:])
    return SiteMode(mask.reshape(-1, mask.shape[-1]), flat(m.delta_mask), flat(m.route))
