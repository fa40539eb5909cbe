"""bf16 compute under the gate (SPEC S156): the JAX trainer's bf16 step (fp32 masters, S70)
on a float32 parity case's inputs, compared with that case's float32 golden.

What bf16 may change and by how much (parity/tolerances.py, `bf16_term_rel`): every loss
term a bf16 forward feeds (recon, importance minimality) within the bound derived there from
bf16's unit roundoff, the number of bf16 layers on the term's path and the size of the
term's float32 reduction; what S70 keeps in fp32 (the faithfulness warmup and the
faithfulness term, computed from the masters) within the float32 golden's own rows. That
the reductions really run in float32 is checked on the program itself
(tests/test_jax_bf16.py::test_bf16_forward_reduces_in_float32)."""
from __future__ import annotations

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
