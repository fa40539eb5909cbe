"""The draw plan (contract/draws.py): which random tensors each recon term consumes, how
the parity harness samples them, and the routing rule derived from uniforms.
SPEC S25-S27 (plans, sources), S51 (uniform_k routing), S53 (independence), S8, S12,
S50-S52."""
from __future__ import annotations

import itertools
import json
from collections import Counter

import numpy as np
import pytest
from safetensors.numpy import save_file

from contract.config import parse_config
from contract.draws import (
    DrawSpec,
    bernoulli_from_uniform,
    draw_name,
    draw_plan,
    numpy_rng,
    route_from_uniforms,
    sample_numpy,
)
from contract.resolve import resolve_run

B = 8
# config order of the sites: patterns first, then the target's module order within one
SITES = ["layers.0.mlp_in", "layers.1.mlp_in", "layers.2.mlp_in",
         "layers.0.mlp_out", "layers.1.mlp_out", "layers.2.mlp_out"]
C = {s: (3 if s.endswith("mlp_in") else 5) for s in SITES}


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    """A tiny 3-layer ResidMLP target: 6 sites, so chunks of 4 leave a shorter last chunk."""
    d = tmp_path_factory.mktemp("resid")
    w = d / "resid3.safetensors"
    t = {"W_E": np.zeros((7, 6), np.float32)}
    for i in range(3):
        t[f"layers.{i}.mlp_in.weight"] = np.zeros((4, 6), np.float32)
        t[f"layers.{i}.mlp_out.weight"] = np.zeros((6, 4), np.float32)
    save_file(t, str(w))
    (d / "resid3.json").write_text(json.dumps({"kind": "resid_mlp", "training": {}, "config": {
        "n_features": 7, "d_embed": 6, "d_mlp": 4, "n_layers": 3, "feature_probability": 0.1}}))
    return str(w)


def run_with(weights, terms, **top):
    d = {
        "target": {"kind": "resid_mlp", "weights": weights},
        "sites": [{"pattern": "layers.*.mlp_in", "C": 3}, {"pattern": "layers.*.mlp_out", "C": 5}],
        "ci_fn": {"type": "vector_mlp"}, "output_loss": "mse",
        # faithfulness first, so recon terms sit at config index >= 1 (names use that index)
        "loss_terms": [{"type": "faithfulness", "coeff": 1.0}] + [{"coeff": 1.0, **t} for t in terms],
        "optim": {"components": {"lr": {"start": 1e-3}}, "ci_fn": {"lr": {"start": 1e-3}}},
        "steps": 4, "batch_size": B, **top,
    }
    return resolve_run(parse_config(d))


def shapes(plan) -> dict[str, tuple]:
    names = [d.name for d in plan]
    assert len(names) == len(set(names)), "draw names must be unique"
    assert all(d.dist == "uniform" for d in plan)
    return {d.name: d.shape for d in plan}


def source_draws(term, entry, draw, sites, delta=True):
    out = {}
    for s in sites:
        out[draw_name(term, entry, draw, f"{s}.source")] = (B, C[s])
        if delta:
            out[draw_name(term, entry, draw, f"{s}.delta")] = (B,)
    return out


def route_draws(term, entry, draw, n):
    return {draw_name(term, entry, draw, "route_k"): (B,), draw_name(term, entry, draw, "route_order"): (B, n)}


# ------------------------------------------------------------------ plan contents
def test_site_order(weights):
    # guards S2: the site order the names below rely on
    assert run_with(weights, []).site_names == tuple(SITES)


@pytest.mark.parametrize("delta", [True, False])
def test_stochastic_recon_one_source_per_site_no_routing(weights, delta):
    # guards S25/S26/S8: all-sites plan = one source per live site per draw (+delta channel
    # when use_delta_component), routed everywhere -> no routing draws
    run = run_with(weights, [{"type": "stochastic_recon"}], use_delta_component=delta)
    assert shapes(draw_plan(run)) == source_draws(1, 0, 0, SITES, delta)


def test_layerwise_one_entry_per_site(weights):
    # guards S25: per_site plan = one entry per site, holding only that site's draws
    run = run_with(weights, [{"type": "stochastic_recon_layerwise"}])
    want = {}
    for e, s in enumerate(SITES):
        want |= source_draws(1, e, 0, [s])
    assert shapes(draw_plan(run)) == want


