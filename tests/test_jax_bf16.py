"""bf16 compute (SPEC S70): the JAX trainer runs its forwards in bfloat16 from fp32
masters, with faithfulness, KL/MSE and imp-min reductions in fp32; the oracle refuses it."""
from __future__ import annotations

import copy

import numpy as np
import pytest

from contract.config import parse_config
from contract.data import batch_for_step
from contract.draws import draw_plan, sample_numpy
from contract.init import init_state
from contract.resolve import resolve_run
from tests.helpers import shipped_config


def _run(dtype: str):
    d = shipped_config("resid_mlp1")
    d = copy.deepcopy(d) | {"batch_size": 16, "steps": 5, "faithfulness_warmup": {"steps": 0},
                            "sites": [{"pattern": "layers.*.mlp_in", "C": 8}, {"pattern": "layers.*.mlp_out", "C": 8}],
                            "runtime": {"dtype": dtype}}
    return resolve_run(parse_config(d))


def _three_steps(dtype: str):
    import jax.numpy as jnp

    from jax_impl.components import DecomposedModel
    from jax_impl.state import jax_dtype, make_state
    from jax_impl.train import Stepper
    run = _run(dtype)
    dt = jax_dtype(dtype)
    model = DecomposedModel(run, dt)
    state = make_state(run, init_state(run), dt)
    st = Stepper(run, model, dt)
    out = []
    for k in range(3):
        b = jnp.asarray(batch_for_step(run, run.cfg.seed, k), dt)
        state, m = st.step_with_draws(state, b, sample_numpy(draw_plan(run), run.cfg.seed, k), k)
        out.append({n: float(v) for n, v in m.items()})
    return state, out


def test_bf16_keeps_fp32_masters_and_tracks_fp32():
    # guards S70: masters and moments stay fp32; losses are finite and close to the fp32 run
    import jax
    state, bf = _three_steps("bf16")
    _, f32 = _three_steps("float32")
    for leaf in jax.tree.leaves(state.params):
        assert leaf.dtype == np.float32
    for k in range(3):
        for key in ("loss/0.faithfulness", "loss/2.stochastic_recon", "loss/total"):
            a, b = bf[k][key], f32[k][key]
            assert np.isfinite(a)
            assert abs(a - b) <= 0.05 * abs(b), (k, key, a, b)
    # faithfulness is computed from the fp32 masters: identical at step 0
    assert bf[0]["loss/0.faithfulness"] == f32[0]["loss/0.faithfulness"]
    # and bf16 compute is really in effect: the recon term differs from fp32 at step 0
    assert bf[0]["loss/2.stochastic_recon"] != f32[0]["loss/2.stochastic_recon"]


def test_oracle_refuses_bf16_naming_the_field():
    # guards S70: the oracle is the fp32/fp64 reference and says so
    from oracle_torch.state import torch_dtype
    with pytest.raises(ValueError, match="runtime.dtype"):
        torch_dtype("bf16")



# --------------------------------------------------------------- S156: float32 reductions
# Rounding reductions: their result depends on the accumulator's precision. max / min (and
# argmax / argmin) are exact in any precision, so a bf16 max (the CI transformer's softmax
# shift) is allowed. jnp's sum / mean of a bf16 array accumulate in float32 internally and
# round the result back to bf16: such a reduction is a bf16 reduction too (its summands were
# computed in bf16 and its result is rounded), and is recognised by that rounding.
ROUNDING_REDUCTIONS = {"reduce_sum", "reduce_prod", "cumsum", "cumprod", "cumlogsumexp"}
ELEMENTWISE = {"div", "mul", "add", "sub", "neg", "sqrt", "rsqrt", "log", "exp", "pow", "integer_pow", "max", "min",
               "convert_element_type", "broadcast_in_dim", "reshape", "squeeze"}


def _narrow(dt) -> bool:
    import jax.numpy as jnp
    return bool(jnp.issubdtype(dt, jnp.floating)) and jnp.finfo(dt).bits < 32


def _rounded_to_narrow(var, consumers: dict, depth: int = 4) -> bool:
    """Whether `var` (a float32 result) is rounded to a < 32-bit float by the elementwise
    chain consuming it (within `depth` equations)."""
    for e in consumers.get(var, []):
        if e.primitive.name == "convert_element_type" and _narrow(e.params["new_dtype"]):
            return True
        if depth and e.primitive.name in ELEMENTWISE and _rounded_to_narrow(e.outvars[0], consumers, depth - 1):
            return True
    return False


