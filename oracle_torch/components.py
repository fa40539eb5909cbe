"""The decomposed model: a frozen torch target whose site modules are swapped for
`SiteModule`s that run either the frozen path or the masked decomposed path
(SPEC S4-S8). Trainable state lives in a flat dict of Parameters
(names from contract/init.py)."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from contract.resolve import ResolvedRun, Site
from oracle_torch.targets import load_target, target_forward


@dataclass
class SiteMode:
    """How a live site runs in one forward. mask [..., C]; delta_mask [...] or None (no
    delta path); route bool [...] or None (routed everywhere)."""
    mask: torch.Tensor
    delta_mask: torch.Tensor | None
    route: torch.Tensor | None


class SiteModule(nn.Module):
    frozen: nn.Linear | nn.Embedding

    def __init__(self, site: Site, frozen: nn.Module, params: dict):
        super().__init__()
        want = nn.Embedding if site.kind == "embedding" else nn.Linear
        if not isinstance(frozen, want):
            raise TypeError(f"site {site.name!r} of kind {site.kind!r} needs an nn.{want.__name__}, "
                            f"the target has an {type(frozen).__name__}")
        self.site = site
        self.frozen = frozen  # the original nn.Linear / nn.Embedding (requires_grad False)
        self.params = params
        self.mode: SiteMode | None = None
        self.capture: dict | None = None

    def W(self) -> torch.Tensor:
        """The right-multiply weight [d_in, d_out] (embedding: [vocab, d_emb])."""
        w = self.frozen.weight
        return w if self.site.kind == "embedding" else w.T

    def frozen_forward(self, x):
        f = self.frozen
        if isinstance(f, nn.Embedding):  # <=> site.kind == "embedding" (checked in __init__)
            return F.embedding(x, f.weight)
        return F.linear(x, f.weight, f.bias)

    def forward(self, x):
        if self.capture is not None:
            self.capture[self.site.name] = x
        m = self.mode
        if m is None:  # S5: a non-live site runs the frozen path exactly
            return self.frozen_forward(x)
        V = self.params[f"components.{self.site.name}.V"]
        U = self.params[f"components.{self.site.name}.U"]
        a = inner_act(self.site, x, V)
        y = (a * m.mask) @ U
        if m.delta_mask is not None:
            delta = self.W() - V @ U
            xd = F.embedding(x, delta) if self.site.kind == "embedding" else x @ delta
            y = y + m.delta_mask[..., None] * xd
        if isinstance(self.frozen, nn.Linear) and self.frozen.bias is not None:  # <=> site.kind == "linear"
            y = y + self.frozen.bias
        if m.route is None:
            return y
        # S6: routed-out positions take the frozen output itself
        return torch.where(m.route[..., None], y, self.frozen_forward(x))


def inner_act(site: Site, x, V):
    """x . V: for an embedding site the row V[token]."""
    return F.embedding(x, V) if site.kind == "embedding" else x @ V


def _set_submodule(root: nn.Module, name: str, new: nn.Module):
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, new)


class DecomposedModel:
    def __init__(self, run: ResolvedRun, params: dict, dtype: torch.dtype):
        self.run = run
        self.kind = run.cfg.target.kind
        self.target = load_target(run.cfg.target.weights, dtype)
        self.params = params
        self.sites: dict[str, SiteModule] = {}
        for s in run.sites:
            mod = SiteModule(s, self.target.get_submodule(s.name), params)
            _set_submodule(self.target, s.name, mod)
            self.sites[s.name] = mod

    def weight(self, name: str) -> torch.Tensor:
        return self.sites[name].W()

    @contextmanager
    def _modes(self, modes: dict[str, SiteMode], capture: dict | None = None):
        try:
            for n, mod in self.sites.items():
                mod.mode = modes.get(n)
                mod.capture = capture
            yield
        finally:
            for mod in self.sites.values():
                mod.mode, mod.capture = None, None

    def clean_forward(self, batch):
        """S7: every site frozen, stop-gradient. Returns (output, site inputs)."""
        cap: dict = {}
        with torch.no_grad(), self._modes({}, cap):
            out = target_forward(self.target, self.kind, batch)
        return out, cap

    def masked_forward(self, batch, modes: dict[str, SiteMode]):
        with self._modes(modes):
            return target_forward(self.target, self.kind, batch)
