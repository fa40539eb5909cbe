"""One jitted VPD training step and the faithfulness warmup (ALGORITHM §7; SPEC S30-S45).
Mirrors oracle_torch/train.py: `make_state`, `hparams`, `sample_draws`,
`faithfulness_warmup`, `clip_grad_norm`, `forward_terms`, `l0_per_site`, `train_step`.

The step takes either explicit draws (parity) or samples the draw plan from
`fold_in(prng_key(seed), step)` (production) — both go through `train_step_body`."""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax

from contract.config import RunConfig
from contract.draws import DrawSpec, draw_plan
from contract.init import init_state
from contract.resolve import ResolvedRun
from contract.runlog import read_metric_lines, rewrite_metrics, with_dtype
from contract.schedules import imp_min_p, schedule_value
from contract.adversary import bundle_of
from jax_impl.adversary import adam_ascent, fresh_pgd_term, init_source_opt, persistent_pgd_term, persistent_warmup
from jax_impl.ci_fn import ci_logits
from jax_impl.components import DecomposedModel, inner_act
from jax_impl.losses import faithfulness, importance_minimality
from jax_impl.mesh import Placement, make_data_mesh
from jax_impl.recon import MASK_SOURCES, recon_terms
from jax_impl.sigmoids import ci_pair

DTYPES = {"float32": jnp.float32, "float64": jnp.float64}


def jax_dtype(name: str):
    """The dtype of the masters and optimizer moments (bf16 compute keeps fp32 masters, S70)."""
    if name == "bf16":
        return jnp.float32
    if name not in DTYPES:
        raise ValueError(f"runtime.dtype: the JAX trainer runs float32 or float64, not {name!r}")
    if name == "float64" and not jax.config.jax_enable_x64:
        raise ValueError("runtime.dtype: float64 needs jax_enable_x64 (set JAX_ENABLE_X64=1 before JAX starts)")
    return DTYPES[name]


def compute_dtype(run: ResolvedRun):
    """S70: bf16 compute runs the forwards in bfloat16 from fp32 masters; None = the masters' dtype."""
    return jnp.bfloat16 if run.cfg.runtime.dtype == "bf16" else None


def to_compute(tree, cd):
    """Cast the floating leaves of a pytree to the compute dtype (identity when cd is None)."""
    if cd is None:
        return tree
    return jax.tree.map(lambda x: x.astype(cd) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x, tree)


def term_key(i: int, t) -> str:
    return f"{i}.{t.type}"


def _adamw(oc):
    # lr is injected every step from the host-side schedule (S40)
    return optax.inject_hyperparams(optax.adamw)(learning_rate=0.0, b1=oc.betas[0], b2=oc.betas[1],
                                                 eps=oc.eps, weight_decay=oc.weight_decay)


def split_groups(params: dict) -> tuple[dict, dict]:
    comp = {n: p for n, p in params.items() if n.startswith("components.")}
    ci = {n: p for n, p in params.items() if n.startswith("ci_fn.")}
    return comp, ci


def make_state(run: ResolvedRun, arrays: dict[str, np.ndarray] | None, dtype) -> dict:
    arrays = init_state(run) if arrays is None else arrays
    params = {n: jnp.asarray(a, dtype=dtype) for n, a in arrays.items() if not n.startswith("sources.")}
    comp, ci = split_groups(params)
    o = run.cfg.optim
    # persistent PGD (S82-S84): bundle -> {site: source}, bundle -> {"m", "v", "t"}
    sources = {t.bundle: {s.name: jnp.asarray(arrays[f"sources.{t.bundle}.{s.name}"], dtype=dtype) for s in run.sites}
               for t in run.recon_terms if t.source == "persistent_pgd"}
    return {"params": params, "opt_components": _adamw(o.components).init(comp),
            "opt_ci_fn": _adamw(o.ci_fn).init(ci), "step": jnp.asarray(0, jnp.int32),
            "sources": sources, "source_opt": {b: init_source_opt(v) for b, v in sources.items()}}


