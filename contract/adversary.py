"""Framework-free facts about the adversarial sources (SPEC S80-S87): source shapes per
scope, bundle names, and the config checks both backends share."""
from __future__ import annotations

from contract.config import ConfigError, PersistentPGDTerm, RunConfig


def n_channels(cfg: RunConfig, C: int) -> int:
    """C component channels, plus the delta channel when the delta component is on."""
    return C + 1 if cfg.use_delta_component else C


def source_shape(batch_shape: tuple[int, ...], scope: str, C_ch: int, n_sources: int | None = None) -> tuple[int, ...]:
    """S81: leading shape by scope, then the channels. Targets without a sequence axis
    drop T. c: [1,1]; bc/sc: [1,T]; nsc: [n,T]; bsc: [B,T]."""
    B = batch_shape[0]
    seq = batch_shape[1:]  # (T,) or ()
    lead = {"c": (1,) + (1,) * len(seq), "bc": (1,) + seq, "sc": (1,) + seq,
            "nsc": (n_sources,) + seq, "bsc": (B,) + seq}[scope]
    return lead + (C_ch,)


def bundle_of(i: int, t: PersistentPGDTerm) -> str:
    """The source bundle of persistent term i (S85): its `bundle` name or `t<i>`."""
    return t.bundle or f"t{i}"


def check_adversaries(cfg: RunConfig) -> None:
    """S85/S86: refusals shared by both backends."""
    owners: dict[str, int] = {}
    for i, t in enumerate(cfg.loss_terms):
        if isinstance(t, PersistentPGDTerm):  # persistent_pgd_recon, persistent_pgd_recon_subset
            if t.coeff == 0:
                raise ConfigError(f"loss_terms.{i}.coeff: a persistent PGD term with coefficient 0 trains its "
                                  "sources on a loss that never reaches the model; remove the term instead")
            if t.scope == "nsc" and t.n_sources is None:
                raise ConfigError(f"loss_terms.{i}.n_sources: required with scope 'nsc'")
            if t.scope != "nsc" and t.n_sources is not None:
                raise ConfigError(f"loss_terms.{i}.n_sources: only meaningful with scope 'nsc' (scope is {t.scope!r})")
            b = bundle_of(i, t)
            if b in owners:
                raise ConfigError(f"loss_terms.{i}.bundle: source bundle {b!r} already belongs to loss_terms.{owners[b]}; "
                                  "a bundle belongs to exactly one term")
            owners[b] = i
