"""The parity case matrix. A case = a shipped config + overrides + precision + number of
steps. Step-0 cases (1 step) pin every term and every leaf gradient; trajectory cases run
>= 50 steps per target in both precisions. Shapes are cut down so the whole matrix runs
within the `pytest parity/` budget; every plan x source strategy, imp-min variant, delta
on/off, continuous/binomial, kl/mse and CI function type appears at least once."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import yaml

from contract.config import RunConfig, parse_config
from contract.init import init_state
from contract.resolve import ResolvedRun, resolve_run
from contract.targets import REPO_ROOT
from parity.runners import Inputs, make_inputs


@dataclass(frozen=True)
class Case:
    name: str
    config: str  # shipped config under configs/
    precision: str  # float64 | float32
    steps: int
    overrides: dict = field(default_factory=dict)
    why: str = ""
    init_edit: str = ""  # a key of INIT_EDITS: an exact edit of the initial state (S154), recorded in the golden

    def init(self, run: ResolvedRun | None = None) -> dict:
        """The case's initial state: contract/init.py's, then its INIT_EDITS entry."""
        run = self.run() if run is None else run
        st = init_state(run)
        return INIT_EDITS[self.init_edit](run, st) if self.init_edit else st

    def inputs(self, steps: int | None = None) -> Inputs:
        """The harness's inputs of the case (initial state, batches, draws) for `steps` steps."""
        run = self.run()
        return make_inputs(run, self.precision, self.steps if steps is None else steps, self.init(run))

    def config_dict(self) -> dict:
        d = yaml.safe_load((REPO_ROOT / "configs" / self.config).read_text())
        d = deep_merge(d, copy.deepcopy(self.overrides))
        d["steps"] = self.steps
        d["runtime"] = {"dtype": self.precision}
        return d

    def cfg(self) -> RunConfig:
        return parse_config(self.config_dict(), f"parity case {self.name}")

    def run(self) -> ResolvedRun:
        return resolve_run(self.cfg())


def deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


FAITH = {"type": "faithfulness", "coeff": 1.0}
IMP = {"type": "importance_minimality", "coeff": 3.0e-3, "pnorm": 1.5, "beta": 0.5, "eps": 1.0e-6}
ALL_PLAIN_RECON = [
    {"type": t, "coeff": c} for t, c in [
        ("stochastic_recon", 1.0), ("stochastic_recon_layerwise", 0.7), ("stochastic_recon_subset", 0.5),
        ("ci_masked_recon", 0.3), ("ci_masked_recon_layerwise", 0.2), ("ci_masked_recon_subset", 0.4),
        ("unmasked_recon", 0.1)]
]
# Everything a case depends on is pinned here, so retuning a shipped config never moves a golden.
PINNED = {"seed": 0, "sampling": "continuous", "use_delta_component": True, "n_mask_samples": 1,
          "optim": {"components": {"lr": {"start": 1.0e-3}}, "ci_fn": {"lr": {"start": 1.0e-3}}},
          "eval": {"every": 0}, "checkpoint": {"every": 0, "keep": 1}, "log_every": 1}
TMS_SMALL = PINNED | {"batch_size": 16, "sites": [{"pattern": "linear1", "C": 7}, {"pattern": "linear2", "C": 5}],
             "faithfulness_warmup": {"steps": 3, "lr": 1.0e-3}}
# S153: at seed 0 with the target's sparse features (p 0.05) the TMS output is identically zero
# after its final ReLU on a 16-row batch, so every recon term equals the constant mean(clean^2);
# seed 3 with p 0.5 makes every term of every TMS case depend on its masks and sources
# (parity/degeneracy.py checks it)
TMS_SMALL = TMS_SMALL | {"seed": 3, "data": {"feature_probability": 0.5}}
RESID_SMALL = PINNED | {"batch_size": 8, "faithfulness_warmup": {"steps": 2, "lr": 1.0e-3}}
LLAMA_SMALL = PINNED | {"batch_size": 2, "data": {"seq_len": 8}, "faithfulness_warmup": {"steps": 2, "lr": 1.0e-3},
               "sites": [{"pattern": "model.layers.0.mlp.*_proj", "C": 6},
                         {"pattern": "model.layers.1.self_attn.[qv]_proj", "C": 5}]}
TRAJ_OPTIM = {"optim": {
    "components": {"lr": {"start": 2.0e-3, "warmup_pct": 0.1, "kind": "cosine", "final_frac": 0.1},
                   "clip": 0.5, "weight_decay": 0.01},
    "ci_fn": {"lr": {"start": 3.0e-3, "warmup_pct": 0.0, "kind": "linear", "final_frac": 0.2},
              "clip": 1.0}}}