def hparams(cfg: RunConfig, step: int) -> dict[str, float]:
    """Schedule values for `step`, computed on the host (S40, S41)."""
    hp = {"lr_components": schedule_value(cfg.optim.components.lr, step, cfg.steps),
          "lr_ci_fn": schedule_value(cfg.optim.ci_fn.lr, step, cfg.steps)}
    for i, t in enumerate(cfg.loss_terms):
        if t.type == "importance_minimality":
            hp["imp_min_p"] = imp_min_p(t, step, cfg.steps)
        if t.type.startswith("persistent_pgd"):  # S84: the source LR, once per training step
            hp[f"lr_sources.{bundle_of(i, t)}"] = schedule_value(t.optimizer.lr, step, cfg.steps)
    return hp


# S50: the production stream is JAX's own. On one device: Philox4x32-10 (counter-based, the
# generator of cuRAND and of torch on CUDA), which samples a step's draw plan ~4x faster on
# CPU than threefry (whose CPU lowering is a rolled loop). XLA cannot partition Philox, so a
# step on a device mesh (runtime.mesh.data > 1) keys threefry instead.
PRNG_IMPL = "philox4x32"
MESH_PRNG_IMPL = "threefry2x32"


def prng_impl(mesh_data: int = 1) -> str:
    return PRNG_IMPL if mesh_data == 1 else MESH_PRNG_IMPL


def prng_key(seed: int, mesh_data: int = 1):
    """The production key of a seed (a typed key; the generator follows the mesh, S50)."""
    return jax.random.key(seed, impl=prng_impl(mesh_data))


def sample_draws(plan: list[DrawSpec], key, dtype) -> dict:
    """Production sampling of the draw plan inside the step, keyed by fold_in(seed, step)."""
    # one generator call for the whole plan, sliced per named tensor (one call per draw
    # multiplies the compiled program; the stream need not match the oracle's, S50)
    sizes = [int(np.prod(d.shape)) for d in plan]
    # the barrier materialises the draws once: otherwise XLA fuses the generator into every
    # consumer of a draw, recomputing it in the forward and again in the backward
    flat = jax.lax.optimization_barrier(jax.random.uniform(key, (sum(sizes),), dtype))
    out, i = {}, 0
    for d, n in zip(plan, sizes):
        out[d.name] = flat[i:i + n].reshape(d.shape)
        i += n
    return out


def faithfulness_warmup(run: ResolvedRun, model: DecomposedModel, params: dict) -> tuple[dict, list[float]]:
    """S44: AdamW on faithfulness alone (own lr / weight decay, no clip); the optimizer is
    discarded afterwards. Returns (params, losses)."""
    w = run.cfg.faithfulness_warmup
    if w.steps == 0:
        return params, []
    comp, ci = split_groups(params)
    opt = optax.adamw(learning_rate=w.lr, weight_decay=w.weight_decay)

    @jax.jit
    def step(comp, opt_state, frozen):
        loss, g = jax.value_and_grad(lambda c: faithfulness(run, model, frozen, c))(comp)
        upd, opt_state = opt.update(g, opt_state, comp)
        return optax.apply_updates(comp, upd), opt_state, loss

    opt_state, losses = opt.init(comp), []
    for _ in range(w.steps):
        comp, opt_state, loss = step(comp, opt_state, model.frozen)
        losses.append(loss)
    return comp | ci, [float(x) for x in losses]


def global_norm(grads: dict):
    if not grads:  # e.g. a faithfulness-only config leaves the CI function without gradient
        return jnp.asarray(0.0)
    return jnp.linalg.norm(jnp.stack([jnp.linalg.norm(g.ravel()) for g in grads.values()]))


def clip_grad_norm(grads: dict, max_norm: float | None):
    """S43: torch's clip_grad_norm_ semantics: scale = max / (norm + 1e-6), clamped to 1."""
    total = global_norm(grads)
    if max_norm is None:
        return grads, total
    coef = jnp.minimum(max_norm / (total + 1e-6), 1.0)
    return {n: g * coef for n, g in grads.items()}, total


