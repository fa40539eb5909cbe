"""One VPD training step and the faithfulness warmup (SPEC S30-S45).

`train_step` consumes the draws of the draw plan as a dict of tensors: sampled from a
torch generator in normal runs (`sample_draws`), supplied by the parity harness in parity
runs. One code path either way.

On N data ranks (S108-S109) the same code runs on every rank with this rank's rows of the
batch and of the batched draws: the forward of a step goes through the FSDP2 module
(`whole`), which gathers the parameters, and everything that sums over the batch is global
(oracle_torch/ranks.py). At world size 1 `whole` is a plain call."""
from __future__ import annotations

import hashlib
import math

import torch

from contract.backend import NO_PROBE, Probe, nonfinite_metrics
from contract.draws import DrawSpec, draw_plan
from contract.metrics import term_key
from contract.resolve import ResolvedRun, persistent_cfg
from contract.schedules import hparams
from oracle_torch.adversary import adam_ascent, fresh_pgd_term, persistent_pgd_term, persistent_warmup
from oracle_torch.ci_fn import ci_logits
from oracle_torch.components import DecomposedModel, inner_act
from oracle_torch.context import StepContext
from oracle_torch.losses import faithfulness, importance_minimality, summed
from oracle_torch.ranks import ONE, Ranks, full, local
from oracle_torch.recon import recon_term
from oracle_torch.sigmoids import ci_pair
from oracle_torch.state import TrainState, per_position


def sample_draws(plan: list[DrawSpec], seed: int, step: int, dtype) -> dict[str, torch.Tensor]:
    """Production sampling of the draw plan with a torch generator keyed by (seed, step)."""
    g = torch.Generator().manual_seed(step_seed(seed, step))
    return {d.name: torch.rand(d.shape, generator=g, dtype=dtype) for d in plan}


def step_seed(seed: int, step: int) -> int:
    """A 63-bit generator seed per (seed, step), without collisions between nearby pairs."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{step}".encode()).digest()[:8], "little") >> 1


def whole(state: TrainState, model: DecomposedModel, fn, *args):
    """`fn(params, *args)` with the whole parameters bound into `model`: on one rank a plain
    call; on N ranks through the FSDP2 module, which gathers them for the call and
    reduce-scatters (averages, S109) their gradients in the backward of its outputs."""
    if state.module is None:
        return fn(state.params, *args)

    def bound(params, *a):
        model.params.update(params)  # the model's own dict (backend.py), never state.params
        return fn(params, *a)
    return state.module(bound, *args)


def faithfulness_warmup(run: ResolvedRun, model: DecomposedModel, state: TrainState) -> list[float]:
    """S44: AdamW on faithfulness alone (own lr / weight decay, no clip); the optimizer is
    discarded afterwards."""
    w = run.cfg.faithfulness_warmup
    if w.steps == 0:
        return []
    comp = [p for n, p in state.params.items() if n.startswith("components.")]
    opt = torch.optim.AdamW(comp, lr=w.lr, weight_decay=w.weight_decay, foreach=False)
    losses = []
    for _ in range(w.steps):
        opt.zero_grad(set_to_none=True)
        loss = whole(state, model, lambda params: faithfulness(run, model, params))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float | None, ranks: Ranks = ONE) -> float:
    """S43: torch's clip_grad_norm_ semantics: scale = max / (norm + 1e-6), clamped to 1."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:  # e.g. a faithfulness-only config leaves the CI function without gradient
        return 0.0
    # on N ranks the norm of the whole sharded gradient, and each rank scales its shard
    total = torch.linalg.vector_norm(torch.stack(ranks.norms(grads)))
    if max_norm is not None:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            local(g).mul_(coef)
    return float(total)


def forward_terms(run: ResolvedRun, model: DecomposedModel, params: dict, batch, draws: dict, hp: dict,
                  sources: dict | None = None, probe: Probe = NO_PROBE, ranks: Ranks = ONE):
    """Everything up to the total loss; `sources` are the persistent-PGD sources by bundle.
    `probe.pins` (stage bundles) replace computed `ci_lower.<site>` / `ci_upper.<site>` and
    per-forward routes / masks with given values. Every term is its global value (S109).
    Returns (total, {term_key: value}, ci_lower)."""
    cfg = run.cfg
    clean, site_inputs, z, ci_lower, ci_upper = clean_and_ci(run, model, params, batch, draws)
    for s in run.sites:
        ci_lower[s.name] = probe.pin(f"ci_lower.{s.name}", ci_lower[s.name])
        ci_upper[s.name] = probe.pin(f"ci_upper.{s.name}", ci_upper[s.name])
    probe.put("clean_out", clean)
    for s in run.sites:
        probe.put(f"site_input.{s.name}", site_inputs[s.name])
        probe.put(f"ci_logits.{s.name}", z[s.name])
        probe.put(f"ci_lower.{s.name}", ci_lower[s.name])
        probe.put(f"ci_upper.{s.name}", ci_upper[s.name])
    ctx = StepContext(run=run, model=model, batch=batch, clean=clean, ranks=ranks)
    recon = {t.index: t for t in run.recon_terms}
    terms: dict[str, torch.Tensor] = {}
    total: torch.Tensor | float = 0.0
    for i, t in enumerate(cfg.loss_terms):
        if t.type == "faithfulness":
            v = faithfulness(run, model, params)
        elif t.type == "importance_minimality":
            v = importance_minimality(run, ci_upper, hp["imp_min_p"], t.beta, t.eps, ranks)
        elif recon[i].source == "fresh_pgd":
            v = fresh_pgd_term(ctx, recon[i], ci_lower, draws, probe=probe)
        elif recon[i].source == "persistent_pgd":
            if sources is None:
                raise ValueError(f"forward_terms: loss_terms.{i} is a persistent PGD term and needs `sources` "
                                 "(the persistent-PGD sources by bundle); none were given")
            v = persistent_pgd_term(ctx, recon[i], ci_lower, sources[recon[i].bundle], draws, probe=probe)
        else:
            v = recon_term(ctx, recon[i], ci_lower, draws, probe=probe)
        terms[term_key(i, t)] = v
        total = total + t.coeff * v
    total = summed(total, "loss_terms")
    for k, v in terms.items():
        probe.put(f"term.{k}", v)
    probe.put("term.total", total)
    return total, terms, ci_lower


