"""One VPD training step and the faithfulness warmup (ALGORITHM §7; SPEC S30-S45).

`train_step` consumes the draws of the draw plan as a dict of tensors: sampled from a
torch generator in normal runs (`sample_draws`), supplied by the parity harness in parity
runs. One code path either way."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from contract.config import RunConfig
from contract.draws import DrawSpec, draw_plan
from contract.init import init_state
from contract.resolve import ResolvedRun
from contract.schedules import imp_min_p, schedule_value
from oracle_torch.ci_fn import ci_logits
from oracle_torch.components import DecomposedModel, inner_act
from oracle_torch.losses import faithfulness, importance_minimality
from oracle_torch.recon import recon_term
from oracle_torch.sigmoids import ci_pair

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"runtime.dtype: the torch oracle runs float32 or float64, not {name!r}")
    return DTYPES[name]


def term_key(i: int, t) -> str:
    return f"{i}.{t.type}"


@dataclass
class TrainState:
    params: dict[str, torch.nn.Parameter]
    opt_components: torch.optim.AdamW
    opt_ci_fn: torch.optim.AdamW
    step: int = 0
    extra: dict = field(default_factory=dict)

    def group(self, prefix: str) -> list[str]:
        return [n for n in self.params if n.startswith(prefix)]


def make_params(arrays: dict[str, np.ndarray], dtype) -> dict[str, torch.nn.Parameter]:
    return {n: torch.nn.Parameter(torch.tensor(a, dtype=dtype)) for n, a in arrays.items()}


def _adamw(params: list, oc) -> torch.optim.AdamW:
    # lr is set from the schedule every step; foreach=False keeps the per-tensor reference math
    return torch.optim.AdamW(params, lr=0.0, betas=tuple(oc.betas), eps=oc.eps,
                             weight_decay=oc.weight_decay, foreach=False)


def make_state(run: ResolvedRun, arrays: dict[str, np.ndarray] | None, dtype) -> TrainState:
    arrays = init_state(run) if arrays is None else arrays
    params = make_params(arrays, dtype)
    comp = [p for n, p in params.items() if n.startswith("components.")]
    ci = [p for n, p in params.items() if n.startswith("ci_fn.")]
    o = run.cfg.optim
    return TrainState(params, _adamw(comp, o.components), _adamw(ci, o.ci_fn))


def hparams(cfg: RunConfig, step: int) -> dict[str, float]:
    """Schedule values for `step`, computed on the host (S40, S41)."""
    hp = {"lr_components": schedule_value(cfg.optim.components.lr, step, cfg.steps),
          "lr_ci_fn": schedule_value(cfg.optim.ci_fn.lr, step, cfg.steps)}
    for t in cfg.loss_terms:
        if t.type == "importance_minimality":
            hp["imp_min_p"] = imp_min_p(t, step, cfg.steps)
    return hp


def sample_draws(plan: list[DrawSpec], seed: int, step: int, dtype) -> dict[str, torch.Tensor]:
    """Production sampling of the draw plan with a torch generator keyed by (seed, step)."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63))
    return {d.name: torch.rand(d.shape, generator=g, dtype=dtype) for d in plan}


def faithfulness_warmup(run: ResolvedRun, model: DecomposedModel, params: dict) -> list[float]:
    """S44: AdamW on faithfulness alone (own lr / weight decay, no clip); the optimizer is
    discarded afterwards."""
    w = run.cfg.faithfulness_warmup
    if w.steps == 0:
        return []
    comp = [p for n, p in params.items() if n.startswith("components.")]
    opt = torch.optim.AdamW(comp, lr=w.lr, weight_decay=w.weight_decay, foreach=False)
    losses = []
    for _ in range(w.steps):
        opt.zero_grad(set_to_none=True)
        loss = faithfulness(run, model, params)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float | None) -> float:
    """S43: torch's clip_grad_norm_ semantics: scale = max / (norm + 1e-6), clamped to 1."""
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    if max_norm is not None:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef)
    return float(total)