def forward_terms(run: ResolvedRun, model: DecomposedModel, frozen, params: dict, batch, draws: dict, hp: dict,
                  record: dict | None = None, pins: dict | None = None, sources: dict | None = None):
    """Everything up to the total loss. `pins` (stage bundles) replace computed
    `ci_lower.<site>` / `ci_upper.<site>` and per-forward routes / masks with given values. Returns (total, ({term_key: value}, ci_lower))."""
    cfg = run.cfg
    masters, frozen_masters = params, frozen
    cd = compute_dtype(run)
    params, frozen, batch, draws, sources = to_compute((params, frozen, batch, draws, sources), cd)
    clean, site_inputs, z, ci_lower, ci_upper = clean_and_ci(run, model, frozen, params, batch, draws)
    pins = pins or {}
    for s in run.sites:
        ci_lower[s.name] = pins.get(f"ci_lower.{s.name}", ci_lower[s.name])
        ci_upper[s.name] = pins.get(f"ci_upper.{s.name}", ci_upper[s.name])
    if record is not None:
        record["clean_out"] = clean
        for s in run.sites:
            record[f"site_input.{s.name}"] = site_inputs[s.name]
            record[f"ci_logits.{s.name}"] = z[s.name]
            record[f"ci_lower.{s.name}"] = ci_lower[s.name]
            record[f"ci_upper.{s.name}"] = ci_upper[s.name]
    recon = {t.index: t for t in run.recon_terms}
    masked = recon_terms(run, model, frozen, params, [t for t in run.recon_terms if t.source in MASK_SOURCES],
                         batch, clean, ci_lower, draws, record, pins)
    terms, total = {}, 0.0
    for i, t in enumerate(cfg.loss_terms):
        if t.type == "faithfulness":  # from the masters (fp32 at least, S70)
            v = faithfulness(run, model, frozen_masters, masters)
        elif t.type == "importance_minimality":  # reductions in fp32 at least (S70)
            v = importance_minimality(run, upcast(ci_upper), hp["imp_min_p"], t.beta, t.eps)
        elif recon[i].source == "fresh_pgd":
            v = fresh_pgd_term(run, model, frozen, params, recon[i], batch, clean, ci_lower, draws, record, pins)
        elif recon[i].source == "persistent_pgd":
            v = persistent_pgd_term(run, model, frozen, params, recon[i], batch, clean, ci_lower,
                                    sources[recon[i].bundle], draws, record, pins)
        elif recon[i].source in MASK_SOURCES:
            v = masked[i]
        else:
            raise ValueError(f"loss_terms.{i}: source {recon[i].source!r} is not implemented")
        terms[term_key(i, t)] = v
        total = total + t.coeff * v
    if record is not None:
        for k, v in terms.items():
            record[f"term.{k}"] = v
        record["term.total"] = total
    return total, (terms, ci_lower)


def upcast(tree):
    """At least fp32 (identity for fp32 / fp64)."""
    return jax.tree.map(lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32)), tree)


def clean_and_ci(run: ResolvedRun, model: DecomposedModel, frozen, params: dict, batch, draws: dict):
    """S7, S12-S17: clean output, site inputs, CI logits, (ci_lower, ci_upper) per site."""
    clean, site_inputs = model.clean_forward(frozen, batch)
    inner = {}
    if run.cfg.ci_fn.type == "mlp":
        inner = {s.name: inner_act(s, site_inputs[s.name], params[f"components.{s.name}.V"]) for s in run.sites}
    z = ci_logits(run, params, site_inputs, inner)
    ci_lower, ci_upper = {}, {}
    for s in run.sites:
        u = draws[f"binomial.{s.name}"] if run.cfg.sampling == "binomial" else None
        ci_lower[s.name], ci_upper[s.name] = ci_pair(z[s.name], u)
    return clean, site_inputs, z, ci_lower, ci_upper


def adversary_warmup(run: ResolvedRun, model: DecomposedModel, frozen, params, batch, draws: dict, hp: dict,
                     sources: dict, source_opt: dict) -> tuple[dict, dict]:
    """S84 (1): each persistent term's n_warmup detached ascents, before the main loss."""
    terms = [t for t in run.recon_terms if t.source == "persistent_pgd" and run.cfg.loss_terms[t.index].n_warmup]
    if not terms:
        return sources, source_opt
    params, frozen, batch, draws = to_compute((params, frozen, batch, draws), compute_dtype(run))
    clean, _, _, ci_lower, _ = jax.lax.stop_gradient(clean_and_ci(run, model, frozen, params, batch, draws))
    sources, source_opt = dict(sources), dict(source_opt)
    for t in terms:
        sources[t.bundle], source_opt[t.bundle] = persistent_warmup(
            run, model, frozen, params, t, batch, clean, ci_lower, sources[t.bundle], source_opt[t.bundle],
            hp[f"lr_sources.{t.bundle}"])
    return sources, source_opt


