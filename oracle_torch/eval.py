"""Evaluation metrics of a decomposition (no gradient). The JAX mirror is jax_impl/eval.py
with the same function names.

On one eval batch (`contract.data.batch_for_step(run, seed, k, batch=cfg.eval.batch_size,
split="eval")`), with every site live and routed everywhere:

- `eval/l0/{site}`: mean over positions of #components with ci_lower > 0;
- the output loss under five masks (the S26 sources, plus two diagnostics):
    ci          mask = ci_lower, no delta path
    stochastic  mask = ci + (1 - ci)·u (u Bernoulli(½) = `u < 0.5` under binomial),
                delta mask = raw u_delta when use_delta_component
    unmasked    mask = 1, no delta path
    rounded     mask = (ci_lower > 0.5), no delta path
    zero        mask = 0, no delta path
  toys: `eval/mse/{variant}` vs the clean output; llama: `eval/kl/{variant}` =
  KL(clean || masked), mean over positions, and `eval/ce/{variant}` next-token
  cross-entropy, plus `eval/ce/target` for the clean model.

CI in eval is deterministic: ci_lower = lower_leaky_hard(z) even under binomial sampling
(the binomial noise is a training device). The eval draws are named `eval.{site}.source`
[..., C], `eval.{site}.delta` [...] and, with the PGD probe, `eval.{site}.pgd_init`
(U[0,1)); `contract/draws.py::eval_draw_plan` lists them for both backends and
the parity harness. `n_batches` eval batches are
averaged (batch j of the eval at step k is eval-stream step `k * n_batches + j`).
"""
from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

from contract.data import batch_for_step
from contract.draws import eval_batch_shape, eval_draw_plan
from contract.metrics import EVAL_VARIANTS
from contract.resolve import ResolvedRun
from oracle_torch.adversary import sign_ascent, source_divergence
from oracle_torch.ci_fn import ci_logits
from oracle_torch.components import DecomposedModel, SiteMode, inner_act
from oracle_torch.context import StepContext
from oracle_torch.losses import output_divergence
from oracle_torch.recon import bernoulli_from_uniform
from oracle_torch.sigmoids import ci_pair
from oracle_torch.train import l0_per_site


def eval_seed(seed: int, step: int, j: int) -> int:
    """Seed of the torch generator of eval batch j at step `step` (its own stream)."""
    h = hashlib.sha256(f"vpd-eval:{seed}:{step}:{j}".encode()).digest()
    return int.from_bytes(h[:8], "little") % (2**63)


def sample_eval_draws(run: ResolvedRun, step: int, j: int, dtype, batch_shape=None) -> dict[str, torch.Tensor]:
    """Production eval draws: a torch generator keyed by (seed, step, j)."""
    g = torch.Generator().manual_seed(eval_seed(run.cfg.seed, step, j))
    plan = eval_draw_plan(run, batch_shape or eval_batch_shape(run))
    return {d.name: torch.rand(d.shape, generator=g, dtype=dtype) for d in plan}


def to_torch_batch(b, dtype) -> torch.Tensor:
    """numpy batch -> torch: token ids stay int64, toy features take the working dtype."""
    if b.dtype.kind in "iu":
        return torch.as_tensor(b).long()
    return torch.as_tensor(b, dtype=dtype)


def eval_ci(run: ResolvedRun, model: DecomposedModel, params: dict, batch):
    """(clean output, deterministic ci_lower per site) of a batch."""
    clean, site_inputs = model.clean_forward(batch)
    inner = {}
    if run.cfg.ci_fn.type == "mlp":
        inner = {s.name: inner_act(s, site_inputs[s.name], params[f"components.{s.name}.V"]) for s in run.sites}
    z = ci_logits(run, params, site_inputs, inner)
    return clean, {s.name: ci_pair(z[s.name], None)[0] for s in run.sites}