ANNEAL = {"type": "importance_minimality", "coeff": 1.0e-2, "pnorm": 2.0, "beta": 0.3, "eps": 1.0e-12,
          "p_anneal_start_frac": 0.2, "p_anneal_end_frac": 0.8, "p_anneal_final_p": 0.9}


def _pin_ci_ties(run: ResolvedRun, init: dict) -> dict:
    """S154: exact ties of both leaky-hard functions. For every site (per-component `mlp` CI
    function), component 0's CI logit is exactly 0 and component 1's exactly 1 at every
    position: that component's output-layer weights are 0 and its output bias 0 / 1, so
    z = 0 * h + b is b bit for bit. The gradient of those weights and biases then passes
    through the lower function's backward at z = 0 (alpha g where g < 0, else 0) and z = 1
    (g), and the upper function's at 0 and 1 (slope 1 at both ties), in both frameworks."""
    assert run.cfg.ci_fn.type == "mlp", "the ties edit pins per-component mlp CI functions"
    n = len(run.cfg.ci_fn.hidden)
    out = dict(init)
    for s in run.sites:
        w, b = out[f"ci_fn.{s.name}.w{n}"].copy(), out[f"ci_fn.{s.name}.b{n}"].copy()  # [C, h, 1], [C, 1]
        w[:2] = 0.0
        b[0], b[1] = 0.0, 1.0
        out[f"ci_fn.{s.name}.w{n}"], out[f"ci_fn.{s.name}.b{n}"] = w, b
    return out


INIT_EDITS = {"ci_ties": _pin_ci_ties}


