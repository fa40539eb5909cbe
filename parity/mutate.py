"""The project's own mutation command (issue #15 item 8): a catalogue of realistic porting
bugs of the JAX trainer (and of the shared loop), each applied alone to a scratch copy of the
committed tree, against which `pytest parity/` runs; a mutation is killed when that run fails.
Survivors can be run against the whole suite (`--full`). Not part of CI (each mutation is a
whole gate run).

  python -m parity.mutate [--only NAME ...] [--list] [--full] [--keep DIR] [--timeout S] [--tests T ...]

Each mutation is first run against the test of the gate that killed it last time
(`FIRST_LOOK`), then, if it survives that, against the whole gate; `--tests` runs only the
given targets.

Every entry replaces one exact, unique snippet of one file (`old` -> `new`); an entry that no
longer applies (the code moved) is reported as such, never skipped silently
(`parity/test_mutate.py` checks that every entry applies to the tree). An entry known to be
an equivalent mutant says why in `equivalent`."""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from contract.targets import REPO_ROOT


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    old: str
    new: str
    why: str
    equivalent: str = ""  # non-empty: why this mutant cannot change any number (kept for the record)


M = Mutation
CATALOGUE: list[Mutation] = [
    # ------------------------------------------------ leaky-hard pair, binomial (S10-S12, S154)
    M("lower_tie0", "jax_impl/sigmoids.py", "jnp.where(z <= 0, below", "jnp.where(z < 0, below",
      "lower backward at the tie z = 0 takes the in-range branch"),
    M("lower_tie1", "jax_impl/sigmoids.py", "jnp.where(z <= 1, g,", "jnp.where(z < 1, g,",
      "lower backward at the tie z = 1 takes the saturated branch"),
    M("upper_tie0", "jax_impl/sigmoids.py", "jnp.where(z < 0, jnp.zeros_like(z), z)",
      "jnp.where(z <= 0, jnp.zeros_like(z), z)", "upper function: slope 0 at the tie z = 0"),
    M("upper_tie1", "jax_impl/sigmoids.py", "jnp.where(z > 1, 1 + ALPHA", "jnp.where(z >= 1, 1 + ALPHA",
      "upper function: slope alpha at the tie z = 1"),
    M("lower_leak_sign", "jax_impl/sigmoids.py", "below = jnp.where(g < 0, ALPHA * g", "below = jnp.where(g > 0, ALPHA * g",
      "lower backward below 0 leaks the wrong sign of the upstream gradient"),
    M("binomial_noise_scale", "jax_impl/sigmoids.py", "1.05 * z - 0.05 * binomial_u", "1.05 * z - 0.5 * binomial_u",
      "binomial ci_lower with the wrong noise scale"),
    # ------------------------------------------------ optimizer hyperparameters (S40-S45, S152)
    M("adam_betas_default", "jax_impl/state.py", "b1=oc.betas[0], b2=oc.betas[1],", "b1=0.9, b2=0.999,",
      "AdamW ignores the configured betas"),
    M("adam_eps_default", "jax_impl/state.py", "eps=oc.eps, weight_decay", "eps=1e-8, weight_decay",
      "AdamW ignores the configured eps"),
    M("adam_weight_decay_ignored", "jax_impl/state.py", "weight_decay=oc.weight_decay)", "weight_decay=0.0)",
      "AdamW ignores the configured weight decay"),
    M("ci_opt_takes_component_settings", "jax_impl/train.py", "opt = adamw(getattr(cfg.optim, name[4:]))",
      "opt = adamw(cfg.optim.components)", "the CI function's step built with the components' settings",
      equivalent="optax.inject_hyperparams keeps b1 / b2 / eps / weight_decay in the optimizer state made by "
                 "make_state, and the step's update reads them from there: the constructor's values are unused"),
    M("ci_opt_state_takes_component_settings", "jax_impl/state.py", "opt_ci_fn=adamw(o.ci_fn).init(ci)",
      "opt_ci_fn=adamw(o.components).init(ci)", "the CI function's AdamW state made with the components' settings"),
    M("lr_groups_swapped", "jax_impl/train.py", 'hp["lr_components"]),', 'hp["lr_ci_fn"]),',
      "the components step with the CI function's learning rate"),
    M("clip_groups_swapped", "jax_impl/train.py", "clip_grad_norm(g_comp, cfg.optim.components.clip)",
      "clip_grad_norm(g_comp, cfg.optim.ci_fn.clip)", "the components clipped at the CI function's threshold"),
    M("clip_no_eps", "jax_impl/train.py", "max_norm / (total + 1e-6)", "max_norm / total",
      "clip scale without torch's 1e-6"),
    M("warmup_weight_decay_ignored", "jax_impl/train.py",
      "optax.adamw(learning_rate=w.lr, weight_decay=w.weight_decay)", "optax.adamw(learning_rate=w.lr, weight_decay=0.0)",
      "the faithfulness warmup ignores its weight decay"),
    M("warmup_one_step_short", "jax_impl/train.py", "    for _ in range(w.steps):\n", "    for _ in range(w.steps - 1):\n",
      "the faithfulness warmup runs one step too few"),
    M("imp_min_p_not_annealed", "jax_impl/train.py", 'hp["imp_min_p"], t.beta, t.eps)', "t.pnorm, t.beta, t.eps)",
      "importance minimality ignores the p-anneal schedule"),
    # ------------------------------------------------ production path (S150-S151)
    M("production_next_step_schedule", "jax_impl/train.py",
      "return self._key(state, self.model.frozen, self.put_batch(batch), self._seed_key, self.hp(step))",
      "return self._key(state, self.model.frozen, self.put_batch(batch), self._seed_key, self.hp(step + 1))",
      "the production step is fed the next step's schedule values"),
    M("production_one_key_for_all_draws", "jax_impl/train.py",
      "jax.random.uniform(k, shape, dtype))(keys)", "jax.random.uniform(key, shape, dtype))(keys)",
      "every production draw from one key: differently named draws correlated"),
    # ------------------------------------------------ losses (S20-S24)
    M("faithfulness_sum_not_mean", "jax_impl/losses.py", "    return total / numel\n", "    return total\n",
      "faithfulness summed instead of averaged over the weights' elements"),
    M("imp_min_ln_not_log2", "jax_impl/losses.py", "jnp.log2(1 + S)", "jnp.log(1 + S)",
      "importance minimality's log in the wrong base"),
    M("imp_min_eps_dropped", "jax_impl/losses.py", "S = ((u + eps) ** p)", "S = (u ** p)",
      "importance minimality without eps"),
    M("imp_min_N_wrong", "jax_impl/losses.py", "N = u.size // s.C", "N = u.size",
      "importance minimality normalised by elements, not positions"),
    M("kl_direction", "jax_impl/losses.py", "(jnp.exp(lt) * (lt - lp))", "(jnp.exp(lp) * (lp - lt))",
      "KL(masked || clean) instead of KL(clean || masked)"),
    M("mse_mean_over_rows", "jax_impl/losses.py", "((pred - target) ** 2).sum() / pred.size",
      "((pred - target) ** 2).sum() / pred.shape[0]", "MSE averaged over rows, not elements"),
    M("bf16_loss_reduction", "jax_impl/losses.py",
      "    pred = pred.astype(jnp.promote_types(pred.dtype, jnp.float32))\n"
      "    target = target.astype(jnp.promote_types(target.dtype, jnp.float32))\n", "",
      "KL / MSE reduced in the compute dtype (bf16) instead of float32"),
    M("bf16_faithfulness_from_copies", "jax_impl/train.py", "faithfulness(run, model, frozen_masters, masters)",
      "faithfulness(run, model, frozen, params)", "faithfulness from the bf16 copies instead of the fp32 masters"),
    # ------------------------------------------------ masks, routing, delta (S4-S8, S26-S28, S51)
    M("stochastic_mask_formula", "jax_impl/recon.py", "mask = ci + (1 - ci) * src", "mask = jnp.maximum(ci, src)",
      "stochastic mask max(ci, src) instead of ci + (1 - ci) src"),
    M("binomial_source_inverted", "jax_impl/recon.py", "return (u < 0.5).astype(u.dtype)", "return (u > 0.5).astype(u.dtype)",
      "binomial source drawn as u > 1/2 (same law, other numbers)"),
    M("delta_source_is_mask_source", "jax_impl/recon.py",
      'dm = draws[draw_name(term.index, ei, d, f"{name}.delta")] if run.cfg.use_delta_component else None',
      "dm = src[..., 0] if run.cfg.use_delta_component else None",
      "the delta channel takes the first mask source instead of its own draw"),
    M("route_k_off_by_one", "jax_impl/recon.py", "k = jnp.minimum(1 + jnp.floor(route_k * n), n)",
      "k = jnp.minimum(jnp.floor(route_k * n), n)", "subset routing draws k - 1 sites"),
    M("route_rank_reversed", "jax_impl/recon.py", "(route_order[..., None, :] < route_order[..., :, None])",
      "(route_order[..., None, :] > route_order[..., :, None])", "subset routing ranks the uniforms the other way"),
    M("recon_sum_over_forwards", "jax_impl/recon.py", "return {k: v / counts[k] for k, v in values.items()}",
      "return dict(values)", "a recon term sums its forwards (n_mask_samples, plan entries) instead of averaging"),
    M("delta_mask_sign", "jax_impl/components.py", "y = (a * (m.mask - dm)) @ U + dm * xw",
      "y = (a * (m.mask + dm)) @ U + dm * xw", "S4b delta path with the wrong sign"),
    M("route_where_swapped", "jax_impl/components.py", "jnp.where(m.route[..., None], y, frozen_out)",
      "jnp.where(m.route[..., None], frozen_out, y)", "routed sites take the frozen output"),
    M("l0_threshold", "jax_impl/train.py", "(c > 0).astype(jnp.float32).sum(-1).mean()",
      "(c > 0.5).astype(jnp.float32).sum(-1).mean()", "training L0 counts ci_lower > 1/2"),
    # ------------------------------------------------ adversaries (S80-S88)
    M("pgd_no_clamp", "jax_impl/adversary.py", "jnp.clip(srcs[n] + step_size * jnp.sign(grad[n]), 0.0, 1.0)",
      "srcs[n] + step_size * jnp.sign(grad[n])", "fresh-PGD ascent without the clamp to [0, 1]"),
    M("pgd_init_swapped", "jax_impl/adversary.py", '(jnp.ones if tc.init == "ones" else jnp.zeros)',
      '(jnp.zeros if tc.init == "ones" else jnp.ones)', "fresh-PGD init ones and zeroes swapped"),
    M("source_adam_eps_inside_sqrt", "jax_impl/adversary.py", "(jnp.sqrt(v_hat) + oc.eps)", "jnp.sqrt(v_hat + oc.eps)",
      "persistent sources' Adam with eps inside the sqrt"),
    M("source_adam_no_bias_correction", "jax_impl/adversary.py", "m_hat = m[n] / (1 - b1 ** t).astype(m[n].dtype)",
      "m_hat = m[n]", "persistent sources' Adam without the first moment's bias correction"),
    M("source_adam_betas_swapped", "jax_impl/adversary.py", "b1, b2 = oc.betas", "b2, b1 = oc.betas",
      "persistent sources' Adam betas swapped"),
    # ------------------------------------------------ CI functions (S14-S17)
    M("gelu_tanh", "jax_impl/ci_fn.py", "jax.nn.gelu(x, approximate=False)", "jax.nn.gelu(x, approximate=True)",
      "tanh GELU instead of the exact one"),
    M("rms_norm_no_eps", "jax_impl/ci_fn.py", "jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + eps)",
      "jax.lax.rsqrt((x * x).mean(-1, keepdims=True))", "the CI transformer's RMS norm without its eps"),
    # ------------------------------------------------ eval (S86-S88)
    M("eval_rounding_threshold", "jax_impl/eval.py", "(ci > 0.5).astype(ci.dtype)", "(ci > 0).astype(ci.dtype)",
      "eval's rounded masks at the wrong threshold"),
    M("eval_sum_over_batches", "jax_impl/eval.py", "return acc if n == 1 else {k: v / n for k, v in acc.items()}",
      "return acc", "eval metrics summed instead of averaged over eval batches"),
    M("eval_l0_threshold", "jax_impl/eval.py", "return (ci_lower > 0).astype(wd).sum(-1).mean()",
      "return (ci_lower > 0.5).astype(wd).sum(-1).mean()", "eval L0 counts ci_lower > 1/2"),
    # ------------------------------------------------ resume (S101, S155)
    M("resume_reruns_warmup", "loop/train.py", "    if ckpt is None:\n        state, warm = backend.faithfulness_warmup(state)",
      "    if True:\n        state, warm = backend.faithfulness_warmup(state)", "a resume reruns the faithfulness warmup"),
    M("resume_one_step_early", "loop/train.py", "        start = backend.state_step(state)\n",
      "        start = backend.state_step(state) - 1\n", "a resume retrains the checkpoint's last step"),
    M("resume_resets_adam", "jax_impl/backend.py", '        return state, dict(read_meta(path).get("extra") or {})',
      "        fresh = self.new_state()\n"
      "        state = state.replace(opt_components=fresh.opt_components, opt_ci_fn=fresh.opt_ci_fn)\n"
      '        return state, dict(read_meta(path).get("extra") or {})', "a JAX resume re-initialises both AdamW states"),
    M("resume_resets_source_adam", "jax_impl/backend.py", '        return state, dict(read_meta(path).get("extra") or {})',
      "        fresh = self.new_state()\n        state = state.replace(source_opt=fresh.source_opt)\n"
      '        return state, dict(read_meta(path).get("extra") or {})',
      "a JAX resume re-initialises the persistent sources' Adam states"),
]
BY_NAME = {m.name: m for m in CATALOGUE}

