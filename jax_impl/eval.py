"""Evaluation metrics of a decomposition (no gradient). Mirror of oracle_torch/eval.py with
the same function names; see that module's docstring for the metric definitions.

On one eval batch, every site live and routed everywhere:
- `eval/l0/{site}`: mean over positions of #components with ci_lower > 0;
- the output loss under the five masks of `EVAL_VARIANTS` (ci, stochastic, unmasked,
  rounded, zero): toys `eval/mse/{variant}` vs the clean output; llama `eval/kl/{variant}`
  (KL(clean || masked), mean over positions), `eval/ce/{variant}` (next-token CE) and
  `eval/ce/target` (the clean model).

With `eval.pgd_steps > 0`, also `eval/pgd/{mse|kl}` (S88, `pgd_probe`): the output loss
after `eval.pgd_steps` sign ascents of per-position sources, every site live and routed
everywhere, CI and V/U constant; a metric only (stop-gradient), inside the jitted eval.

CI in eval is deterministic (no binomial noise). The only random draws are
`eval.{site}.source` [..., C], `eval.{site}.delta` [...] and, with the PGD probe,
`eval.{site}.pgd_init` (U[0,1), bsc scope shape) (`contract/draws.py::eval_draw_plan`, shared
with the oracle). In production they come from `jax.random` keyed by
`fold_in(fold_in(prng_key(seed + 1), step), j)` for eval batch j of the eval at `step`
(`eval_key`); the parity harness may pass explicit draws.
Batch j of the eval at step k is eval-stream step `k * n_batches + j` (as in the oracle).
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from contract.data import batch_for_step
from contract.draws import DrawSpec, eval_draw_plan
from contract.metrics import EVAL_VARIANTS
from contract.resolve import ResolvedRun
from jax_impl.adversary import sign_ascent, source_divergence
from jax_impl.ci_fn import ci_logits
from jax_impl.components import DecomposedModel, SiteMode, inner_act
from jax_impl.context import StepContext
from jax_impl.losses import output_divergence
from jax_impl.recon import bernoulli_from_uniform
from jax_impl.sigmoids import ci_pair
from jax_impl.train import named_draws, prng_key, uniform_groups


def eval_key(seed: int, step: int, j: int):
    """Production key of eval batch j of the eval at `step`: its own stream (seed + 1), the
    training generator, the same on every mesh (S50, S143)."""
    return jax.random.fold_in(jax.random.fold_in(prng_key(seed + 1), step), j)


def sample_eval_draws(plan: list[DrawSpec], key, dtype) -> dict:
    """Eval draw i is `uniform(fold_in(key, i), shape)`, grouped as the step's (S143)."""
    return named_draws(plan, uniform_groups(plan, key, dtype))


def to_jax_batch(b: np.ndarray, dtype):
    """numpy batch -> JAX: token ids stay integer (int32 unless x64), toy features take the working dtype."""
    if b.dtype.kind in "iu":
        return jnp.asarray(b if jax.config.read("jax_enable_x64") else b.astype(np.int32))
    return jnp.asarray(b, dtype)


def eval_ci(run: ResolvedRun, model: DecomposedModel, frozen, params: dict, batch):
    """(clean output, deterministic ci_lower per site) of a batch."""
    clean, site_inputs = model.clean_forward(frozen, batch)
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
            modes[s.name] = SiteMode(jnp.ones_like(ci), None, None)
        elif variant == "rounded":
            modes[s.name] = SiteMode((ci > 0.5).astype(ci.dtype), None, None)
        elif variant == "zero":
            modes[s.name] = SiteMode(jnp.zeros_like(ci), None, None)
        else:
            raise ValueError(f"unknown eval variant {variant!r}")
    return modes


def next_token_ce(logits, tokens):
    """Mean next-token cross-entropy of logits [B, T, V] on tokens [B, T], in at least fp32."""
    wd = jnp.promote_types(logits.dtype, jnp.float32)
    lp = jax.nn.log_softmax(logits[:, :-1].astype(wd), -1)
    nll = -jnp.take_along_axis(lp, tokens[:, 1:, None].astype(jnp.int32), -1)[..., 0]
    return nll.mean()


def l0(ci_lower):
    """Mean over positions of the number of components with ci_lower > 0."""
    wd = jnp.promote_types(ci_lower.dtype, jnp.float32)
    return (ci_lower > 0).astype(wd).sum(-1).mean()


