"""One jitted VPD training step and the faithfulness warmup (SPEC S30-S45).
Mirrors oracle_torch/train.py: `sample_draws`, `faithfulness_warmup`, `clip_grad_norm`,
`forward_terms`, `clean_and_ci`, `adversary_warmup`, `l0_per_site`, `train_step_body` (the
oracle's `train_step`). The state is `jax_impl/state.py::TrainState`; schedule values come
from `contract/schedules.py::hparams`.

`Stepper` builds the jitted step once per run: it takes either explicit draws (parity) or
samples the draw plan from `fold_in(prng_key(seed), step)` (production) — both go through
`train_step_body`."""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from contract.backend import FINITE, GUARDED, NO_PROBE, Probe
from contract.draws import DrawSpec, draw_plan
from contract.metrics import term_key
from contract.resolve import ResolvedRun, persistent_cfg
from contract.schedules import hparams
from jax_impl.adversary import adam_ascent, fresh_pgd_term, persistent_pgd_term, persistent_warmup
from jax_impl.ci_fn import ci_logits
from jax_impl.components import DecomposedModel, inner_act
from jax_impl.context import StepContext
from jax_impl.losses import faithfulness, importance_minimality
from jax_impl.mesh import Placement, make_mesh, mesh_shape, serial
from jax_impl.recon import MASK_SOURCES, recon_terms
from jax_impl.remat import remat_model
from jax_impl.sigmoids import ci_pair
from jax_impl.state import TrainState, abstract_tree, adamw, split_groups


def compute_dtype(run: ResolvedRun):
    """S70: bf16 compute runs the forwards in bfloat16 from fp32 masters; None = the masters' dtype."""
    return jnp.bfloat16 if run.cfg.runtime.dtype == "bf16" else None


def to_compute(tree, cd):
    """Cast the floating leaves of a pytree to the compute dtype (identity when cd is None)."""
    if cd is None:
        return tree
    return jax.tree.map(lambda x: x.astype(cd) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x, tree)


# S50, S143: the production stream is JAX's own, one generator on every mesh: threefry2x32,
# whose bits are a function of (key, element index) (jax_threefry_partitionable, JAX's
# default), so a draw sharded over any mesh, in any number of processes, holds the values
# of the one-device draw, and a run restarted on other hardware continues the same run.
# Philox4x32 cannot be partitioned by XLA; it sampled tiny_llama's plan (1.35M uniforms,
# one core) in 4.2 ms against threefry's 6.1 ms (one call per draw), about 3% of a step.
# The stream's name in every checkpoint (meta.json `prng_impl`): the generator and how the plan
# is keyed (draw i from fold_in(key, i)); the earlier streams, "philox4x32" (one device) and
# "threefry2x32" (a mesh; one flat call sliced per draw), are other streams and refused on resume.
PRNG_IMPL = "threefry2x32"
STREAM = "threefry2x32/draw-keys"


def prng_impl(mesh_data: int = 1) -> str:
    """The production stream's name (the same on every mesh; the argument is kept for callers)."""
    del mesh_data
    return STREAM


def prng_key(seed: int, mesh_data: int = 1):
    """The production key of a seed (a typed key; one generator on every mesh, S50)."""
    del mesh_data
    return jax.random.key(seed, impl=PRNG_IMPL)


def uniform_groups(plan: list[DrawSpec], key, dtype, shardings: dict | None = None) -> list:
    """Draw i of the plan is `uniform(fold_in(key, i), shape)` (S143), computed by one generator
    call per group of draws alike in shape and layout: `vmap` over a group's keys gives each draw
    the bits of its own call, bit for bit (tests/test_jax_units.py), and XLA:CPU compiles two
    rolled threefry loops per group instead of two per draw (per draw, 229 loops of ~25 ms made
    6.3 s of the llama_scaled step's 13.1 s compile). Returns [(plan indices, [n, *shape])];
    a group is laid out as its draws' sharding behind the group axis."""
    groups: dict = {}
    for i, d in enumerate(plan):
        groups.setdefault((d.shape, None if shardings is None else shardings[d.name]), []).append(i)
    out = []
    for (shape, sharding), idx in groups.items():
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(idx, jnp.uint32))
        xs = jax.vmap(lambda k, shape=shape: jax.random.uniform(k, shape, dtype))(keys)
        if sharding is not None:
            xs = jax.lax.with_sharding_constraint(xs, NamedSharding(sharding.mesh, P(None, *sharding.spec)))
        out.append((idx, xs))
    return out