def l0_per_site(ci_lower: dict) -> dict:
    """Mean over positions of the number of components with ci_lower > 0."""
    return {n: (c > 0).astype(jnp.float32).sum(-1).mean() for n, c in ci_lower.items()}


def train_step_body(run: ResolvedRun, model: DecomposedModel, state: dict, frozen, batch, draws: dict, hp: dict,
                    with_grads: bool = False):
    """One step (S30): forward, backward, clip per group, AdamW per group."""
    cfg = run.cfg
    params = state["params"]
    sources, source_opt = adversary_warmup(run, model, frozen, params, batch, draws, hp,
                                           state["sources"], state["source_opt"])

    def loss(p, srcs):
        total, (terms, ci_lower) = forward_terms(run, model, frozen, p, batch, draws, hp, sources=srcs)
        return (total, terms), ci_lower

    (total, terms), vjp, ci_lower = jax.vjp(loss, params, sources, has_aux=True)
    zeros = {k: jnp.zeros_like(v) for k, v in terms.items()}
    grads, _ = vjp((jnp.ones_like(total), zeros))
    metrics = {f"loss/{k}": v for k, v in terms.items()}
    metrics["loss/total"] = total
    for n, g in grads.items():
        metrics[f"grad_norm/{n}"] = jnp.linalg.norm(g.ravel())
    g_comp, g_ci = split_groups(grads)
    g_comp, metrics["grad_norm/components"] = clip_grad_norm(g_comp, cfg.optim.components.clip)
    g_ci, metrics["grad_norm/ci_fn"] = clip_grad_norm(g_ci, cfg.optim.ci_fn.clip)
    p_comp, p_ci = split_groups(params)
    new = {}
    for name, g, p, lr in (("opt_components", g_comp, p_comp, hp["lr_components"]),
                           ("opt_ci_fn", g_ci, p_ci, hp["lr_ci_fn"])):
        opt = _adamw(getattr(cfg.optim, name[4:]))
        os = state[name]
        os = os._replace(hyperparams={**os.hyperparams, "learning_rate": jnp.asarray(lr, os.hyperparams["learning_rate"].dtype)})
        upd, os = opt.update(g, os, p)
        new[name] = (optax.apply_updates(p, upd), os)
    params = new["opt_components"][0] | new["opt_ci_fn"][0]
    comp, ci = split_groups(params)
    metrics["param_norm/components"] = global_norm(comp)
    metrics["param_norm/ci_fn"] = global_norm(ci)
    # S84 (3): the final ascent's gradient is d(term, unscaled)/d(sources) from the same
    # graph as the main backward (pre-update parameters): the vjp with the term's one-hot
    for t in run.recon_terms:
        if t.source == "persistent_pgd":
            key = term_key(t.index, cfg.loss_terms[t.index])
            _, g_src = vjp((jnp.zeros_like(total), zeros | {key: jnp.ones_like(terms[key])}))
            g = g_src[t.bundle]
            if with_grads:
                grads = grads | {f"sources.{t.bundle}.{n}": v for n, v in g.items()}
            sources[t.bundle], source_opt[t.bundle] = adam_ascent(
                sources[t.bundle], g, source_opt[t.bundle], hp[f"lr_sources.{t.bundle}"], cfg.loss_terms[t.index].optimizer)
            for n, v in g.items():
                metrics[f"grad_norm/sources.{t.bundle}.{n}"] = jnp.linalg.norm(v.ravel())
            metrics[f"param_norm/sources.{t.bundle}"] = global_norm(sources[t.bundle])
    metrics |= {f"l0/{n}": v for n, v in l0_per_site(ci_lower).items()}
    metrics |= {f"sched/{k}": v for k, v in hp.items()}
    state = {"params": params, "opt_components": new["opt_components"][1], "opt_ci_fn": new["opt_ci_fn"][1],
             "step": state["step"] + 1, "sources": sources, "source_opt": source_opt}
    if with_grads:
        return state, metrics, grads
    return state, metrics