def _cases() -> list[Case]:
    cs = [
        Case("tms_all_terms", "tms_5-2.yaml", "float64", 1,
             TMS_SMALL | {"n_mask_samples": 2, "ci_fn": {"type": "mlp", "hidden": [4]},
                          "loss_terms": [FAITH, IMP, *ALL_PLAIN_RECON[:3], *ALL_PLAIN_RECON[4:]]},
             "every plain recon plan x source but ci_masked_recon (resid2_chunks: on TMS it is a constant, S153), "
             "n_mask_samples 2, imp-min beta/eps/p, mlp CI"),
        Case("tms_binomial_nodelta", "tms_5-2.yaml", "float64", 1,
             TMS_SMALL | {"sampling": "binomial", "use_delta_component": False,
                          "ci_fn": {"type": "vector_mlp", "hidden": [4, 3]},
                          "loss_terms": [FAITH, IMP, ALL_PLAIN_RECON[0], ALL_PLAIN_RECON[2]]},
             "binomial sampling, no delta channel, vector_mlp with two hidden layers"),
        Case("tms_global_mlp", "tms_5-2.yaml", "float64", 1,
             TMS_SMALL | {"ci_fn": {"type": "global_shared_mlp", "hidden": [6]},
                          "loss_terms": [FAITH, IMP, ALL_PLAIN_RECON[0], ALL_PLAIN_RECON[1]]},
             "global_shared_mlp"),
        Case("tms_transformer", "tms_5-2.yaml", "float64", 1,
             TMS_SMALL | {"ci_fn": {"type": "global_shared_transformer", "d_model": 8, "n_heads": 2,
                                    "n_blocks": 2, "mlp_hidden": 12},
                          "loss_terms": [FAITH, IMP, ALL_PLAIN_RECON[0]]},
             "global_shared_transformer on inputs without a sequence axis"),
        Case("resid2_chunks", "resid_mlp1.yaml", "float64", 1,
             RESID_SMALL | {"target": {"kind": "resid_mlp", "weights": "contract/weights/resid_mlp2.safetensors"},
                            "sites": [{"pattern": "layers.*.mlp_in", "C": 9}, {"pattern": "layers.*.mlp_out", "C": 6}],
                            "ci_fn": {"type": "shared_mlp", "hidden": [5]},
                            "loss_terms": [FAITH, IMP, {"type": "chunkwise_subset_recon", "coeff": 1.0, "sites_per_chunk": 3},
                                           ALL_PLAIN_RECON[2], ALL_PLAIN_RECON[3]]},
             "chunks plan (4 sites in chunks of 3 and 1) on the 2-layer ResidMLP, shared_mlp, ci_masked_recon"),
        Case("llama_kl", "tiny_llama.yaml", "float64", 1,
             LLAMA_SMALL | {"ci_fn": {"type": "shared_mlp", "hidden": [8]},
                            "loss_terms": [FAITH, IMP, ALL_PLAIN_RECON[0], ALL_PLAIN_RECON[2], ALL_PLAIN_RECON[4]]},
             "KL output loss on the tiny Llama, GQA attention sites"),
        Case("llama_transformer", "tiny_llama.yaml", "float64", 1,
             LLAMA_SMALL | {"ci_fn": {"type": "global_shared_transformer", "d_model": 8, "n_heads": 4,
                                      "n_blocks": 1, "mlp_hidden": 8, "rope_base": 500.0, "rms_eps": 1.0e-5},
                            "loss_terms": [FAITH, IMP, ALL_PLAIN_RECON[0]]},
             "global_shared_transformer with RoPE over the sequence axis (rope_base, rms_eps not default)"),
        Case("llama_embed_head", "tiny_llama.yaml", "float64", 1,
             LLAMA_SMALL | {"sites": [{"pattern": "model.embed_tokens", "C": 6}, {"pattern": "lm_head", "C": 7}],
                            "ci_fn": {"type": "mlp", "hidden": [4]},
                            "loss_terms": [FAITH, IMP, ALL_PLAIN_RECON[0], ALL_PLAIN_RECON[1]]},
             "embedding site (row lookups of V and delta) and the LM head"),
        Case("tms_fresh_pgd", "tms_5-2.yaml", "float64", 1,
             TMS_SMALL | {"ci_fn": {"type": "mlp", "hidden": [4]},
                          "loss_terms": [FAITH, IMP,
                                         {"type": "pgd_recon", "coeff": 0.9, "init": "random", "scope": "bsc", "n_steps": 3, "step_size": 0.2},
                                         {"type": "pgd_recon_layerwise", "coeff": 0.5, "init": "zeroes", "scope": "c", "n_steps": 2, "step_size": 0.1},
                                         {"type": "pgd_recon_subset", "coeff": 0.7, "init": "random", "scope": "bc", "n_steps": 2, "step_size": 0.3}]},
             "fresh PGD: scopes bsc/c/bc, plans all/per_site/subset"),
        # init 'ones' WITH the delta channel starts at the exact clean output (D = 0 and
        # dD/dsrc = 0 in exact arithmetic), so its first sign step follows rounding noise and
        # is not comparable between frameworks (SPEC S80); 'ones' is pinned without delta.
        Case("tms_fresh_pgd_ones", "tms_5-2.yaml", "float64", 1,
             TMS_SMALL | {"use_delta_component": False, "ci_fn": {"type": "mlp", "hidden": [4]},
                          "loss_terms": [FAITH, IMP,
                                         {"type": "pgd_recon", "coeff": 1.0, "init": "ones", "scope": "c", "n_steps": 2, "step_size": 0.1},
                                         {"type": "pgd_recon_subset", "coeff": 0.5, "init": "ones", "scope": "bsc", "n_steps": 2, "step_size": 0.2},
                                         ALL_PLAIN_RECON[1]]},
             "fresh PGD init 'ones' (without delta channel); continuous sampling without delta"),
        Case("llama_fresh_pgd", "tiny_llama.yaml", "float64", 1,
             LLAMA_SMALL | {"ci_fn": {"type": "shared_mlp", "hidden": [8]},
                            "loss_terms": [FAITH, IMP,
                                           {"type": "pgd_recon", "coeff": 1.0, "init": "random", "scope": "bc", "n_steps": 2, "step_size": 0.1},
                                           {"type": "pgd_recon_subset", "coeff": 0.5, "init": "random", "scope": "c", "n_steps": 1, "step_size": 0.2}]},
             "fresh PGD with a sequence axis (scopes bc, c) and routing shared by ascents and loss"),
        Case("tms_ties", "tms_5-2.yaml", "float64", 1,
             TMS_SMALL | {"ci_fn": {"type": "mlp", "hidden": [4]},
                          "loss_terms": [FAITH, IMP, ALL_PLAIN_RECON[0], ALL_PLAIN_RECON[4]]},
             "S154: CI logits exactly 0 and 1 (components 0 / 1 of each site at every position): the lower and "
             "upper leaky-hard backwards at their ties, through masks and importance minimality", "ci_ties"),
    ]
    traj = {
        "tms": ("tms_5-2.yaml", TMS_SMALL | TRAJ_OPTIM | {"ci_fn": {"type": "mlp", "hidden": [4]},
                "loss_terms": [FAITH, ANNEAL, ALL_PLAIN_RECON[0], ALL_PLAIN_RECON[1]]}),
        "resid": ("resid_mlp1.yaml", RESID_SMALL | TRAJ_OPTIM | {
                  "sites": [{"pattern": "layers.*.mlp_in", "C": 12}, {"pattern": "layers.*.mlp_out", "C": 10}],
                  "loss_terms": [FAITH, ANNEAL, ALL_PLAIN_RECON[0], ALL_PLAIN_RECON[2]]}),
        "llama": ("tiny_llama.yaml", LLAMA_SMALL | TRAJ_OPTIM | {"ci_fn": {"type": "shared_mlp", "hidden": [8]},
                  "loss_terms": [FAITH, ANNEAL, ALL_PLAIN_RECON[0], ALL_PLAIN_RECON[2]]}),
    }
    traj["tms_ppgd"] = ("tms_5-2.yaml", TMS_SMALL | TRAJ_OPTIM | {"ci_fn": {"type": "mlp", "hidden": [4]},
        "loss_terms": [FAITH, ANNEAL, ALL_PLAIN_RECON[0],
                       {"type": "persistent_pgd_recon", "coeff": 0.5, "scope": "c", "n_warmup": 2,
                        "optimizer": {"type": "adam", "lr": {"start": 0.05, "kind": "cosine", "final_frac": 0.1}}},
                       {"type": "persistent_pgd_recon_subset", "coeff": 0.3, "scope": "nsc", "n_sources": 3, "n_warmup": 1,
                        "optimizer": {"type": "sign", "lr": {"start": 0.02}}},
                       {"type": "persistent_pgd_recon", "coeff": 0.2, "scope": "bsc", "bundle": "per_position",
                        "optimizer": {"type": "adam", "lr": {"start": 0.03}, "betas": [0.8, 0.99]}}]})
    # Per-position sources of a q_proj site are not used here: the first position's query sees
    # a single key under causal attention, so its source gradient is identically zero; torch
    # returns exact zeros, JAX a ~1e-20 roundoff residue, and sign / early-Adam ascents turn
    # that residue into +-lr moves of a coordinate that never reaches the loss (SPEC S84 note).
    traj["llama_ppgd"] = ("tiny_llama.yaml", LLAMA_SMALL | TRAJ_OPTIM | {"ci_fn": {"type": "shared_mlp", "hidden": [8]},
        "sites": [{"pattern": "model.layers.0.mlp.*_proj", "C": 6}, {"pattern": "model.layers.1.self_attn.[vo]_proj", "C": 5}],
        "loss_terms": [FAITH, ANNEAL, ALL_PLAIN_RECON[0],
                       {"type": "persistent_pgd_recon_subset", "coeff": 0.5, "scope": "sc", "n_warmup": 1,
                        "optimizer": {"type": "adam", "lr": {"start": 0.05}}},
                       {"type": "persistent_pgd_recon", "coeff": 0.4, "scope": "nsc", "n_sources": 3,
                        "optimizer": {"type": "sign", "lr": {"start": 0.01}}}]})
    for tgt, (conf, ov) in traj.items():
        for prec in ("float64", "float32"):
            cs.append(Case(f"traj_{tgt}.{prec[-2:]}", conf, prec, 50, ov,
                           "50-step trajectory: schedules with warmup, clip, weight decay, p annealing"))
    # S152: every number-changing field of the schema not at its default somewhere
    # (parity/test_case_coverage.py): AdamW betas / eps / weight decay of both groups and of
    # the warmup, both clips engaged (components' grad norm ~0.4, the CI function's ~2e-3),
    # binomial sampling with the delta channel, coefficients other than 1, chunks of one site,
    # a named persistent bundle with its own Adam betas / eps and an lr warmup
    cs.append(Case("traj_hparams.64", "tms_5-2.yaml", "float64", 8, TMS_SMALL | {
        "seed": 5, "sampling": "binomial", "use_delta_component": True, "n_mask_samples": 2,
        "ci_fn": {"type": "vector_mlp", "hidden": [5]},
        "faithfulness_warmup": {"steps": 2, "lr": 2.0e-3, "weight_decay": 0.05},
        "optim": {"components": {"lr": {"start": 2.0e-3, "warmup_pct": 0.25, "kind": "linear", "final_frac": 0.3},
                                 "betas": [0.8, 0.95], "eps": 1.0e-6, "weight_decay": 0.02, "clip": 0.05},
                  "ci_fn": {"lr": {"start": 4.0e-3, "kind": "cosine", "final_frac": 0.0},
                            "betas": [0.85, 0.98], "eps": 1.0e-7, "weight_decay": 0.03, "clip": 1.0e-3}},
        "loss_terms": [{"type": "faithfulness", "coeff": 0.8}, IMP,
                       {"type": "stochastic_recon", "coeff": 0.6},
                       {"type": "chunkwise_subset_recon", "coeff": 0.4, "sites_per_chunk": 1},
                       {"type": "persistent_pgd_recon", "coeff": 0.3, "scope": "c", "n_warmup": 1, "bundle": "adv",
                        "optimizer": {"type": "adam", "lr": {"start": 0.02, "warmup_pct": 0.25, "kind": "linear",
                                                             "final_frac": 0.5},
                                      "betas": [0.7, 0.9], "eps": 1.0e-6}}]},
        "8 steps with every optimizer hyperparameter off its default, both clips engaged, binomial x delta"))
    return cs


CASES: dict[str, Case] = {c.name: c for c in _cases()}