def named_draws(plan: list[DrawSpec], groups: list) -> dict:
    """{draw name: its row of its group} for the groups of `uniform_groups`."""
    return {plan[i].name: xs[row] for idx, xs in groups for row, i in enumerate(idx)}


def sample_draws(plan: list[DrawSpec], key, dtype, shardings: dict | None = None) -> dict:
    """Production sampling of the draw plan inside the step, keyed by fold_in(seed, step):
    draw i of the plan is `uniform(fold_in(key, i), shape)` (`uniform_groups`), laid out by
    `shardings` (its mesh sharding, S141) -- its values do not depend on the layout (S143)."""
    groups = uniform_groups(plan, key, dtype, shardings)
    # the barrier materialises the draws once: otherwise XLA fuses the generator into every
    # consumer of a draw, recomputing it in the forward and again in the backward
    stacked = jax.lax.optimization_barrier([xs for _, xs in groups])
    return named_draws(plan, [(idx, xs) for (idx, _), xs in zip(groups, stacked, strict=True)])


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
        comp, opt_state, loss = serial(step(comp, opt_state, model.frozen))  # several devices: one at a time
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
                  sources: dict | None = None, probe: Probe = NO_PROBE):
    """Everything up to the total loss; `sources` are the persistent-PGD sources by bundle.
    `probe.pins` (stage bundles) replace computed `ci_lower.<site>` / `ci_upper.<site>` and
    per-forward routes / masks with given values. Returns (total, ({term_key: value}, ci_lower))."""
    cfg = run.cfg
    masters, frozen_masters = params, frozen
    cd = compute_dtype(run)
    params, frozen, batch, draws, sources = to_compute((params, frozen, batch, draws, sources), cd)
    clean, site_inputs, z, ci_lower, ci_upper = clean_and_ci(run, model, frozen, params, batch, draws)
    for s in run.sites:
        ci_lower[s.name] = probe.pin(f"ci_lower.{s.name}", ci_lower[s.name])
        ci_upper[s.name] = probe.pin(f"ci_upper.{s.name}", ci_upper[s.name])
    probe.put("clean_out", clean)
    for s in run.sites:
        probe.put(f"site_input.{s.name}", site_inputs[s.name])
        probe.put(f"ci_logits.{s.name}", z[s.name])
        probe.put(f"ci_lower.{s.name}", ci_lower[s.name])
        probe.put(f"ci_upper.{s.name}", ci_upper[s.name])
    ctx = StepContext(run=run, model=model, frozen=frozen, batch=batch, clean=clean)  # compute dtype (S70)
    recon = {t.index: t for t in run.recon_terms}
    masked = recon_terms(ctx, params, [t for t in run.recon_terms if t.source in MASK_SOURCES], ci_lower, draws,
                         probe=probe)
    terms, total = {}, 0.0
    for i, t in enumerate(cfg.loss_terms):
        if t.type == "faithfulness":  # from the masters (fp32 at least, S70)
            v = faithfulness(run, model, frozen_masters, masters)
        elif t.type == "importance_minimality":  # reductions in fp32 at least (S70)
            v = importance_minimality(run, upcast(ci_upper), hp["imp_min_p"], t.beta, t.eps)
        elif recon[i].source == "fresh_pgd":
            v = fresh_pgd_term(ctx, params, recon[i], ci_lower, draws, probe=probe)
        elif recon[i].source == "persistent_pgd":
            if sources is None:
                raise ValueError(f"forward_terms: loss_terms.{i} is a persistent PGD term and needs `sources` "
                                 "(the persistent-PGD sources by bundle); none were given")
            v = persistent_pgd_term(ctx, params, recon[i], ci_lower, sources[recon[i].bundle], draws, probe=probe)
        elif recon[i].source in MASK_SOURCES:
            v = masked[i]
        else:
            raise ValueError(f"loss_terms.{i}: source {recon[i].source!r} is not implemented")
        terms[term_key(i, t)] = v
        total = total + t.coeff * v
    for k, v in terms.items():
        probe.put(f"term.{k}", v)
    probe.put("term.total", total)
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
    terms = [t for t in run.recon_terms if t.source == "persistent_pgd" and persistent_cfg(run, t).n_warmup]
    if not terms:
        return sources, source_opt
    params, frozen, batch, draws = to_compute((params, frozen, batch, draws), compute_dtype(run))
    clean, _, _, ci_lower, _ = jax.lax.stop_gradient(clean_and_ci(run, model, frozen, params, batch, draws))
    ctx = StepContext(run=run, model=model, frozen=frozen, batch=batch, clean=clean)
    sources, source_opt = dict(sources), dict(source_opt)
    for t in terms:
        sources[t.bundle], source_opt[t.bundle] = persistent_warmup(
            ctx, params, t, ci_lower, sources[t.bundle], source_opt[t.bundle], hp[f"lr_sources.{t.bundle}"])
    return sources, source_opt


