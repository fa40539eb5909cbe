"""bf16 compute under the gate (SPEC S156): the JAX trainer's bf16 step (fp32 masters, S70)
on a float32 parity case's inputs, compared with that case's float32 golden.

What bf16 may change and by how much (parity/tolerances.py, `bf16_term_rel`): every loss
term a bf16 forward feeds (recon, importance minimality) within the bound derived there from
bf16's unit roundoff, the number of bf16 layers on the term's path and the size of the
term's float32 reduction; what S70 keeps in fp32 (the faithfulness warmup and the
faithfulness term, computed from the masters) within the float32 golden's own rows. That
the reductions really run in float32 is checked on the program itself
(`test_bf16_forward_reduces_in_float32` below): XLA:CPU's excess precision would hide a bf16
reduction in the numbers."""
from __future__ import annotations

import numpy as np
import pytest

from contract.runlog import with_dtype
from parity.cases import CASES
from parity.goldens import Report, compare_warmup, load_golden, rel_err
from parity.tolerances import bf16_term_rel, tol


def _path_layers(run, term_type: str) -> int:
    """bf16 layers on a term's path: the CI function's layers for importance minimality, the
    decomposed sites (each a layer of the masked forward) for a recon term."""
    if term_type == "importance_minimality":
        return len(run.cfg.ci_fn.hidden) + 1
    return len(run.sites)


def _reduction_size(run, term_type: str, batch_shape) -> int:
    """Elements of the term's float32 reduction: positions x C per site for importance
    minimality; for a recon term positions x the widest site dimension (at least the target
    output's width, an upper bound of the MSE's elements)."""
    positions = batch_shape[0] * (batch_shape[1] if run.cfg.target.kind == "llama" else 1)
    if term_type == "importance_minimality":
        return positions * max(s.C for s in run.sites)
    return positions * max(max(s.d_in, s.d_out) for s in run.sites)


@pytest.mark.parametrize("name", ["traj_resid.32", "traj_tms.32"])
def test_bf16_step0_is_within_bf16_rounding_of_the_float32_golden(name, record_property):
    # guards S156
    from loop.backends import make_backend
    case = CASES[name]
    g = load_golden(name)
    assert g.manifest["config_hash"] == case.cfg().hash(), f"golden {name} is stale"
    inp = case.inputs(1)
    run = with_dtype(case.run(), "bf16")
    be = make_backend("jax", run)
    state, warm = be.faithfulness_warmup(be.new_state(inp.init))
    _, m = be.train_step(state, 0, inp.batches[0], inp.draws[0])
    got, want = be.host_metrics(m), g.trajectory[0]
    be.close()
    rep = Report(f"{name} jax-bf16-vs-float32-golden")
    compare_warmup(rep, warm, g.terms["warmup"], "float32")  # from the fp32 masters (S70)
    terms = [k for k in want if k.startswith("loss/") and k != "loss/total"]
    assert terms and all(k in got for k in terms), sorted(set(terms) - set(got))
    for key in terms:
        ttype = key.split(".", 1)[1]
        if ttype == "faithfulness":  # from the fp32 masters (S70): the float32 row
            allowed, floor = tol("float32", "term").rel, tol("float32", "term").floor
        else:
            allowed = bf16_term_rel(_path_layers(run, ttype), _reduction_size(run, ttype, inp.batches[0].shape))
            floor = tol("bf16", "term").floor
        e = rel_err(got[key], want[key], floor)
        rep.note(key, e, allowed, "step 0")
        if e > allowed:
            rep.failures.append(f"step 0 {key}: bf16 {got[key]!r} vs float32 golden {want[key]!r} "
                                f"(rel err {e:.2e} > {allowed:.1e})")
    cells = [f"{what} {e:.1e}/{a:.0e}" for what, (e, a, _) in rep.worst.items()]
    record_property("margins", f"{rep.label:40s} " + "  ".join(cells))
    assert rep.ok, rep.message()


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
    bad = _bf16_reductions(jax.make_jaxpr(f)(jnp.ones(4, jnp.bfloat16)).jaxpr, "parity/test_bf16_parity.py")
    assert len(bad) == 2 and all(b.startswith("reduce_sum over float32 rounded to bf16") for b in bad), bad
