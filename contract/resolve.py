"""Resolve a RunConfig against its target: the ordered site list, the recon plans, and
the cross-field checks both backends share (so an unsupported combination is refused by
both with the same message). Spec S2 (site order), S20 (plans)."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from contract.adversary import bundle_of, check_adversaries
from contract.config import RECON_TERMS, ChunkwiseSubsetRecon, ConfigError, FreshPGDTerm, PersistentPGDTerm, RunConfig
from contract.seeded_targets import ensure_weights
from contract.targets import ModuleInfo, load_target_meta, module_table, resolve_path


@dataclass(frozen=True)
class Site:
    name: str
    kind: str  # linear | embedding
    d_in: int
    d_out: int
    has_bias: bool
    C: int


@dataclass(frozen=True)
class PlanEntry:
    live: tuple[str, ...]  # live sites, canonical order
    routing: str  # "everywhere" | "uniform_k"
    n_draws: int


@dataclass(frozen=True)
class ReconTerm:
    index: int  # position in cfg.loss_terms
    type: str
    plan: str
    source: str
    entries: tuple[PlanEntry, ...]
    bundle: str | None = None  # persistent PGD: the term's source bundle (S85)


def fresh_cfg(run: ResolvedRun, term: ReconTerm) -> FreshPGDTerm:
    """The config of a fresh-PGD recon term: source 'fresh_pgd' <=> a pgd_recon* term (RECON_TERMS)."""
    tc = run.cfg.loss_terms[term.index]
    if not isinstance(tc, FreshPGDTerm):
        raise TypeError(f"loss_terms.{term.index}: source {term.source!r} needs a pgd_recon* term, got {tc.type!r}")
    return tc


def persistent_cfg(run: ResolvedRun, term: ReconTerm) -> PersistentPGDTerm:
    """The config of a persistent-PGD recon term: source 'persistent_pgd' <=> a
    persistent_pgd_recon* term (RECON_TERMS)."""
    tc = run.cfg.loss_terms[term.index]
    if not isinstance(tc, PersistentPGDTerm):
        raise TypeError(f"loss_terms.{term.index}: source {term.source!r} needs a persistent_pgd_recon* term, got {tc.type!r}")
    return tc


@dataclass(frozen=True)
class ResolvedRun:
    cfg: RunConfig
    target_meta: dict
    sites: tuple[Site, ...]
    recon_terms: tuple[ReconTerm, ...]
    batch_shape: tuple[int, ...]  # leading shape of one training batch (B,) or (B, T)

    @property
    def site_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.sites)

    def site(self, name: str) -> Site:
        return next(s for s in self.sites if s.name == name)




def expand_sites(cfg: RunConfig, modules: list[ModuleInfo]) -> tuple[Site, ...]:
    """S2: sites in the order of the config's patterns; within one pattern, in the
    target's canonical module order. A module matched twice is an error."""
    seen: dict[str, int] = {}
    out = []
    for i, sc in enumerate(cfg.sites):
        hits = [m for m in modules if fnmatch.fnmatchcase(m.name, sc.pattern)]
        if not hits:
            names = ", ".join(m.name for m in modules[:12])
            raise ConfigError(f"sites.{i}.pattern: {sc.pattern!r} matches no module of the target (modules: {names}, ...)")
        for m in hits:
            if m.name in seen:
                raise ConfigError(f"sites.{i}.pattern: {sc.pattern!r} matches {m.name!r}, already matched by sites.{seen[m.name]}")
            seen[m.name] = i
            out.append(Site(m.name, m.kind, m.d_in, m.d_out, m.has_bias, sc.C))
    return tuple(out)


def build_entries(plan: str, names: tuple[str, ...], n_draws: int, sites_per_chunk: int | None) -> tuple[PlanEntry, ...]:
    if plan == "all":
        return (PlanEntry(names, "everywhere", n_draws),)
    if plan == "per_site":
        return tuple(PlanEntry((n,), "everywhere", n_draws) for n in names)
    if plan == "subset":
        return (PlanEntry(names, "uniform_k", n_draws),)
    if plan == "chunks":
        if sites_per_chunk is None:
            raise ValueError("plan 'chunks' needs sites_per_chunk")
        k = sites_per_chunk
        return tuple(PlanEntry(names[i:i + k], "uniform_k", n_draws) for i in range(0, len(names), k))
    raise ValueError(plan)