def l0_per_site(ci_lower: dict) -> dict:
    """Mean over positions of the number of components with ci_lower > 0."""
    return {n: (c > 0).astype(jnp.float32).sum(-1).mean() for n, c in ci_lower.items()}


def train_step_body(run: ResolvedRun, model: DecomposedModel, state: TrainState, frozen, batch, draws: dict,
                    hp: dict, probe: Probe = NO_PROBE) -> tuple[TrainState, dict]:
    """One step (S30): forward, backward, clip per group, AdamW per group. `probe.record`
    (when a dict) also receives `grad.<leaf>` (pre-clip) and `grad.sources.*`."""
    cfg = run.cfg
    params = state.params
    sources, source_opt = adversary_warmup(run, model, frozen, params, batch, draws, hp,
                                           state.sources, state.source_opt)

    def loss(p, srcs):
        # the probe's intermediates leave the differentiated function through its aux output
        inner = Probe({} if probe.record is not None else None, probe.pins)
        total, (terms, ci_lower) = forward_terms(run, model, frozen, p, batch, draws, hp, srcs, inner)
        return (total, terms), (ci_lower, inner.record)

    (total, terms), vjp, (ci_lower, recorded) = jax.vjp(loss, params, sources, has_aux=True)
    if probe.record is not None:
        assert recorded is not None  # the inner probe records whenever this one does
        probe.record.update(recorded)
    zeros = {k: jnp.zeros_like(v) for k, v in terms.items()}
    grads, _ = vjp((jnp.ones_like(total), zeros))
    metrics = {f"loss/{k}": v for k, v in terms.items()}
    metrics["loss/total"] = total
    for n, g in grads.items():
        metrics[f"grad_norm/{n}"] = jnp.linalg.norm(g.ravel())
        probe.put(f"grad.{n}", g)
    g_comp, g_ci = split_groups(grads)
    g_comp, metrics["grad_norm/components"] = clip_grad_norm(g_comp, cfg.optim.components.clip)
    g_ci, metrics["grad_norm/ci_fn"] = clip_grad_norm(g_ci, cfg.optim.ci_fn.clip)
    p_comp, p_ci = split_groups(params)
    new = {}
    for name, g, p, lr in (("opt_components", g_comp, p_comp, hp["lr_components"]),
                           ("opt_ci_fn", g_ci, p_ci, hp["lr_ci_fn"])):
        opt = adamw(getattr(cfg.optim, name[4:]))
        os = getattr(state, name)
        os = os._replace(hyperparams={**os.hyperparams, "learning_rate": jnp.asarray(lr, os.hyperparams["learning_rate"].dtype)})
        upd, os = opt.update(g, os, p)
        new[name] = (optax.apply_updates(p, upd), os)
    params = new["opt_components"][0] | new["opt_ci_fn"][0]
    comp, ci = split_groups(params)
    metrics["param_norm/components"] = global_norm(comp)
    metrics["param_norm/ci_fn"] = global_norm(ci)
    # S84 (3): the final ascent's gradient is d(term, unscaled)/d(sources) from the same
    # graph as the main backward (pre-update parameters): the vjp with the term's one-hot
    sources, source_opt = dict(sources), dict(source_opt)
    for t in run.recon_terms:
        if t.source == "persistent_pgd":
            key = term_key(t.index, cfg.loss_terms[t.index])
            _, g_src = vjp((jnp.zeros_like(total), zeros | {key: jnp.ones_like(terms[key])}))
            g = g_src[t.bundle]
            for n, v in g.items():
                probe.put(f"grad.sources.{t.bundle}.{n}", v)
            sources[t.bundle], source_opt[t.bundle] = adam_ascent(
                sources[t.bundle], g, source_opt[t.bundle], hp[f"lr_sources.{t.bundle}"], persistent_cfg(run, t).optimizer)
            for n, v in g.items():
                metrics[f"grad_norm/sources.{t.bundle}.{n}"] = jnp.linalg.norm(v.ravel())
            metrics[f"param_norm/sources.{t.bundle}"] = global_norm(sources[t.bundle])
    metrics |= {f"l0/{n}": v for n, v in l0_per_site(ci_lower).items()}
    metrics |= {f"sched/{k}": v for k, v in hp.items()}
    new_state = TrainState(params=params, opt_components=new["opt_components"][1], opt_ci_fn=new["opt_ci_fn"][1],
                           step=state.step + 1, sources=sources, source_opt=source_opt)
    if cfg.guard.nonfinite == "skip":
        # S106: a step with a non-finite loss or gradient norm keeps the pre-step state (the
        # sources as they were before the warmup too); selected on the device, no host sync
        ok = step_finite(metrics)
        kept = state.replace(step=state.step + 1)
        new_state = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new_state, kept)
        comp, ci = split_groups(new_state.params)  # the norms of the parameters the step leaves
        metrics["param_norm/components"] = global_norm(comp)
        metrics["param_norm/ci_fn"] = global_norm(ci)
        for b, srcs in new_state.sources.items():
            metrics[f"param_norm/sources.{b}"] = global_norm(srcs)
    return new_state, metrics


