"""The one run-config schema both backends read (YAML in, pydantic, extra="forbid").

Errors name the field path and the bad value: `parse_config` wraps pydantic's
ValidationError into `ConfigError` whose message lists `path.to.field: problem (got X)`.
Reading a YAML file (`load_config`, duplicate keys refused) is `contract/config_file.py`.
Cross-field rules that depend on the target (e.g. chunk size vs number of sites) are
checked in `contract.resolve.resolve_run`, which both backends call.

The schema is strict (SPEC S96): pydantic's strict mode (an int field takes an int, not a
bool, float or string; a bool field takes a bool; a float field takes a float or an int,
never a bool or a string), every float finite (`allow_inf_nan=False`), AdamW betas in
[0, 1), and the YAML reader (`contract/config_file.py::ConfigLoader`) refuses a key given
twice in one mapping.
"""
from __future__ import annotations

import hashlib
import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict as StrictMode, ValidationError, model_validator


class ConfigError(ValueError):
    """A config that cannot be run. The message names the field (path) and the value."""


class Strict(BaseModel):
    # S96: no unknown keys, no coercion (no bool-as-int, float-as-int, string-as-number or
    # int-as-bool; an int is still a valid float), no NaN or infinity in any float field
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


# An Adam(W) moment decay: in [0, 1) (1 would never forget, >1 or <0 diverges).
Beta = Annotated[float, StrictMode(), Field(ge=0, lt=1)]
# (beta1, beta2). The pair itself is lax so a YAML/JSON list is accepted (strict mode takes only
# a tuple); each item stays strict.
Betas = Annotated[tuple[Beta, Beta], Field(strict=False)]


# ---------------------------------------------------------------- target & data
class TargetConfig(Strict):
    kind: Literal["tms", "resid_mlp", "llama"]
    # safetensors file in Hugging Face layout; its hyper-parameters sit beside it in
    # `<stem>.json` (see contract/targets.py). Relative paths resolve against the repo root.
    weights: str


class DataConfig(Strict):
    # tms/resid_mlp: sparse features with the probability stored in the target's JSON
    # (override with feature_probability). llama: token windows of `seq_len`.
    feature_probability: float | None = Field(default=None, gt=0, le=1)
    seq_len: int | None = Field(default=None, gt=0)
    source: Literal["features", "corpus", "token_file"] = "features"
    token_file: str | None = None  # .npy (int) or raw uint16 .bin

    @model_validator(mode="after")
    def _check(self):
        if self.source == "token_file" and not self.token_file:
            raise ValueError("data.token_file is required when data.source is 'token_file'")
        return self


class SiteConfig(Strict):
    pattern: str = Field(min_length=1)  # fnmatch pattern over the target's module names
    C: int = Field(gt=0)