def resolve_run(cfg: RunConfig) -> ResolvedRun:
    ensure_weights(resolve_path(cfg.target.weights))  # a seeded target is made on first use (S120)
    meta = load_target_meta(cfg.target.weights)
    if meta["kind"] != cfg.target.kind:
        raise ConfigError(f"target.kind: config says {cfg.target.kind!r} but {cfg.target.weights} holds a {meta['kind']!r} target")
    sites = expand_sites(cfg, module_table(cfg.target.kind, meta["config"]))
    names = tuple(s.name for s in sites)

    # ---- cross-field checks (both backends call this) ----
    K = cfg.runtime.mesh.components  # S140: every site's C is split evenly over the components axis
    for s in sites:
        if s.C % K:
            raise ConfigError(f"runtime.mesh.components: site {s.name!r} has C = {s.C}, not divisible by "
                              f"runtime.mesh.components = {K}; choose a K that divides every site's C")
    if cfg.batch_size % cfg.runtime.mesh.data:
        raise ConfigError(f"batch_size: {cfg.batch_size} is not divisible by runtime.mesh.data ({cfg.runtime.mesh.data})")
    if cfg.eval.batch_size % cfg.runtime.mesh.data:
        raise ConfigError(f"eval.batch_size: {cfg.eval.batch_size} is not divisible by runtime.mesh.data ({cfg.runtime.mesh.data})")
    for s in sites:
        if s.kind == "embedding" and cfg.ci_fn.type != "mlp":
            raise ConfigError(f"ci_fn.type: {cfg.ci_fn.type!r} cannot take the token ids of embedding site {s.name!r}; use 'mlp'")
    if cfg.target.kind == "llama":
        if cfg.output_loss != "kl":
            raise ConfigError("output_loss: the llama target is decomposed with 'kl' on its logits")
        if cfg.data.seq_len is None:
            raise ConfigError("data.seq_len: required for the llama target")
        if cfg.data.source == "features":
            raise ConfigError("data.source: the llama target reads 'corpus' or 'token_file'")
        if cfg.data.source == "token_file":  # refused before any backend embeds an id (S63)
            from contract.data import check_token_file
            if cfg.data.token_file is None:  # DataConfig refuses this too; restated for the checks below
                raise ConfigError("data.token_file is required when data.source is 'token_file'")
            try:
                check_token_file(cfg.data.token_file, meta["config"]["vocab_size"])
            except (ValueError, OSError) as e:
                raise ConfigError(str(e)) from None
    else:
        if cfg.data.source != "features":
            raise ConfigError(f"data.source: the {cfg.target.kind} target reads 'features'")
        if cfg.data.seq_len is not None:
            raise ConfigError(f"data.seq_len: the {cfg.target.kind} target has no sequence axis")
    if cfg.ci_fn.type == "global_shared_transformer" and cfg.target.kind != "llama":
        pass  # inputs without a sequence axis get a length-1 one (S17)

    recon = []
    n_terms_of_type: dict[str, int] = {}
    for i, t in enumerate(cfg.loss_terms):
        n_terms_of_type[t.type] = n_terms_of_type.get(t.type, 0) + 1
        if t.type not in RECON_TERMS:
            continue
        plan, source = RECON_TERMS[t.type]
        # plan 'chunks' <=> chunkwise_subset_recon, source 'persistent_pgd' <=> a PersistentPGDTerm
        sites_per_chunk = t.sites_per_chunk if isinstance(t, ChunkwiseSubsetRecon) else None
        if sites_per_chunk is not None and sites_per_chunk > len(sites):
            raise ConfigError(f"loss_terms.{i}.sites_per_chunk: {sites_per_chunk} is larger than the number of sites ({len(sites)})")
        n_draws = cfg.n_mask_samples if source == "stochastic" else 1
        entries = build_entries(plan, names, n_draws, sites_per_chunk)
        recon.append(ReconTerm(i, t.type, plan, source, entries,
                               bundle_of(i, t) if isinstance(t, PersistentPGDTerm) else None))
    check_adversaries(cfg)
    for ty in ("faithfulness", "importance_minimality"):
        if n_terms_of_type.get(ty, 0) > 1:
            raise ConfigError(f"loss_terms: {ty!r} appears {n_terms_of_type[ty]} times; it may appear once")

    B = cfg.batch_size
    batch_shape: tuple[int, ...] = (B,)
    if cfg.target.kind == "llama":
        if cfg.data.seq_len is None:  # refused above; restated so the shape is all ints
            raise ConfigError("data.seq_len: required for the llama target")
        batch_shape = (B, cfg.data.seq_len)
    return ResolvedRun(cfg, meta, sites, tuple(recon), batch_shape)