def _eval_body(run: ResolvedRun, model: DecomposedModel, frozen, params: dict, batch, draws: dict) -> dict:
    params = jax.lax.stop_gradient(params)
    clean, ci_lower = eval_ci(run, model, frozen, params, batch)
    out = {f"eval/l0/{n}": l0(c) for n, c in ci_lower.items()}
    llama = run.cfg.target.kind == "llama"
    if llama:
        out["eval/ce/target"] = next_token_ce(clean, batch)
    for v in EVAL_VARIANTS:
        pred = model.masked_forward(frozen, params, batch, eval_modes(run, v, ci_lower, draws))
        if llama:
            out[f"eval/kl/{v}"] = output_divergence("kl", pred, clean)
            out[f"eval/ce/{v}"] = next_token_ce(pred, batch)
        else:
            out[f"eval/mse/{v}"] = output_divergence("mse", pred, clean)
    if run.cfg.eval.pgd_steps:
        ctx = StepContext(run=run, model=model, frozen=frozen, batch=batch, clean=clean)
        out[f"eval/pgd/{'kl' if llama else 'mse'}"] = pgd_probe(ctx, params, ci_lower, draws)
    return out


def pgd_probe(ctx: StepContext, params: dict, ci_lower: dict, draws: dict):
    """S88: the recon loss under a fresh-PGD adversary (every site live, routed everywhere,
    per-position sources from `eval.<site>.pgd_init`, `eval.pgd_steps` sign ascents of
    `eval.pgd_step_size`, the `lax.scan` of `sign_ascent`). Stop-gradient: a metric, never a loss."""
    e, sites = ctx.run.cfg.eval, ctx.run.site_names
    params = jax.lax.stop_gradient(params)
    ci_lower = jax.lax.stop_gradient(ci_lower)
    srcs = {n: draws[f"eval.{n}.pgd_init"] for n in sites}
    srcs = sign_ascent(ctx, params, sites, ci_lower, srcs, None, "bsc", e.pgd_step_size, e.pgd_steps)
    d, _ = source_divergence(ctx, params, sites, ci_lower, srcs, None, "bsc")
    return jax.lax.stop_gradient(d)


class Evaluator:
    """The jitted eval of one (run, model), built once (held by the backend): `metrics` with
    explicit draws (parity), `metrics_with_key` with draws sampled inside (production)."""

    def __init__(self, run: ResolvedRun, model: DecomposedModel, dtype):
        self.run, self.model, self.dtype = run, model, dtype
        self._draws = jax.jit(partial(_eval_body, run, model))
        self._key = jax.jit(self._key_body)
        self.place = None  # S141: puts an eval batch on the step's mesh (`on_mesh`)

    def on_mesh(self, placement) -> None:
        """Evaluate on the step's mesh (jax_impl/mesh.py `Placement`): eval batches sharded over
        `data`, the metrics replicated, so every process reads them."""
        self.place = placement.put
        self._draws = jax.jit(partial(_eval_body, self.run, self.model), out_shardings=placement.replicated)
        self._key = jax.jit(self._key_body, out_shardings=placement.replicated)

    def _key_body(self, frozen, params, batch, key):
        run = self.run
        plan = eval_draw_plan(run, batch.shape if run.cfg.target.kind == "llama" else batch.shape[:-1])
        return _eval_body(run, self.model, frozen, params, batch, sample_eval_draws(plan, key, self.dtype))

    def metrics(self, params: dict, batch, draws: dict) -> dict:
        """All eval metrics of one batch (device scalars; see the module docstring)."""
        return self._draws(self.model.frozen, params, batch, draws)

    def metrics_with_key(self, params: dict, batch, key) -> dict:
        """Production: `metrics` with the eval draws sampled inside the jitted function from `key`."""
        return self._key(self.model.frozen, params, batch, key)

    def evaluate_device(self, params: dict, step: int) -> dict:
        """The eval of the training loop at `step`: the mean of `metrics` over
        `cfg.eval.n_batches` eval batches (batch j is eval-stream step `step * n_batches + j`,
        draws keyed by `eval_key(seed, step, j)`). Device scalars: the loop pulls them at its
        log cadence."""
        cfg = self.run.cfg
        n = cfg.eval.n_batches
        acc: dict = {}
        for j in range(n):
            b = to_jax_batch(batch_for_step(self.run, cfg.seed, step * n + j, batch=cfg.eval.batch_size, split="eval"),
                             self.dtype)
            m = self.metrics_with_key(params, b if self.place is None else self.place(b), eval_key(cfg.seed, step, j))
            acc = m if j == 0 else {k: acc[k] + v for k, v in m.items()}
        return acc if n == 1 else {k: v / n for k, v in acc.items()}

    def evaluate(self, params: dict, step: int) -> dict[str, float]:
        """`evaluate_device` as host floats."""
        return {k: float(v) for k, v in jax.device_get(self.evaluate_device(params, step)).items()}


def eval_metrics(run: ResolvedRun, model: DecomposedModel, frozen, params: dict, batch, draws: dict) -> dict:
    """All eval metrics of one batch, unjitted (tests and tools; the loop uses `Evaluator`)."""
    return _eval_body(run, model, frozen, params, batch, draws)