def step_finite(metrics: dict):
    """S106: a device bool, every loss and gradient norm of the step finite."""
    return jnp.stack([jnp.all(jnp.isfinite(v)) for k, v in metrics.items() if k.startswith(GUARDED)]).all()


class Stepper:
    """The jitted steps of one run, built once: `step_with_draws` (parity: explicit draws,
    optionally with a probe) and `step_with_key` (production: draws sampled inside the step
    from `fold_in(prng_key(seed), step)`; its metrics also hold the device flag
    `contract.backend.FINITE`, S106). State buffers are donated.

    On a mesh (runtime.mesh D x K > 1, or several processes; S91, S140) the step is the same
    program on global arrays: the state keeps the layout of `jax_impl/mesh.py::state_specs`
    (pinned by the jit's output shardings), the batch and the draws are placed by
    `Placement`, the metrics come back replicated (every process reads them)."""

    def __init__(self, run: ResolvedRun, model: DecomposedModel, dtype):
        self.run, self.model, self.dtype = run, model, dtype
        self.plan = draw_plan(run)
        D, K = mesh_shape(run)
        on_mesh = D * K > 1 or jax.process_count() > 1
        self.placement = Placement(run, make_mesh(D, K)) if on_mesh else None
        step_model = remat_model(model, run.cfg.runtime.remat)  # S144: masked forwards recomputed in the backward
        self.step_model = step_model
        self.state_shardings: TrainState | None = None
        self._draw_shardings = None
        out = None
        self._seed_key = jax.random.key_data(prng_key(run.cfg.seed))
        pl = self.placement
        if pl is not None:
            rep = pl.replicated  # global arrays: every process passes the same replicated values
            model.frozen = jax.tree.map(lambda x: pl.put(x, rep), model.frozen)
            self._seed_key = pl.put(self._seed_key, rep)
            self.state_shardings = TrainState.from_tree(pl.state_shardings(abstract_tree(run, dtype)))
            self._draw_shardings = pl.draw_shardings(self.plan)
            out = (self.state_shardings, pl.replicated)
        self._draws = jax.jit(partial(train_step_body, run, step_model), donate_argnums=(0,), out_shardings=out)
        self._probed = jax.jit(self._probe_body, donate_argnums=(0,))
        self._key = jax.jit(self._key_body, donate_argnums=(0,), out_shardings=out)

    def place_state(self, state: TrainState) -> TrainState:
        """The state laid out on the mesh (identity on one device)."""
        if self.placement is None or self.state_shardings is None:
            return state
        return TrainState.from_tree(self.placement.put_tree(state.to_tree(), self.state_shardings.to_tree()))

    def _key_body(self, state: TrainState, frozen, batch, seed_key, hp):
        if not jnp.issubdtype(seed_key.dtype, jax.dtypes.prng_key):  # key data (a global array on a mesh)
            seed_key = jax.random.wrap_key_data(seed_key, impl=PRNG_IMPL)
        key = jax.random.fold_in(seed_key, state.step)
        state, metrics = train_step_body(self.run, self.step_model, state, frozen, batch,
                                         sample_draws(self.plan, key, self.dtype, self._draw_shardings), hp)
        # S106: the production step reports its finite flag, so the loop checks every step
        # without pulling its metrics (the parity step, `step_with_draws`, does not)
        return state, metrics | {FINITE: step_finite(metrics)}

    def _probe_body(self, state: TrainState, frozen, batch, draws, hp, pins):
        record: dict = {}
        state, metrics = train_step_body(self.run, self.step_model, state, frozen, batch, draws, hp, Probe(record, pins))
        return state, metrics, record

    def hp(self, step: int) -> dict:
        hp = {k: jnp.asarray(v, self.dtype) for k, v in hparams(self.run.cfg, step).items()}
        return hp if self.placement is None else {k: self.placement.put(v, self.placement.replicated) for k, v in hp.items()}

    def put_batch(self, batch):
        return batch if self.placement is None else self.placement.put(batch)

    def step_with_draws(self, state: TrainState, batch, draws: dict, step: int, probe: Probe | None = None):
        """-> (state, metrics); with a probe, its record receives the step's intermediates
        (as device arrays) and its pins replace computed stages."""
        if self.placement is not None:
            batch, draws = self.placement.put(batch), self.placement.put_draws(draws, self.plan, self.dtype)
        else:
            draws = {k: jnp.asarray(v, self.dtype) for k, v in draws.items()}
        if probe is None or (probe.record is None and not probe.pins):
            return self._draws(state, self.model.frozen, batch, draws, self.hp(step))
        state, metrics, record = self._probed(state, self.model.frozen, batch, draws, self.hp(step), dict(probe.pins))
        if probe.record is not None:
            probe.record.update(record)
        return state, metrics

    def lower_key_step(self, state: TrainState, batch, step: int):
        """The production step lowered for these arguments (XLA's cost and memory analyses,
        scripts/benchmark.py); nothing runs, nothing is donated."""
        return self._key.lower(state, self.model.frozen, self.put_batch(batch), self._seed_key, self.hp(step))

    def step_with_key(self, state: TrainState, batch, step: int):
        return self._key(state, self.model.frozen, self.put_batch(batch), self._seed_key, self.hp(step))