def eval_modes(run: ResolvedRun, variant: str, ci_lower: dict, draws: dict) -> dict[str, SiteMode]:
    """SiteModes of one eval variant: every site live, routed everywhere."""
    modes = {}
    for s in run.sites:
        ci = ci_lower[s.name]
        if variant == "ci":
            modes[s.name] = SiteMode(ci, None, None)
        elif variant == "stochastic":
            u = draws[f"eval.{s.name}.source"]
            if run.cfg.sampling == "binomial":
                u = bernoulli_from_uniform(u)
            dm = draws[f"eval.{s.name}.delta"] if run.cfg.use_delta_component else None
            modes[s.name] = SiteMode(ci + (1 - ci) * u, dm, None)
        elif variant == "unmasked":
            modes[s.name] = SiteMode(torch.ones_like(ci), None, None)
        elif variant == "rounded":
            modes[s.name] = SiteMode((ci > 0.5).to(ci.dtype), None, None)
        elif variant == "zero":
            modes[s.name] = SiteMode(torch.zeros_like(ci), None, None)
        else:
            raise ValueError(f"unknown eval variant {variant!r}")
    return modes


def next_token_ce(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of logits [B, T, V] on tokens [B, T], in at least fp32."""
    wd = torch.promote_types(logits.dtype, torch.float32)
    lg = logits[:, :-1].to(wd)
    return F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tokens[:, 1:].reshape(-1))


@torch.no_grad()
def eval_metrics(run: ResolvedRun, model: DecomposedModel, params: dict, batch, draws: dict) -> dict[str, float]:
    """All eval metrics of one batch (see the module docstring)."""
    clean, ci_lower = eval_ci(run, model, params, batch)
    out = {f"eval/l0/{n}": v for n, v in l0_per_site(ci_lower).items()}
    llama = run.cfg.target.kind == "llama"
    if llama:
        out["eval/ce/target"] = float(next_token_ce(clean, batch))
    for v in EVAL_VARIANTS:
        pred = model.masked_forward(batch, eval_modes(run, v, ci_lower, draws))
        if llama:
            out[f"eval/kl/{v}"] = float(output_divergence("kl", pred, clean))
            out[f"eval/ce/{v}"] = float(next_token_ce(pred, batch))
        else:
            out[f"eval/mse/{v}"] = float(output_divergence("mse", pred, clean))
    if run.cfg.eval.pgd_steps:
        ctx = StepContext(run=run, model=model, batch=batch, clean=clean)
        out[f"eval/pgd/{'kl' if llama else 'mse'}"] = float(pgd_probe(ctx, ci_lower, draws))
    return out


def pgd_probe(ctx: StepContext, ci_lower: dict, draws: dict) -> torch.Tensor:
    """S88: the recon loss under a fresh-PGD adversary (every site live, routed everywhere,
    per-position sources from `eval.<site>.pgd_init`, `eval.pgd_steps` sign ascents of
    `eval.pgd_step_size`). Detached: a metric, never a loss."""
    e, sites = ctx.run.cfg.eval, ctx.run.site_names
    srcs = {n: draws[f"eval.{n}.pgd_init"] for n in sites}
    with torch.enable_grad():
        srcs = sign_ascent(ctx, sites, ci_lower, srcs, None, "bsc", e.pgd_step_size, e.pgd_steps)
    d, _ = source_divergence(ctx, sites, ci_lower, srcs, None, "bsc")
    return d


def evaluate(run: ResolvedRun, model: DecomposedModel, params: dict, step: int, dtype) -> dict[str, float]:
    """The eval of the training loop at `step`: the mean of `eval_metrics` over
    `cfg.eval.n_batches` eval batches, draws from a torch generator keyed by (seed, step, j)."""
    cfg = run.cfg
    n = cfg.eval.n_batches
    acc: dict[str, float] = {}
    for j in range(n):
        b = batch_for_step(run, cfg.seed, step * n + j, batch=cfg.eval.batch_size, split="eval")
        batch = to_torch_batch(b, dtype)
        m = eval_metrics(run, model, params, batch, sample_eval_draws(run, step, j, dtype))
        for k, v in m.items():
            acc[k] = acc.get(k, 0.0) + v
    return {k: v / n for k, v in acc.items()}