def clean_and_ci(run: ResolvedRun, model: DecomposedModel, params: dict, batch, draws: dict):
    """S7, S12-S17: clean output, site inputs, CI logits, (ci_lower, ci_upper) per site."""
    clean, site_inputs = model.clean_forward(batch)
    inner = {}
    if run.cfg.ci_fn.type == "mlp":
        inner = {s.name: inner_act(s, site_inputs[s.name], params[f"components.{s.name}.V"]) for s in run.sites}
    z = ci_logits(run, params, site_inputs, inner)
    ci_lower, ci_upper = {}, {}
    for s in run.sites:
        u = draws[f"binomial.{s.name}"] if run.cfg.sampling == "binomial" else None
        ci_lower[s.name], ci_upper[s.name] = ci_pair(z[s.name], u)
    return clean, site_inputs, z, ci_lower, ci_upper


def adversary_warmup(run: ResolvedRun, model: DecomposedModel, state: TrainState, params: dict, batch, draws: dict,
                     hp: dict):
    """S84 (1): each persistent term's n_warmup detached ascents, before the main loss."""
    terms = [t for t in run.recon_terms if t.source == "persistent_pgd" and persistent_cfg(run, t).n_warmup]
    if not terms:
        return
    with torch.no_grad():
        clean, _, _, ci_lower, _ = clean_and_ci(run, model, params, batch, draws)
    ctx = StepContext(run=run, model=model, batch=batch, clean=clean, ranks=state.ranks)
    for t in terms:
        persistent_warmup(ctx, t, ci_lower, state.sources[t.bundle], state.source_opt[t.bundle],
                          hp[f"lr_sources.{t.bundle}"])


def l0_per_site(ci_lower: dict, ranks: Ranks = ONE) -> dict[str, float]:
    """Mean over the global positions of the number of components with ci_lower > 0."""
    return {n: float(ranks.mean((c > 0).to(torch.float64).sum(-1))) for n, c in ci_lower.items()}


def step_forward(params: dict, run: ResolvedRun, model: DecomposedModel, state: TrainState, batch, draws: dict,
                 hp: dict, probe: Probe):
    """The forward of one step with whole `params`: the adversary warmup, every term, and
    each persistent bundle's final-ascent gradient (S84 (3): d(term, unscaled)/d(sources)
    from the same graph as the main backward, i.e. at the pre-update parameters; global,
    S109). Returns (total, terms, ci_lower, source grads, the source leaves)."""
    adversary_warmup(run, model, state, params, batch, draws, hp)
    leaves = {b: {n: s.detach().requires_grad_(True) for n, s in srcs.items()} for b, srcs in state.sources.items()}
    total, terms, ci_lower = forward_terms(run, model, params, batch, draws, hp, leaves, probe, state.ranks)
    src_grads = {}
    for t in run.recon_terms:
        if t.source == "persistent_pgd":
            lv = leaves[t.bundle]
            g = torch.autograd.grad(terms[term_key(t.index, run.cfg.loss_terms[t.index])], list(lv.values()),
                                    retain_graph=True)
            src_grads[t.bundle] = {n: state.ranks.source_grad(gi, per_position(run, t.bundle))
                                   for n, gi in zip(lv, g, strict=True)}
    detached = {b: {n: s.detach() for n, s in lv.items()} for b, lv in leaves.items()}
    return total, terms, {n: c.detach() for n, c in ci_lower.items()}, src_grads, detached


def source_norm(run: ResolvedRun, ranks: Ranks, bundle: str | None, t: torch.Tensor) -> float:
    """The norm of one source tensor or its gradient over the global batch (a per-position
    source holds this rank's rows)."""
    if ranks.sharded and per_position(run, bundle):
        return math.sqrt(source_sq(run, ranks, bundle, t))
    return float(torch.linalg.vector_norm(t))


