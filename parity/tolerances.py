"""Every parity tolerance, in one table, each with its reason. Errors are relative:
|a - b| / max(|a|, |b|, floor). Gradients are compared elementwise relative to the norm
of their leaf (a gradient entry near zero has no meaningful relative error of its own)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tol:
    rel: float
    floor: float  # values below this magnitude are compared absolutely at rel*floor
    growth: float = 0.0  # trajectories: allowed rel error grows as rel * (1 + growth * step)
    why: str = ""


BF16_U = 2.0 ** -8  # bfloat16's unit roundoff: 8 significant bits (its machine epsilon is 2^-7 = 7.8e-3)
F32_U = 2.0 ** -24  # float32's unit roundoff


TOLERANCES: dict[tuple[str, str], Tol] = {
    ("float64", "term"): Tol(1e-10, 1e-12, 0.0,
        "same math in IEEE double: only reassociation (~1e-16 per op) separates the frameworks"),
    ("float64", "grad"): Tol(1e-10, 0.0, 0.0,
        "as for terms; relative to the leaf's gradient norm"),
    ("float64", "trajectory"): Tol(1e-8, 1e-12, 0.0,
        "50 optimizer steps amplify 1e-16 reassociation noise (Adam divides by sqrt(v)); 1e-8 leaves "
        "orders of magnitude of margin yet catches any algorithmic difference"),
    ("float32", "term"): Tol(3e-5, 1e-6, 0.0,
        "single precision (eps 1.2e-7): gradient norms of CI weights sum over 1000-wide inputs "
        "and every position (observed up to 7e-6 on traj_resid.32)"),
    ("float32", "grad"): Tol(1e-4, 0.0, 0.0,
        "single-precision backward through masked forwards; relative to the leaf's gradient norm"),
    ("float32", "trajectory"): Tol(5e-4, 1e-5, 0.1,
        "single-precision noise is amplified by Adam's normalisation each step, so the budget grows "
        "linearly with the step: rel * (1 + 0.1 * step)"),
    # the oracle on N data ranks against itself on one (S112, parity/ranks_invariance.py): the
    # same math; only the order of the batch sums (each rank's partial sum, then the
    # all-reduce) and of FSDP2's gradient reduce-scatter (sum of N shares, then / N) differ
    ("float64", "ranks_step0"): Tol(1e-12, 0.0, 0.0,
        "reassociated batch sums in double: observed <= 4.3e-15 at step 0 (ranks_resid, 4 ranks)"),
    ("float64", "ranks_trajectory"): Tol(1e-10, 0.0, 0.0,
        "20 AdamW steps amplify the 1e-16 reassociation (Adam divides by sqrt(v)); observed <= 1.1e-14"),
    ("float32", "ranks_step0"): Tol(1e-5, 0.0, 0.0,
        "reassociated batch sums in single precision (eps 1.2e-7, sums over up to 64 positions and "
        "1000-wide inputs): observed <= 1.9e-6 (ranks_resid, 4 ranks)"),
    ("float32", "ranks_trajectory"): Tol(1e-4, 0.0, 0.0,
        "20 single-precision AdamW steps amplify the step-0 noise; observed <= 7.8e-6 on the final "
        "state (ranks_resid, 4 ranks)"),
    # the JAX trainer on a (data, components) mesh or several processes against itself on one
    # device (S142, parity/mesh_invariance.py, tests/test_jax_mesh_invariance.py): the same
    # program partitioned by XLA; only the order of the sums over the batch and over C differs
    ("float64", "mesh_step0"): Tol(1e-12, 0.0, 0.0,
        "reassociated batch / component sums in double (~1e-16 per op): terms and gradient leaves"),
    ("float64", "mesh_trajectory"): Tol(1e-10, 0.0, 0.0,
        "20 AdamW steps amplify the 1e-16 reassociation (Adam divides by sqrt(v))"),
    ("float32", "mesh_step0"): Tol(1e-5, 0.0, 0.0,
        "reassociated sums in single precision (eps 1.2e-7, sums over batch x positions and C)"),
    ("float32", "mesh_trajectory"): Tol(1e-3, 0.0, 0.0,
        "20 single-precision AdamW steps: normalised updates (m/sqrt(v)) turn 1e-7 noise on near-zero "
        "gradient entries into changes of lr size, then every later loss moves with them"),
    # the production step against the parity step fed the production draws (S150,
    # parity/test_production.py), one device. The oracle's two paths are one program: rel 0.
    ("float64", "production_jax"): Tol(1e-14, 0.0, 0.0,
        "JAX's production step (draws sampled inside the jitted step) and its parity step (draws passed in) "
        "are two programs XLA compiles and fuses separately, so a sum may reassociate or contract into an FMA "
        "differently: observed 2 ulps (1.5e-16) in step-0 ci_fn gradient norms, <= 1e-15 over 3 steps on "
        "traj_tms_ppgd.64 once the S153 re-pin made its recon terms depend on the masks (the old, degenerate pin "
        "was bit-identical); another step's schedule values or other draws move values by orders of magnitude more"),
    ("float32", "production_jax"): Tol(0.0, 0.0, 0.0,
        "bit for bit on the float32 case (traj_tms.32): no reassociation observed"),
    # bf16 compute (S70) against the float32 goldens (S156, parity/test_bf16_parity.py): the
    # row's rel is the budget of ONE bf16 layer on a term's path; bf16_term_rel below scales it
    ("bf16", "term"): Tol(2 * 4 * BF16_U, 1e-6, 0.0,
        "per bf16 layer on the term's path: 4 roundings (input, weight, masked product, output) of relative "
        "<= u = 2^-8 each, doubled by the quadratic loss; see bf16_term_rel"),
}


def bf16_term_rel(layers: int, n: int) -> float:
    """Relative tolerance of a loss term computed with bf16 compute (S70) against the float32
    golden, for a term with `layers` bf16 layers on its path and a float32 reduction of `n`
    elements (S156):

    - every bf16 layer rounds its input, its weight (V / U / W, or a CI-function layer), the
      masked product and its output to bf16: 4 roundings of relative size <= u = 2^-8 each,
      so an element of the term's argument is within 4 * layers * u of its float32 value (first
      order; the clean and the masked outputs go through the same rounded weights);
    - the loss is quadratic in those elements (MSE; importance minimality's (ci + eps)^p with
      p <= 2), which doubles the relative error: 2 * 4 * layers * u (the ("bf16", "term") row
      per layer);
    - the term's reduction runs in float32 (S70, checked on the program by
      parity/test_bf16_parity.py): summing n elements adds at most n * 2^-24 (the worst case of
      sequential accumulation). The same sum accumulated in bf16 would be allowed n * 2^-8.

    Observed (traj_resid.32, step 0): recon terms 3.2e-3, importance minimality 3.6e-3,
    against 6.3e-2 (2 layers)."""
    return TOLERANCES[("bf16", "term")].rel * layers + n * F32_U


def tol(precision: str, what: str) -> Tol:
    return TOLERANCES[(precision, what)]