class CIFnConfig(Strict):
    type: Literal["mlp", "vector_mlp", "shared_mlp", "global_shared_mlp", "global_shared_transformer"]
    hidden: list[Annotated[int, Field(gt=0)]] = Field(default_factory=lambda: [16])
    # global_shared_transformer only
    d_model: int = Field(default=32, gt=0)
    n_blocks: int = Field(default=1, gt=0)
    n_heads: int = Field(default=2, gt=0)
    mlp_hidden: int = Field(default=64, gt=0)
    rope_base: float = Field(default=10000.0, gt=0)
    rms_eps: float = Field(default=1e-6, gt=0)

    @model_validator(mode="after")
    def _check(self):
        if self.type == "global_shared_transformer" and self.d_model % self.n_heads:
            raise ValueError(f"ci_fn.d_model ({self.d_model}) must be divisible by ci_fn.n_heads ({self.n_heads})")
        if self.type == "global_shared_transformer" and (self.d_model // self.n_heads) % 2:
            raise ValueError("ci_fn.d_model / ci_fn.n_heads must be even (rotate-half RoPE)")
        return self


# ---------------------------------------------------------------- schedules & optimizers
class Schedule(Strict):
    start: float = Field(ge=0)
    warmup_pct: float = Field(default=0.0, ge=0, le=1)
    final_frac: float = Field(default=1.0, ge=0)
    kind: Literal["constant", "linear", "cosine"] = "constant"


class OptimizerConfig(Strict):
    lr: Schedule
    betas: Betas = (0.9, 0.999)
    eps: float = Field(default=1e-8, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    clip: float | None = Field(default=None, gt=0)  # global-norm clip; None = no clip


class OptimConfig(Strict):
    components: OptimizerConfig
    ci_fn: OptimizerConfig


class FaithfulnessWarmup(Strict):
    steps: int = Field(default=0, ge=0)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)


# ---------------------------------------------------------------- loss terms
class Term(Strict):
    coeff: float


class Faithfulness(Term):
    type: Literal["faithfulness"]


class ImportanceMinimality(Term):
    type: Literal["importance_minimality"]
    pnorm: float = Field(default=1.0, gt=0)
    beta: float = Field(default=0.0, ge=0)
    eps: float = Field(default=1e-12, ge=0)
    p_anneal_start_frac: float = Field(default=1.0, ge=0, le=1)
    p_anneal_end_frac: float = Field(default=1.0, ge=0, le=1)
    p_anneal_final_p: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _check(self):
        if self.p_anneal_end_frac < self.p_anneal_start_frac:
            raise ValueError("p_anneal_end_frac must be >= p_anneal_start_frac")
        return self


class PlainReconTerm(Term):
    pass


class StochasticRecon(PlainReconTerm):
    type: Literal["stochastic_recon"]


class StochasticReconLayerwise(PlainReconTerm):
    type: Literal["stochastic_recon_layerwise"]


class StochasticReconSubset(PlainReconTerm):
    type: Literal["stochastic_recon_subset"]


class ChunkwiseSubsetRecon(PlainReconTerm):
    type: Literal["chunkwise_subset_recon"]
    sites_per_chunk: int = Field(gt=0)


class CIMaskedRecon(PlainReconTerm):
    type: Literal["ci_masked_recon"]


class CIMaskedReconLayerwise(PlainReconTerm):
    type: Literal["ci_masked_recon_layerwise"]


class CIMaskedReconSubset(PlainReconTerm):
    type: Literal["ci_masked_recon_subset"]


class UnmaskedRecon(PlainReconTerm):
    type: Literal["unmasked_recon"]


class FreshPGDTerm(Term):
    init: Literal["random", "ones", "zeroes"] = "random"
    step_size: float = Field(default=0.1, gt=0)
    n_steps: int = Field(default=1, gt=0)
    scope: Literal["c", "bc", "bsc"] = "bsc"


class PGDRecon(FreshPGDTerm):
    type: Literal["pgd_recon"]


class PGDReconLayerwise(FreshPGDTerm):
    type: Literal["pgd_recon_layerwise"]


class PGDReconSubset(FreshPGDTerm):
    type: Literal["pgd_recon_subset"]


class SourceOptimizer(Strict):
    type: Literal["adam", "sign"] = "adam"
    lr: Schedule = Schedule(start=0.01)
    betas: Betas = (0.9, 0.999)
    eps: float = Field(default=1e-8, gt=0)


class PersistentPGDTerm(Term):
    scope: Literal["c", "sc", "nsc", "bsc"] = "sc"
    n_sources: int | None = Field(default=None, gt=0)  # nsc only
    n_warmup: int = Field(default=0, ge=0)
    optimizer: SourceOptimizer = SourceOptimizer()
    bundle: str | None = None  # name of the source bundle; defaults to the term's index


class PersistentPGDRecon(PersistentPGDTerm):
    type: Literal["persistent_pgd_recon"]


class PersistentPGDReconSubset(PersistentPGDTerm):
    type: Literal["persistent_pgd_recon_subset"]


LossTerm = Annotated[
    Faithfulness | ImportanceMinimality | StochasticRecon | StochasticReconLayerwise
    | StochasticReconSubset | ChunkwiseSubsetRecon | CIMaskedRecon | CIMaskedReconLayerwise
    | CIMaskedReconSubset | UnmaskedRecon | PGDRecon | PGDReconLayerwise | PGDReconSubset
    | PersistentPGDRecon | PersistentPGDReconSubset,
    Field(discriminator="type"),
]

# type -> (plan, source strategy). Spec S25, S29.
RECON_TERMS: dict[str, tuple[str, str]] = {
    "stochastic_recon": ("all", "stochastic"),
    "stochastic_recon_layerwise": ("per_site", "stochastic"),
    "stochastic_recon_subset": ("subset", "stochastic"),
    "chunkwise_subset_recon": ("chunks", "stochastic"),
    "ci_masked_recon": ("all", "ci_masked"),
    "ci_masked_recon_layerwise": ("per_site", "ci_masked"),
    "ci_masked_recon_subset": ("subset", "ci_masked"),
    "unmasked_recon": ("all", "unmasked"),
    "pgd_recon": ("all", "fresh_pgd"),
    "pgd_recon_layerwise": ("per_site", "fresh_pgd"),
    "pgd_recon_subset": ("subset", "fresh_pgd"),
    "persistent_pgd_recon": ("all", "persistent_pgd"),
    "persistent_pgd_recon_subset": ("subset", "persistent_pgd"),
}


# ---------------------------------------------------------------- cadence & runtime
class EvalConfig(Strict):
    every: int = Field(default=0, ge=0)  # 0 = never
    batch_size: int = Field(default=256, gt=0)
    n_batches: int = Field(default=1, gt=0)
    # fresh-PGD probe (S88): n sign ascents of per-position sources on every site; 0 = off
    pgd_steps: int = Field(default=0, ge=0)
    pgd_step_size: float = Field(default=0.1, gt=0)


class CheckpointConfig(Strict):
    every: int = Field(default=0, ge=0)  # 0 = only at the end
    keep: int = Field(default=2, gt=0)


class MeshConfig(Strict):
    data: int = Field(default=1, gt=0)
    components: int = Field(default=1, gt=0)


class RuntimeConfig(Strict):
    dtype: Literal["float32", "float64", "bf16"] = "float32"
    mesh: MeshConfig = MeshConfig()
    # where a training step's draws come from (S50, S131): `device` — each backend samples the
    # plan itself (torch generator / jax.random; the two streams differ); `contract` — both
    # take them from the host-side plan `contract.draws.sample_numpy(draw_plan(run), seed, step)`,
    # as the parity harness feeds them, so a run continues on the other framework (parity/migrate.py)
    draws: Literal["device", "contract"] = "device"
    # S144: rematerialise the training step's masked forwards in the backward (jax.checkpoint
    # with this named policy; JAX only): less memory held between forward and backward, more
    # compute. `off` (default, left out of the config's dict and hash)
    remat: Literal["off", "nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable"] = "off"


class GuardConfig(Strict):
    # S106: what a training step with a non-finite loss or gradient norm does: `stop` the run
    # there (nothing past the last good checkpoint is saved) or `skip` its update and go on
    nonfinite: Literal["stop", "skip"] = "stop"


class RunConfig(Strict):
    # S96: below 2^62, so every seed the trainers derive (the eval stream is seed + 1) fits the
    # signed 64-bit integer a JAX key takes; the oracle refuses the same seeds
    seed: int = Field(default=0, ge=0, lt=2**62)
    target: TargetConfig
    data: DataConfig = DataConfig()
    sites: list[SiteConfig] = Field(min_length=1)
    ci_fn: CIFnConfig
    sigmoid: Literal["leaky_hard"] = "leaky_hard"
    sampling: Literal["continuous", "binomial"] = "continuous"
    use_delta_component: bool = True
    n_mask_samples: int = Field(default=1, gt=0)
    output_loss: Literal["kl", "mse"]
    loss_terms: list[LossTerm] = Field(min_length=1)
    optim: OptimConfig
    faithfulness_warmup: FaithfulnessWarmup = FaithfulnessWarmup()
    steps: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    eval: EvalConfig = EvalConfig()
    log_every: int = Field(default=1, gt=0)
    checkpoint: CheckpointConfig = CheckpointConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    guard: GuardConfig = GuardConfig()

    def to_dict(self) -> dict:
        d = self.model_dump(mode="json")
        if self.guard == GuardConfig():  # S106: the default guard is left out, so every config, hash and
            del d["guard"]  # checkpoint written before the field existed stays the same
        if self.runtime.draws == "device":  # S131: likewise the default draws
            del d["runtime"]["draws"]
        if self.runtime.remat == "off":  # S144: likewise the default memory option
            del d["runtime"]["remat"]
        return d

    def hash(self) -> str:
        return config_hash(self.to_dict())


def config_hash(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _field_path(loc: tuple, data) -> str:
    """The config's own dotted path for a pydantic `loc`. pydantic inserts the tag of a
    discriminated union into `loc` (`loss_terms.1.stochastic_recon.coeff`); that segment
    is not a key of the config, so it is dropped (-> `loss_terms.1.coeff`)."""
    parts, cur = [], data
    for p in loc:
        if isinstance(cur, dict) and isinstance(p, str) and p not in cur and cur.get("type") == p:
            continue
        parts.append(str(p))
        if isinstance(cur, dict):
            cur = cur.get(p)
        elif isinstance(cur, list) and isinstance(p, int) and 0 <= p < len(cur):
            cur = cur[p]
        else:
            cur = None
    return ".".join(parts)


def _format_errors(err: ValidationError, where: str, data=None) -> str:
    lines = []
    for e in err.errors():
        loc = _field_path(e["loc"], data)
        got = e.get("input")
        got_s = repr(got)
        if len(got_s) > 80:
            got_s = got_s[:77] + "..."
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        lines.append(f"  {loc or '<root>'}: {msg} (got {got_s})")
    return f"invalid config {where}:\n" + "\n".join(lines)


def parse_config(d: dict, where: str = "<dict>") -> RunConfig:
    try:
        return RunConfig.model_validate(d)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, where, d)) from None


def config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Readable field-by-field difference of two resolved config dicts."""
    out = []
    for k in sorted(set(a) | set(b)):
        p = f"{prefix}{k}"
        if k not in a:
            out.append(f"  {p}: <absent> -> {b[k]!r}")
        elif k not in b:
            out.append(f"  {p}: {a[k]!r} -> <absent>")
        elif isinstance(a[k], dict) and isinstance(b[k], dict):
            out += config_diff(a[k], b[k], p + ".")
        elif isinstance(a[k], list) and isinstance(b[k], list) and len(a[k]) == len(b[k]):
            # same length (e.g. loss_terms, sites): diff element by element -> `loss_terms.1.coeff`
            out += config_diff(dict(enumerate(a[k])), dict(enumerate(b[k])), p + ".")
        elif a[k] != b[k]:
            out.append(f"  {p}: {a[k]!r} -> {b[k]!r}")
    return out