class Stepper:
    """Jitted steps for one run: `step_with_draws` (parity) and `step_with_key`
    (production). State buffers are donated."""

    def __init__(self, run: ResolvedRun, model: DecomposedModel, dtype):
        self.run, self.model, self.dtype = run, model, dtype
        self.plan = draw_plan(run)
        n = run.cfg.runtime.mesh.data  # S91: data parallel = the global program, sharded inputs
        self.placement = Placement(make_data_mesh(n), run.batch_shape[0]) if n > 1 else None
        # one compiled step for parity runs (it also returns the raw gradients), one for production
        self._draws = jax.jit(partial(train_step_body, run, model, with_grads=True), donate_argnums=(0,))
        self._key = jax.jit(self._key_body, donate_argnums=(0,))

    def _key_body(self, state, frozen, batch, seed_key, hp):
        key = jax.random.fold_in(seed_key, state["step"])
        return train_step_body(self.run, self.model, state, frozen, batch, sample_draws(self.plan, key, self.dtype), hp)

    def hp(self, step: int) -> dict:
        return {k: jnp.asarray(v, self.dtype) for k, v in hparams(self.run.cfg, step).items()}

    def step_with_draws(self, state, batch, draws: dict, step: int, with_grads: bool = False):
        draws = {k: jnp.asarray(v, self.dtype) for k, v in draws.items()}
        if self.placement is not None:
            batch, draws = self.placement.put(batch), self.placement.put_tree(draws)
        state, metrics, grads = self._draws(state, self.model.frozen, batch, draws, self.hp(step))
        return (state, metrics, grads) if with_grads else (state, metrics)

    def step_with_key(self, state, batch, step: int):
        if self.placement is not None:
            batch = self.placement.put(batch)
        return self._key(state, self.model.frozen, batch, prng_key(self.run.cfg.seed, self.run.cfg.runtime.mesh.data), self.hp(step))


# ---------------------------------------------------------------- the training loop
# Mirror of the oracle's loop (oracle_torch/train.py::train): same metrics.jsonl lines, same
# eval / checkpoint cadence, same resume and signal rules. Differences are JAX-specific: the
# step is jitted and asynchronous, so metrics stay device arrays and are pulled on the host
# only at the log cadence (one log interval late, so the device never waits for the host).


def _dtype_name(dtype) -> str:
    if isinstance(dtype, str):
        return dtype
    return str(jnp.dtype(dtype))


def metric_order(run: ResolvedRun, param_names) -> dict[str, int]:
    """Rank of every metric key in the oracle's line order (jitted outputs come back with
    sorted dict keys; lines are written in the oracle's order so the files read alike)."""
    from jax_impl.eval import EVAL_VARIANTS

    cfg = run.cfg
    keys = [f"eval/l0/{s.name}" for s in run.sites]
    if cfg.target.kind == "llama":
        keys.append("eval/ce/target")
        for v in EVAL_VARIANTS:
            keys += [f"eval/kl/{v}", f"eval/ce/{v}"]
    else:
        keys += [f"eval/mse/{v}" for v in EVAL_VARIANTS]
    keys += [f"loss/{term_key(i, t)}" for i, t in enumerate(cfg.loss_terms)] + ["loss/total"]
    keys += [f"grad_norm/{n}" for n in param_names if not n.startswith("sources.")]
    keys += ["grad_norm/components", "grad_norm/ci_fn"]
    for t in run.recon_terms:  # persistent PGD bundles (S84), as the oracle logs them
        if t.source == "persistent_pgd":
            keys += [f"grad_norm/sources.{t.bundle}.{s.name}" for s in run.sites] + [f"param_norm/sources.{t.bundle}"]
    keys += ["param_norm/components", "param_norm/ci_fn"] + [f"l0/{s.name}" for s in run.sites]
    keys += [f"sched/{k}" for k in hparams(cfg, 0)]
    keys += ["warmup/faithfulness_first", "warmup/faithfulness_last"]
    return {k: i for i, k in enumerate(keys)}


def _host_line(line: dict, order: dict[str, int] | None = None) -> dict:
    """Pull one metrics line to the host: every value a Python float (JSON-ready), keys in
    `order` (unknown keys last, as they came)."""
    dev = {k: v for k, v in line.items() if not isinstance(v, (int, float))}
    got = jax.device_get(dev)
    out = {k: (float(got[k]) if k in got else v) for k, v in line.items()}
    if order:
        out = dict(sorted(out.items(), key=lambda kv: order.get(kv[0], len(order))))
    return out