def test_subset_routes_over_all_sites(weights):
    # guards S25/S51: subset plan = all sites' sources + route_k and route_order of width n_sites
    run = run_with(weights, [{"type": "stochastic_recon_subset"}])
    assert shapes(draw_plan(run)) == source_draws(1, 0, 0, SITES) | route_draws(1, 0, 0, len(SITES))


def test_chunkwise_one_entry_per_chunk_last_shorter(weights):
    # guards S25: chunks of sites_per_chunk consecutive sites, each with routing of the chunk's
    # width; 6 sites in chunks of 4 -> widths 4 and 2
    run = run_with(weights, [{"type": "chunkwise_subset_recon", "sites_per_chunk": 4}])
    (t,) = run.recon_terms
    assert [e.live for e in t.entries] == [tuple(SITES[:4]), tuple(SITES[4:])]
    want = (source_draws(1, 0, 0, SITES[:4]) | route_draws(1, 0, 0, 4)
            | source_draws(1, 1, 0, SITES[4:]) | route_draws(1, 1, 0, 2))
    assert shapes(draw_plan(run)) == want


def test_ci_masked_and_unmasked_draw_no_sources(weights):
    # guards S26/S27/S8: constant sources (ci_masked = 0, unmasked = 1) need no random source; the
    # subset variant still routes; n_mask_samples does not multiply constant-source terms
    run = run_with(weights, [
        {"type": "ci_masked_recon"}, {"type": "ci_masked_recon_layerwise"},
        {"type": "ci_masked_recon_subset"}, {"type": "unmasked_recon"},
    ], n_mask_samples=3)
    assert shapes(draw_plan(run)) == route_draws(3, 0, 0, len(SITES))


def test_binomial_noise_per_site(weights):
    # guards S12/S50: binomial sampling adds one noise tensor per site [batch, C] (for ci_lower),
    # independent of the recon terms
    run = run_with(weights, [], sampling="binomial")
    assert shapes(draw_plan(run)) == {f"binomial.{s}": (B, C[s]) for s in SITES}
    run = run_with(weights, [{"type": "stochastic_recon"}], sampling="binomial")
    assert shapes(draw_plan(run)) == {f"binomial.{s}": (B, C[s]) for s in SITES} | source_draws(1, 0, 0, SITES)


def test_n_mask_samples_multiplies_draws(weights):
    # guards S27: n_mask_samples = number of forwards (draws) per entry of stochastic terms,
    # each with its own sources and routing
    run = run_with(weights, [{"type": "stochastic_recon"}, {"type": "stochastic_recon_subset"}],
                   n_mask_samples=3)
    want = {}
    for d in range(3):
        want |= source_draws(1, 0, d, SITES)
        want |= source_draws(2, 0, d, SITES) | route_draws(2, 0, d, len(SITES))
    assert shapes(draw_plan(run)) == want


def test_plan_uses_given_batch_shape(weights):
    # guards S50: the plan follows the batch shape it is asked for (eval batches, (B, T) inputs)
    run = run_with(weights, [{"type": "stochastic_recon_subset"}])
    for spec in draw_plan(run, (2, 7)):
        assert spec.shape[:2] == (2, 7)


# ------------------------------------------------------------------ harness sampling
def _specs():
    return [DrawSpec("t1.e0.d0.a.source", (50, 3)), DrawSpec("t1.e0.d1.a.source", (50, 3)),
            DrawSpec("t1.e0.d0.route_k", (50,)), DrawSpec("binomial.a", (50, 3))]


def test_sample_numpy_deterministic_per_seed_step_name():
    # guards S50: the harness's draw for a name depends only on (seed, step, name): not on
    # the plan's order or contents, and not on process state
    plan = _specs()
    a, b = sample_numpy(plan, 3, 9), sample_numpy(plan, 3, 9)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    sub = sample_numpy(list(reversed(plan[1:3])), 3, 9)
    assert all(np.array_equal(sub[k], a[k]) for k in sub)
    for k, v in a.items():
        assert v.dtype == np.float64 and v.min() >= 0 and v.max() < 1
        assert not np.array_equal(v, sample_numpy(plan, 3, 10)[k])  # another step
        assert not np.array_equal(v, sample_numpy(plan, 4, 9)[k])  # another seed