def source_sq(run: ResolvedRun, ranks: Ranks, bundle: str | None, t: torch.Tensor) -> float:
    """sum(t ** 2) over the global batch."""
    sq = (t ** 2).sum()
    return float(ranks.sum(sq) if per_position(run, bundle) else sq)


def train_step(run: ResolvedRun, model: DecomposedModel, state: TrainState, batch, draws: dict,
               probe: Probe = NO_PROBE) -> dict[str, float]:
    """One step (S30): forward, backward, clip per group, AdamW per group. Returns the
    step's metrics; `probe.record` (if a dict) receives named intermediates and gradients."""
    cfg = run.cfg
    record = probe.record
    hp = hparams(cfg, state.step)
    for p in state.params.values():
        p.grad = None
    skip = cfg.guard.nonfinite == "skip"
    if skip:  # S106: the pre-step sources (the warmup replaces their tensors, never writes into them)
        kept_sources = {b: dict(s) for b, s in state.sources.items()}
        kept_opt = {b: {"m": dict(o["m"]), "v": dict(o["v"]), "t": o["t"]} for b, o in state.source_opt.items()}
    total, terms, ci_lower, src_grads, leaves = whole(state, model, step_forward, run, model, state, batch, draws,
                                                       hp, probe)
    total.backward()
    metrics = {f"loss/{k}": float(v.detach()) for k, v in terms.items()}
    metrics["loss/total"] = float(total.detach())
    grads = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in state.params.items()}
    for (n, g), norm in zip(grads.items(), state.ranks.norms(list(grads.values())), strict=True):
        metrics[f"grad_norm/{n}"] = float(norm)
        if record is not None:
            record[f"grad.{n}"] = full(g).detach().clone()
    comp, ci = state.group("components."), state.group("ci_fn.")
    metrics["grad_norm/components"] = clip_grad_norm([state.params[n] for n in comp], cfg.optim.components.clip,
                                                     state.ranks)
    metrics["grad_norm/ci_fn"] = clip_grad_norm([state.params[n] for n in ci], cfg.optim.ci_fn.clip, state.ranks)
    # S106: under `guard.nonfinite: skip` a step with a non-finite loss or gradient norm
    # updates nothing (parameters, optimizers, sources and their ascent state stay as they were)
    apply = not skip or step_finite(run, state, metrics, src_grads)
    if apply:
        for grp in state.opt_components.param_groups:
            grp["lr"] = hp["lr_components"]
        for grp in state.opt_ci_fn.param_groups:
            grp["lr"] = hp["lr_ci_fn"]
        state.opt_components.step()
        state.opt_ci_fn.step()
    for t in run.recon_terms:
        if t.source == "persistent_pgd":
            if record is not None:
                for n, g in src_grads[t.bundle].items():  # whole, on N ranks too
                    g = state.ranks.gather_rows(g) if per_position(run, t.bundle) else g
                    record[f"grad.sources.{t.bundle}.{n}"] = g.detach().clone()
            if apply:
                state.sources[t.bundle] = {n: s.detach() for n, s in leaves[t.bundle].items()}
                adam_ascent(state.sources[t.bundle], src_grads[t.bundle], state.source_opt[t.bundle],
                            hp[f"lr_sources.{t.bundle}"], persistent_cfg(run, t).optimizer)
            else:
                state.sources[t.bundle], state.source_opt[t.bundle] = kept_sources[t.bundle], kept_opt[t.bundle]
            for n, g in src_grads[t.bundle].items():
                metrics[f"grad_norm/sources.{t.bundle}.{n}"] = source_norm(run, state.ranks, t.bundle, g)
            metrics[f"param_norm/sources.{t.bundle}"] = math.sqrt(sum(source_sq(run, state.ranks, t.bundle, v)
                                                                      for v in state.sources[t.bundle].values()))
    with torch.no_grad():
        metrics["param_norm/components"] = math.sqrt(sum(state.ranks.sq_sums([state.params[n] for n in comp])))
        metrics["param_norm/ci_fn"] = math.sqrt(sum(state.ranks.sq_sums([state.params[n] for n in ci])))
    metrics |= {f"l0/{n}": v for n, v in l0_per_site(ci_lower, state.ranks).items()}
    metrics |= {f"sched/{k}": v for k, v in hp.items()}
    state.step += 1
    return metrics


def step_finite(run: ResolvedRun, state: TrainState, metrics: dict[str, float], src_grads: dict) -> bool:
    """S106: every loss and gradient norm of the step so far is finite, the persistent
    sources' gradient norms (reported after the update) included (the same verdict on every rank)."""
    src = {f"grad_norm/sources.{b}.{n}": source_norm(run, state.ranks, b, g)
           for b, gs in src_grads.items() for n, g in gs.items()}
    return not nonfinite_metrics(metrics | src)


def draws_for_step(run: ResolvedRun, step: int, dtype, batch_shape=None) -> dict[str, torch.Tensor]:
    return sample_draws(draw_plan(run, batch_shape), run.cfg.seed, step, dtype)