def _wandb_start(run: ResolvedRun, out, start: int):
    import os

    import wandb

    mode = os.environ.get("WANDB_MODE", "offline")
    return wandb.init(project=os.environ.get("WANDB_PROJECT", "vpd"), dir=str(out), mode=mode,
                      config=run.cfg.to_dict(), id=f"vpd-jax-{run.cfg.hash()}", resume="allow",
                      name=f"{out.name}", reinit=True)


_RUNTIMES: dict[tuple, tuple] = {}
_RUNTIMES_MAX = 2


def runtime_for(run: ResolvedRun, dtype) -> tuple[ResolvedRun, DecomposedModel, "Stepper"]:
    """(run, model, stepper) for a config and dtype. Reused by later `train` calls in the same
    process for the same resolved config, dtype and target file, so a resume (or a rerun) in one
    process does not recompile the step and the eval. At most `_RUNTIMES_MAX` are kept."""
    from contract.targets import meta_path, resolve_path

    files = [resolve_path(run.cfg.target.weights), meta_path(run.cfg.target.weights)]
    stamp = tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files)
    key = (run.cfg.hash(), str(jnp.dtype(dtype)), stamp, bool(jax.config.jax_enable_x64))
    if key not in _RUNTIMES:
        while len(_RUNTIMES) >= _RUNTIMES_MAX:
            _RUNTIMES.pop(next(iter(_RUNTIMES)))
        model = DecomposedModel(run, dtype)
        _RUNTIMES[key] = (run, model, Stepper(run, model, dtype))
    return _RUNTIMES[key]