# Where to look first: the gate's test that killed each mutation when the whole gate was last
# run against it. A mutation is first run against its entry here; only if that passes does the
# whole of `pytest parity/` run. The verdict is the same (the gate's tests are independent, so a
# test that fails alone fails in the whole run); the entry only saves running the rest.
_J = "parity/test_parity.py::test_jax_vs_golden"
FIRST_LOOK: dict[str, str] = {
    "lower_tie0": f"{_J}[tms_ties]", "lower_tie1": f"{_J}[tms_ties]", "upper_tie0": f"{_J}[resid2_chunks]",
    "upper_tie1": f"{_J}[tms_ties]",
    "lower_leak_sign": "parity/test_tooling.py::test_stage_bundles_torch_vs_jax_float64_all_ok",
    "binomial_noise_scale": f"{_J}[tms_binomial_nodelta]", "binomial_source_inverted": f"{_J}[tms_binomial_nodelta]",
    **{n: f"{_J}[traj_hparams.64]" for n in (
        "adam_betas_default", "adam_eps_default", "adam_weight_decay_ignored", "ci_opt_state_takes_component_settings",
        "lr_groups_swapped", "clip_groups_swapped", "clip_no_eps", "warmup_weight_decay_ignored",
        "delta_source_is_mask_source")},
    "warmup_one_step_short": f"{_J}[traj_tms.64]", "imp_min_p_not_annealed": f"{_J}[traj_llama.64]",
    "production_next_step_schedule": "parity/test_production.py",
    "production_one_key_for_all_draws": "parity/test_production.py",
    **{n: f"{_J}[tms_all_terms]" for n in (
        "faithfulness_sum_not_mean", "imp_min_ln_not_log2", "imp_min_eps_dropped", "imp_min_N_wrong",
        "mse_mean_over_rows", "stochastic_mask_formula", "recon_sum_over_forwards", "gelu_tanh")},
    "kl_direction": f"{_J}[llama_kl]", "delta_mask_sign": f"{_J}[traj_llama.64]",
    "bf16_loss_reduction": "parity/test_bf16_parity.py", "bf16_faithfulness_from_copies": "parity/test_bf16_parity.py",
    "route_k_off_by_one": f"{_J}[traj_resid.64]", "route_rank_reversed": f"{_J}[traj_resid.64]",
    "route_where_swapped": f"{_J}[traj_resid.64]", "l0_threshold": f"{_J}[traj_tms.64]",
    "pgd_no_clamp": f"{_J}[tms_fresh_pgd]", "pgd_init_swapped": f"{_J}[tms_fresh_pgd_ones]",
    **{n: f"{_J}[traj_tms_ppgd.64]" for n in (
        "source_adam_eps_inside_sqrt", "source_adam_no_bias_correction", "source_adam_betas_swapped")},
    "rms_norm_no_eps": f"{_J}[tms_transformer]",
    **{n: "parity/test_eval_parity.py" for n in ("eval_rounding_threshold", "eval_sum_over_batches", "eval_l0_threshold")},
    **{n: "parity/test_resume_parity.py" for n in ("resume_reruns_warmup", "resume_one_step_early", "resume_resets_adam",
                                                    "resume_resets_source_adam")},
}