def test_sample_numpy_independent_across_names():
    # guards S53: draws are independent across names (e.g. draw 0 vs draw 1 of one site)
    n = 40_000
    names = ["t1.e0.d0.a.source", "t1.e0.d1.a.source", "t2.e0.d0.a.source", "t1.e0.d0.b.source"]
    xs = [numpy_rng(0, 0, nm).random(n) for nm in names]
    for x, y in itertools.combinations(xs, 2):
        assert abs(np.corrcoef(x, y)[0, 1]) < 0.03  # sigma ~ 0.005
    # and not shifted copies of one stream
    assert len({x[:4].tobytes() for x in xs}) == len(xs)
    assert not np.isin(xs[0][:100], xs[1]).any()


# ------------------------------------------------------------------ routing
# chi-square critical values at p = 1e-4 (fixed seed: deterministic, generous, meaningful)
CHI2_CRIT = {1: 15.137, 2: 18.421, 3: 21.108, 5: 25.745}


def chi2(counts: list[int]) -> float:
    n = sum(counts)
    e = n / len(counts)
    return sum((c - e) ** 2 / e for c in counts)


def routing_stats(route: np.ndarray, k: np.ndarray, n: int) -> dict:
    """{'k': chi2 of the k distribution, k: chi2 of the subsets given k} (each with its df)."""
    out: dict[str | int, tuple[float, int]] = {"k": (chi2([int((k == j).sum()) for j in range(1, n + 1)]), n - 1)}
    for j in range(1, n):
        rows = route[k == j]
        subsets = Counter(map(bytes, np.packbits(rows, axis=-1)))
        allowed = {bytes(np.packbits(np.isin(np.arange(n), c))) for c in itertools.combinations(range(n), j)}
        assert set(subsets) <= allowed
        out[j] = (chi2([subsets.get(s, 0) for s in sorted(allowed)]), len(allowed) - 1)
    return out


def passes(stats: dict) -> bool:
    return all(v <= CHI2_CRIT[df] for v, df in stats.values())


def test_routing_uniform_k_and_uniform_subsets():
    # guards S51 uniform_k: k ~ U{1..n}, then a uniform k-subset; every
    # routed mask has exactly k True
    n, N = 4, 200_000
    g = np.random.default_rng(12345)
    uk, uo = g.random(N), g.random((N, n))
    route = route_from_uniforms(uk, uo)
    assert route.shape == (N, n) and route.dtype == bool
    k = np.minimum(1 + np.floor(uk * n), n).astype(int)
    assert np.array_equal(route.sum(-1), k)
    assert route[k == n].all()
    stats = routing_stats(route, k, n)
    assert passes(stats), stats

    # the test is meaningful: plausible off-by-one / biased rules fail it
    k_bad = 1 + np.round(uk * (n - 1)).astype(int)  # k=1 and k=n get half mass
    assert not passes({"k": routing_stats(route_from_uniforms((k_bad - 0.5) / n, uo), k_bad, n)["k"]})
    first_k = np.arange(n)[None, :] < k[:, None]  # "first k sites": not a uniform subset
    assert not passes(routing_stats(first_k, k, n))
    skewed = route_from_uniforms(uk, uo * np.array([1.0, 1.0, 1.0, 0.9]))  # favours the last site
    assert not passes(routing_stats(skewed, k, n))


def test_routing_extra_axes_and_single_site():
    # guards S51: routing works on (B, T, n) and a single live site always routes
    g = np.random.default_rng(1)
    r = route_from_uniforms(g.random((3, 5)), g.random((3, 5, 6)))
    assert r.shape == (3, 5, 6)
    assert np.all(r.sum(-1) >= 1)
    assert route_from_uniforms(g.random(10), g.random((10, 1))).all()


def test_bernoulli_from_uniform():
    # guards S52/S12: Bernoulli(1/2) sources are u < 0.5, in the input's dtype
    u = np.array([0.0, 0.49, 0.5, 0.99], dtype=np.float32)
    b = bernoulli_from_uniform(u)
    assert b.dtype == np.float32 and b.tolist() == [1.0, 1.0, 0.0, 0.0]