def train(run: ResolvedRun, out_dir, dtype=None, resume: bool = True, progress: bool = True,
          use_wandb: bool = False) -> dict:
    """Train `run` into `out_dir` (metrics.jsonl, checkpoints/). Returns a summary.

    - Resumes from the latest checkpoint of `out_dir` (refused under another config, dtype or
      target); `resume=False` starts afresh, clearing the old checkpoints and metrics.
    - The faithfulness warmup runs only for a fresh start (S44).
    - Line `{"step": k, ...}` of metrics.jsonl holds the metrics of training step k (params
      before its update; every `log_every` steps and the last step) and the eval of the
      params before step k (every `eval.every` steps); a final line `{"step": steps, eval}`
      evaluates the trained params. On resume from a checkpoint at step k (k steps done)
      lines with step >= k are dropped first, so the file matches an uninterrupted run.
    - Production draws: `fold_in(prng_key(seed), step)` (training), `eval_key(seed, step, j)`
      (eval); batches `contract.data.batch_for_step` — all pure functions of (seed, step), so a
      resumed run reproduces the uninterrupted one bit for bit.
    - Checkpoints every `checkpoint.every` steps and at the end. SIGINT/SIGTERM stop the run
      between two steps and save a checkpoint at the current step (a second signal aborts at
      once without saving: the last good checkpoint stands).
    - `use_wandb`: also log every line to Weights & Biases (mode from WANDB_MODE, default offline).
    """
    import json
    import os
    import signal
    import threading
    import time
    from pathlib import Path

    from tqdm import tqdm

    from contract.data import batch_for_step
    from jax_impl.checkpoint import (checkpoint_root, clear_checkpoints, latest_checkpoint, load_checkpoint,
                                     make_manager, read_meta, save_checkpoint)
    from jax_impl.eval import evaluate_device, to_jax_batch

    if dtype is not None:
        name = _dtype_name(dtype)
        jax_dtype(name)
        run = with_dtype(run, name)
    cfg = run.cfg
    dt = jax_dtype(cfg.runtime.dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"

    ckpt = latest_checkpoint(out) if resume else None
    if not resume:
        clear_checkpoints(out)
    extra: dict = {}
    if ckpt is not None:  # refused here (before anything is built) under another config
        state = load_checkpoint(ckpt, run, dt)
        extra = dict(read_meta(ckpt).get("extra") or {})
    else:
        state = make_state(run, None, dt)
    run, model, stepper = runtime_for(run, dt)
    start = int(state["step"])
    rewrite_metrics(metrics_path, read_metric_lines(metrics_path, start))
    if ckpt is None:
        params, warm = faithfulness_warmup(run, model, state["params"])
        state["params"] = params
        if warm:
            extra["faithfulness_warmup"] = {"steps": len(warm), "first": warm[0], "last": warm[-1]}
    mngr = make_manager(out, cfg.checkpoint.keep)
    wb = _wandb_start(run, out, start) if use_wandb else None
    saved_at = start if ckpt is not None else None
    ck_every, ev_every = cfg.checkpoint.every, cfg.eval.every

    stop = {"signum": None}
    old_handlers = {}

    def _on_signal(signum, frame):
        if stop["signum"] is not None:  # second signal: abort now, no save
            raise KeyboardInterrupt
        stop["signum"] = signum

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            old_handlers[sig] = signal.signal(sig, _on_signal)

    pending: list[tuple[int, dict]] = []  # metrics lines still on the device
    order = metric_order(run, init_state(run).keys())  # param names in the oracle (init) order
    last = {"train": {}, "eval": {}}

    def _flush(mf, upto: int | None = None) -> None:
        """Write the pending lines with step < upto (all when None) to metrics.jsonl."""
        nonlocal pending
        ready = [p for p in pending if upto is None or p[0] < upto]
        pending = [p for p in pending if not (upto is None or p[0] < upto)]
        for k, line in ready:
            host = _host_line(line, order)
            mf.write(json.dumps({"step": k, **host}) + "\n")
            if wb is not None:
                wb.log(host, step=k)
            tr = {n: v for n, v in host.items() if not n.startswith(("eval/", "warmup/"))}
            if tr:
                last["train"] = tr
                pbar.set_postfix(loss=f"{tr['loss/total']:.4g}", refresh=False)
            ev = {n: v for n, v in host.items() if n.startswith("eval/")}
            if ev:
                last["eval"] = ev
        if ready:
            mf.flush()

    def _save(step: int) -> Path:
        _flush(mf)
        mf.flush()
        os.fsync(mf.fileno())
        return save_checkpoint(out, state, run, step, cfg.checkpoint.keep, dt, extra, manager=mngr)

    last_ckpt = ckpt
    interrupted = False
    t0 = time.perf_counter()
    pbar = tqdm(total=cfg.steps, initial=start, disable=not progress, desc="vpd-jax", dynamic_ncols=True)
    k = start
    try:
        with open(metrics_path, "a") as mf:
            while k < cfg.steps:
                if stop["signum"] is not None:
                    break
                line: dict = {}
                if ev_every and k % ev_every == 0:
                    line |= evaluate_device(run, model, state["params"], k, dt)
                batch = to_jax_batch(batch_for_step(run, cfg.seed, k), dt)
                state, m = stepper.step_with_key(state, batch, k)
                log_now = k % cfg.log_every == 0 or k == cfg.steps - 1
                if log_now:
                    line |= m
                    # schedule values: the exact host numbers (as the oracle logs them)
                    line |= {f"sched/{n}": v for n, v in hparams(cfg, k).items()}
                if k == 0 and "faithfulness_warmup" in extra:
                    fw = extra["faithfulness_warmup"]
                    line |= {"warmup/faithfulness_first": fw["first"], "warmup/faithfulness_last": fw["last"]}
                if log_now:  # pull the previous interval's lines (long done) before queueing this one
                    _flush(mf, upto=k)
                if line:
                    pending.append((k, line))
                k += 1
                pbar.update(1)
                if ck_every and k % ck_every == 0 and k < cfg.steps:
                    last_ckpt, saved_at = _save(k), k
            interrupted = stop["signum"] is not None
            if not interrupted and ev_every:
                pending.append((cfg.steps, evaluate_device(run, model, state["params"], cfg.steps, dt)))
            _flush(mf)
            if saved_at != k:
                last_ckpt, saved_at = _save(k), k
    finally:
        pbar.close()
        mngr.close()
        for sig, h in old_handlers.items():
            signal.signal(sig, h)
        if wb is not None:
            wb.finish()
    return {
        "backend": "jax",
        "start_step": start,
        "step": k,
        "steps": cfg.steps,
        "interrupted": interrupted,
        "signal": None if stop["signum"] is None else signal.Signals(stop["signum"]).name,
        "final_metrics": last["train"],
        "final_eval": last["eval"],
        "metrics_path": str(metrics_path),
        "checkpoint_dir": str(checkpoint_root(out)),
        "last_checkpoint": None if last_ckpt is None else str(last_ckpt),
        "config_hash": cfg.hash(),
        "seconds": time.perf_counter() - t0,
    }