def problem(m: Mutation, root: Path = REPO_ROOT) -> str | None:
    """Why `m` does not apply to the tree at `root` (None when `old` occurs exactly once)."""
    p = root / m.path
    if not p.is_file():
        return f"{m.path} does not exist"
    n = p.read_text().count(m.old)
    return None if n == 1 else f"its snippet occurs {n} times in {m.path} (needs exactly 1)"


def apply(m: Mutation, root: Path) -> None:
    why = problem(m, root)
    if why is not None:
        raise ValueError(f"mutation {m.name}: {why}")
    p = root / m.path
    p.write_text(p.read_text().replace(m.old, m.new))


def pristine_copy(dst: Path) -> None:
    """The committed tree (HEAD) at `dst`, with the repo's .venv linked in."""
    dst.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", "HEAD"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dst)], input=archive, check=True)
    (dst / ".venv").symlink_to(REPO_ROOT / ".venv")


# The gate's files, those that kill most mutants soonest first: with -x a killed mutant's run
# ends at its first failure. The run is still the whole of `pytest parity/` (every test file
# but the catalogue's own check, below).
GATE_FIRST = ("test_parity.py", "test_production.py", "test_eval_parity.py", "test_resume_parity.py",
              "test_bf16_parity.py", "test_case_coverage.py")