def forward_terms(run: ResolvedRun, model: DecomposedModel, params: dict, batch, draws: dict, hp: dict,
                  record: dict | None = None):
    """Everything up to the total loss. Returns (total, {term_key: value}, ci_lower)."""
    cfg = run.cfg
    clean, site_inputs = model.clean_forward(batch)
    inner = {}
    if cfg.ci_fn.type == "mlp":
        inner = {s.name: inner_act(s, site_inputs[s.name], params[f"components.{s.name}.V"]) for s in run.sites}
    z = ci_logits(run, params, site_inputs, inner)
    ci_lower, ci_upper = {}, {}
    for s in run.sites:
        u = draws[f"binomial.{s.name}"] if cfg.sampling == "binomial" else None
        ci_lower[s.name], ci_upper[s.name] = ci_pair(z[s.name], u)
    if record is not None:
        record["clean_out"] = clean
        for s in run.sites:
            record[f"site_input.{s.name}"] = site_inputs[s.name]
            record[f"ci_logits.{s.name}"] = z[s.name]
            record[f"ci_lower.{s.name}"] = ci_lower[s.name]
            record[f"ci_upper.{s.name}"] = ci_upper[s.name]
    recon = {t.index: t for t in run.recon_terms}
    terms, total = {}, 0.0
    for i, t in enumerate(cfg.loss_terms):
        if t.type == "faithfulness":
            v = faithfulness(run, model, params)
        elif t.type == "importance_minimality":
            v = importance_minimality(run, ci_upper, hp["imp_min_p"], t.beta, t.eps)
        else:
            v = recon_term(run, model, recon[i], batch, clean, ci_lower, draws, record)
        terms[term_key(i, t)] = v
        total = total + t.coeff * v
    if record is not None:
        for k, v in terms.items():
            record[f"term.{k}"] = v
        record["term.total"] = total
    return total, terms, ci_lower


def l0_per_site(ci_lower: dict) -> dict[str, float]:
    """Mean over positions of the number of components with ci_lower > 0."""
    return {n: float((c > 0).to(torch.float64).sum(-1).mean()) for n, c in ci_lower.items()}


def train_step(run: ResolvedRun, model: DecomposedModel, state: TrainState, batch, draws: dict,
               record: dict | None = None) -> dict[str, float]:
    """One step (S30): forward, backward, clip per group, AdamW per group. Returns the
    step's metrics; `record` (if a dict) receives named intermediates and gradients."""
    cfg = run.cfg
    hp = hparams(cfg, state.step)
    for p in state.params.values():
        p.grad = None
    total, terms, ci_lower = forward_terms(run, model, state.params, batch, draws, hp, record)
    total.backward()
    metrics = {f"loss/{k}": float(v) for k, v in terms.items()}
    metrics["loss/total"] = float(total)
    for n, p in state.params.items():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        metrics[f"grad_norm/{n}"] = float(torch.linalg.vector_norm(g))
        if record is not None:
            record[f"grad.{n}"] = g.detach().clone()
    comp, ci = state.group("components."), state.group("ci_fn.")
    metrics["grad_norm/components"] = clip_grad_norm([state.params[n] for n in comp], cfg.optim.components.clip)
    metrics["grad_norm/ci_fn"] = clip_grad_norm([state.params[n] for n in ci], cfg.optim.ci_fn.clip)
    for grp in state.opt_components.param_groups:
        grp["lr"] = hp["lr_components"]
    for grp in state.opt_ci_fn.param_groups:
        grp["lr"] = hp["lr_ci_fn"]
    state.opt_components.step()
    state.opt_ci_fn.step()
    with torch.no_grad():
        metrics["param_norm/components"] = math.sqrt(sum(float((state.params[n] ** 2).sum()) for n in comp))
        metrics["param_norm/ci_fn"] = math.sqrt(sum(float((state.params[n] ** 2).sum()) for n in ci))
    metrics |= {f"l0/{n}": v for n, v in l0_per_site(ci_lower).items()}
    metrics |= {f"sched/{k}": v for k, v in hp.items()}
    state.step += 1
    return metrics


def draws_for_step(run: ResolvedRun, step: int, dtype, batch_shape=None) -> dict[str, torch.Tensor]:
    return sample_draws(draw_plan(run, batch_shape), run.cfg.seed, step, dtype)