def _bf16_reductions(jaxpr, where: str, seen: list | None = None) -> list[str]:
    """Every rounding reduction of `jaxpr` (and its sub-jaxprs) written in a file whose path
    contains `where` over a floating operand narrower than float32, or whose float32 result
    is rounded to one, with where it was written. `seen` collects every reduction written there."""
    from jax._src import source_info_util
    consumers: dict = {}
    for e in jaxpr.eqns:
        for v in e.invars:
            if hasattr(v, "aval") and not hasattr(v, "val"):  # a variable, not a literal
                consumers.setdefault(v, []).append(e)
    out = []
    for e in jaxpr.eqns:
        if e.primitive.name in ROUNDING_REDUCTIONS and where in (at := source_info_util.summarize(e.source_info)):
            if seen is not None:
                seen.append(at)
            dt = e.invars[0].aval.dtype
            if _narrow(dt) or _rounded_to_narrow(e.outvars[0], consumers):
                out.append(f"{e.primitive.name} over {dt}{' rounded to bf16' if not _narrow(dt) else ''} at {at}")
        for p in e.params.values():
            for q in p if isinstance(p, list | tuple) else [p]:
                sub = getattr(q, "jaxpr", q)  # a ClosedJaxpr's jaxpr, or a Jaxpr
                if hasattr(sub, "eqns"):
                    out += _bf16_reductions(sub, where, seen)
    return out


def _bf16_forward(name: str):
    """(jaxpr, output dtypes) of the bf16 step's forward (`forward_terms`: every loss term,
    the total) on the inputs of parity case `name`."""
    import jax
    import jax.numpy as jnp

    from contract.runlog import with_dtype
    from jax_impl.components import DecomposedModel
    from jax_impl.state import jax_dtype, make_state
    from jax_impl.train import Stepper, forward_terms
    from parity.cases import CASES
    case = CASES[name]
    run = with_dtype(case.run(), "bf16")
    inp = case.inputs(1)
    dt = jax_dtype("bf16")
    model = DecomposedModel(run, dt)
    state = make_state(run, inp.init, dt)
    hp = Stepper(run, model, dt).hp(0)
    draws = {k: jnp.asarray(v, dt) for k, v in inp.draws[0].items()}
    b = inp.batches[0]
    batch = jnp.asarray(b) if b.dtype.kind in "iu" else jnp.asarray(b, dt)

    def f(p, s):
        total, (terms, _) = forward_terms(run, model, model.frozen, p, batch, draws, hp, s)
        return total, terms

    closed, shapes = jax.make_jaxpr(f, return_shape=True)(state.params, state.sources)
    total, terms = shapes
    return closed.jaxpr, {"total": total.dtype} | {k: v.dtype for k, v in terms.items()}


# mse on the ResidMLP and TMS (every plain recon plan, imp-min), KL on the tiny Llama (its
# RMSNorm / softmax islands), the CI transformer (attention softmax over the sites)
@pytest.mark.parametrize("name", ["traj_resid.32", "tms_all_terms", "llama_kl", "tms_transformer"])
def test_bf16_forward_reduces_in_float32(name):
    # guards S70, S156: the reductions of faithfulness, KL / MSE and importance minimality
    # (jax_impl/losses.py) accumulate float32 summands in float32 under bf16 compute and every
    # term is a float32 value; checked on the program JAX hands to XLA (XLA:CPU's excess
    # precision hides a bf16 reduction in the numbers; an accelerator would not). The rest of
    # the forward is bf16 by S70 (its float32 islands, S17 / the Llama's, round back to bf16).
    jaxpr, dtypes = _bf16_forward(name)
    narrow = {k: str(d) for k, d in dtypes.items() if d != np.float32}
    assert not narrow, f"{name}: terms not float32 under bf16 compute (S70): {narrow}"
    seen: list = []
    bad = _bf16_reductions(jaxpr, "jax_impl/losses.py", seen)
    assert len(seen) >= 3, f"{name}: the loss reductions were not found in the program ({seen})"
    assert not bad, f"{name}: bf16 compute reduces in bfloat16 (S70 says float32):\n" + "\n".join(bad[:10])


def test_reduction_walker_sees_a_bf16_sum():
    # the walker itself: bf16 sums (jnp's, rounded back to bf16) nested in a jitted,
    # custom-vjp'd function are found; a float32 sum of bf16 values and a bf16 max are not
    import jax
    import jax.numpy as jnp

    @jax.custom_vjp
    def f(x):
        return jax.jit(lambda y: (y.sum() + (y * y).mean()).astype(jnp.float32) + y.astype(jnp.float32).sum()
                       + y.max())(x)
    f.defvjp(lambda x: (f(x), None), lambda _, g: (g,))
    bad = _bf16_reductions(jax.make_jaxpr(f)(jnp.ones(4, jnp.bfloat16)).jaxpr, "tests/test_jax_bf16.py")
    assert len(bad) == 2 and all(b.startswith("reduce_sum over float32 rounded to bf16") for b in bad), bad