# Not run against a mutant: parity/test_mutate.py checks that every catalogue entry's snippet
# occurs in the tree, which a mutated tree fails by construction (it would "kill" every mutant).
NOT_IN_GATE_RUN = ("test_mutate.py",)


def gate_targets(root: Path = REPO_ROOT) -> list[str]:
    """Every test file of parity/ at `root` but NOT_IN_GATE_RUN, GATE_FIRST's first."""
    files = sorted(p.name for p in (root / "parity").glob("test_*.py") if p.name not in NOT_IN_GATE_RUN)
    first = [f for f in GATE_FIRST if f in files]
    return [f"parity/{f}" for f in first + [f for f in files if f not in first]]


FAIL_LINE = re.compile(r"^(?:FAILED|ERROR) (\S+)", re.M)


def run_tests(root: Path, targets: list[str], timeout: float) -> tuple[bool, str, float]:
    """(failed, first failing test, seconds) of pytest on `targets` in the tree at `root`."""
    t0 = time.perf_counter()
    env = os.environ | {"JAX_PLATFORMS": "cpu"}
    env.pop("PYTHONPATH", None)
    cmd = [sys.executable, "-m", "pytest", *targets, "-x", "-q", "-p", "no:cacheprovider", "-n", "2",
           "--dist", "loadgroup"]
    try:
        r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return True, f"(timed out after {timeout:.0f} s)", time.perf_counter() - t0
    first = FAIL_LINE.search(r.stdout)
    return r.returncode != 0, (first.group(1) if first else ("" if r.returncode == 0 else f"exit {r.returncode}")), \
        time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m parity.mutate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run these catalogue entries (default: all)")
    ap.add_argument("--list", action="store_true", help="list the catalogue and exit")
    ap.add_argument("--full", action="store_true", help="run the whole suite against each survivor of pytest parity/")
    ap.add_argument("--keep", metavar="DIR", help="work in DIR (kept) instead of a temporary directory")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per pytest run (default 3600)")
    ap.add_argument("--tests", nargs="+", default=None, metavar="T",
                    help="pytest targets of each run (default: every file of parity/, those that kill most "
                         "mutants first; e.g. one test id for a quick look)")
    a = ap.parse_args(argv)
    if a.list:
        for m in CATALOGUE:
            print(f"{m.name:36s} {m.path:24s} {m.why}" + (f" [equivalent: {m.equivalent}]" if m.equivalent else ""))
        return 0
    unknown = [n for n in a.only or [] if n not in BY_NAME]
    if unknown:
        print(f"unknown mutation(s): {unknown}; see --list", file=sys.stderr)
        return 2
    todo = [BY_NAME[n] for n in a.only] if a.only else CATALOGUE
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="vpd-mutate-"))
    work.mkdir(parents=True, exist_ok=True)
    pristine = work / "pristine"
    if not pristine.exists():
        pristine_copy(pristine)
    rows = []
    try:
        for m in todo:
            tree = work / m.name
            if tree.exists():
                shutil.rmtree(tree)
            shutil.copytree(pristine, tree, symlinks=True)
            try:
                apply(m, tree)
            except ValueError as e:
                rows.append((m, "does not apply", str(e), 0.0))
                print(f"{m.name}: does not apply ({e})", flush=True)
                continue
            failed, first, secs = False, "", 0.0
            if a.tests is None and m.name in FIRST_LOOK:
                failed, first, secs = run_tests(tree, [FIRST_LOOK[m.name]], a.timeout)
                if failed and first.startswith(("exit ", "(timed out")):
                    # no test of the entry failed (pytest did not find it, or it timed out):
                    # not a kill; the whole gate decides
                    print(f"{m.name}: its FIRST_LOOK {FIRST_LOOK[m.name]} did not run ({first})", flush=True)
                    failed = False
            if not failed:
                failed, first, more = run_tests(tree, a.tests or gate_targets(tree), a.timeout)
                secs += more
            if not failed and a.full:
                failed, first, more = run_tests(tree, [], a.timeout)
                first, secs = (f"{first} (whole suite)" if failed else first), secs + more
            verdict = "killed" if failed else ("equivalent" if m.equivalent else "SURVIVED")
            rows.append((m, verdict, first, secs))
            print(f"{m.name}: {verdict}" + (f" by {first}" if failed else "") + f" ({secs:.0f} s)", flush=True)
            shutil.rmtree(tree)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    killed = sum(v == "killed" for _, v, _, _ in rows)
    counted = sum(v in ("killed", "SURVIVED") for _, v, _, _ in rows)
    print(f"\n{'mutation':36s} {'verdict':15s} first failing test")
    for m, v, first, _ in rows:
        print(f"{m.name:36s} {v:15s} {first}")
    rate = 100.0 * killed / counted if counted else 0.0
    print(f"\nkilled {killed} of {counted} ({rate:.1f}%); equivalent "
          f"{sum(v == 'equivalent' for _, v, _, _ in rows)}; not applied {sum(v == 'does not apply' for _, v, _, _ in rows)}")
    return 0 if killed == counted and all(v != "does not apply" for _, v, _, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
