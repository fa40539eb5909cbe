"""Model FLOPs of one training step, counted analytically from the resolved run (S121).

`step_flops(run)` counts the matmul FLOPs (2·m·k·n per product; every elementwise op,
norm, softmax, lookup and reduction is left out) that the math of one production training
step needs, term by term:

- **clean forward** (S7): once per step; every module of the target frozen (`x·W`; an
  embedding lookup is 0); llama attention `q·kᵀ` and `p·v` over the full T×T scores
  (2·T·n_heads·head_dim each per position); ResidMLP's `x·W_E` and `r·W_Eᵀ`. No backward.
  Shared by every term and by the persistent-PGD warmup (which reads it detached).
- **CI function** (S13-S17): once per step on the clean site inputs; backward = dW of every
  layer plus dX of every layer after the first (the site inputs are detached); the `mlp`
  type also reads `x·V` per site (its first layer then needs dX too, and `x·V` its dV).
- **every masked forward of every term** (S20-S29): one forward per (term, plan entry,
  draw); a live linear site costs `x·V` + `(xV ⊙ m)·U`, plus `x·W` when it has a delta path
  (S4b form: `m_Δ·x·W`) or a route (S6: the frozen output of routed-out positions), a live
  embedding site `(V[t] ⊙ m)·U`; the other modules run frozen. The frozen products
  upstream of every live site of a forward (their input carries no gradient) are the clean
  forward's and are not counted again (XLA merges them with it: a per-site plan's forward
  of the last site costs little more than that site); a live site's products always count.
- **backward as 2× forward**, product by product: the backward of `A·B` is `dA` (one more
  product of the same size) when A needs a gradient plus `dB` when B does. So a product of
  a trained weight (V, U, a CI-function weight) with an activation that carries a gradient
  costs 2× its forward, the frozen `x·W` 1× (dX only, W is frozen), and a product before the
  first live site of a forward 0× (nothing upstream needs a gradient).
- **adversary ascents** (S80-S84): fresh PGD: per entry `n_steps` × (forward + backward to
  the sources only: dX, never dW) then the loss forward with the main backward; persistent
  PGD: `n_warmup` × (every site live, forward + backward to the sources) then the loss
  forward with the main backward, which yields the final ascent's source gradient as well
  (no further product).
- **faithfulness** (S21): `V·U` per site (d_in·C·d_out·2), backward 2× (dV and dU).
- importance minimality, KL/MSE, optimizer updates: elementwise, 0 here.

The count is of the math, not of an implementation: the oracle evaluates the delta path as
S4 (`x·(W − V·U)`, one more d_in·C·d_out product per live site per forward) and XLA counts
elementwise ops too, so `xla_flops / step_flops` is a little above 1 for the JAX step (the
ratio is checked on small configs in tests/test_flops.py). MFU = step_flops · steps/s /
peak, for both trainers alike.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from contract.config import FreshPGDTerm, PersistentPGDTerm
from contract.resolve import ResolvedRun, Site
from contract.targets import ModuleInfo, module_table


@dataclass
class Count:
    """FLOPs of one part of a step, forward and backward."""
    fwd: float = 0.0
    bwd: float = 0.0

    @property
    def total(self) -> float:
        return self.fwd + self.bwd

    def __iadd__(self, o: Count) -> Count:
        self.fwd += o.fwd
        self.bwd += o.bwd
        return self


@dataclass
class StepFlops:
    """`parts` maps a readable name (`clean forward`, `ci_fn`, `t2 stochastic_recon`, ...) to its Count."""
    parts: dict[str, Count] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(c.total for c in self.parts.values())

    def add(self, name: str, c: Count) -> None:
        self.parts.setdefault(name, Count())
        self.parts[name] += c


def _positions(run: ResolvedRun) -> tuple[int, int]:
    """(rows of the batch, sequence length): (B, T) for llama, (B, 1) otherwise."""
    bs = run.batch_shape
    return (bs[0], bs[1]) if len(bs) == 2 else (bs[0], 1)


def forward_flops(run: ResolvedRun, live: dict[str, tuple[bool, bool]], mode: str) -> Count:
    """FLOPs per position of one forward of the target. `live` maps a live site to
    (delta path, routed); `mode` is 'none' (no backward: the clean forward), 'train' (the
    gradient of V/U and, through the masks, of the CI function) or 'sources' (the gradient
    of the masks' sources only: an ascent)."""
    cfg = run.target_meta["config"]
    kind = run.cfg.target.kind
    mods = {m.name: m for m in module_table(kind, cfg)}
    sites = {s.name: s for s in run.sites}
    back = mode != "none"
    c = Count()

    def product(k: int, n: int, a_grad: bool, b_grad: bool, m: float = 1.0, frozen: bool = False) -> None:
        """m rows of [k] · [k, n]; the backward of each operand that needs a gradient. A frozen
        product of a masked forward whose input carries no gradient lies upstream of every
        live site: it is the clean forward's, counted there (module doc)."""
        if back and frozen and not (a_grad or b_grad):
            return
        f = 2.0 * m * k * n
        c.fwd += f
        if back:
            c.bwd += f * (int(a_grad) + int(b_grad))

    def module(name: str, x_grad: bool) -> bool:
        """One module on an input that does (not) carry a gradient; whether its output does."""
        info: ModuleInfo = mods[name]
        if name not in live:
            if info.kind == "linear":
                product(info.d_in, info.d_out, x_grad, False, frozen=True)
            return x_grad
        s: Site = sites[name]
        delta, routed = live[name]
        if info.kind == "linear":
            product(s.d_in, s.C, x_grad, mode == "train")  # x·V
        product(s.C, s.d_out, True, mode == "train")  # (xV ⊙ m)·U: the mask or V carries a gradient
        if info.kind == "linear" and (delta or routed):
            product(s.d_in, s.d_out, x_grad, False)  # x·W
        return True

    if kind == "tms":
        module("linear2", module("linear1", False))
    elif kind == "resid_mlp":
        f, e = cfg["n_features"], cfg["d_embed"]
        product(f, e, False, False, frozen=True)  # x·W_E
        g = False
        for i in range(cfg["n_layers"]):
            g = module(f"layers.{i}.mlp_out", module(f"layers.{i}.mlp_in", g)) or g
        product(e, f, g, False, frozen=True)  # r·W_Eᵀ
    elif kind == "llama":
        _, T = _positions(run)
        nh = cfg["num_attention_heads"]
        hd = cfg.get("head_dim") or cfg["hidden_size"] // nh
        g = module("model.embed_tokens", False)
        for i in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{i}"
            q, k, v = (module(f"{p}.self_attn.{n}_proj", g) for n in ("q", "k", "v"))
            product(hd, T, q, k, nh, frozen=True)  # scores: per position, nh heads of [hd]·[hd, T]
            product(T, hd, q or k, v, nh, frozen=True)  # probs·v
            g = module(f"{p}.self_attn.o_proj", q or k or v) or g
            gate, up = module(f"{p}.mlp.gate_proj", g), module(f"{p}.mlp.up_proj", g)
            g = module(f"{p}.mlp.down_proj", gate or up) or g
        module("lm_head", g)
    else:
        raise ValueError(f"target.kind: unknown target kind {kind!r}")
    return c


def ci_fn_flops(run: ResolvedRun) -> Count:
    """FLOPs per position of the CI function (and the `x·V` the `mlp` type reads), with its backward."""
    cf = run.cfg.ci_fn
    _, T = _positions(run)
    c = Count()

    def layers(dims: list[int], first_x_grad: bool, m: float = 1.0) -> None:
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            f = 2.0 * m * a * b
            c.fwd += f
            c.bwd += f * (1 + int(i > 0 or first_x_grad))  # dW always; dX past the first layer

    hid = list(cf.hidden)
    if cf.type == "mlp":
        for s in run.sites:
            if s.kind == "linear":
                c.fwd += 2.0 * s.d_in * s.C
                c.bwd += 2.0 * s.d_in * s.C  # dV (the site input is detached)
            layers([1, *hid, 1], True, s.C)
    elif cf.type == "vector_mlp":
        for s in run.sites:
            layers([s.d_in, *hid, 1], False, s.C)
    elif cf.type == "shared_mlp":
        for s in run.sites:
            layers([s.d_in, *hid, s.C], False)
    elif cf.type == "global_shared_mlp":
        layers([sum(s.d_in for s in run.sites), *hid, sum(s.C for s in run.sites)], False)
    elif cf.type == "global_shared_transformer":
        d = cf.d_model
        layers([sum(s.d_in for s in run.sites), d], False)  # in_proj
        for _ in range(cf.n_blocks):
            layers([d, d], True, 4)  # q, k, v, o
            f = 2.0 * 2 * T * d  # scores and probs·v over T keys, every head
            c.fwd += f
            c.bwd += 2 * f
            layers([d, cf.mlp_hidden, d], True)
        layers([d, sum(s.C for s in run.sites)], True)  # out_proj
    else:
        raise ValueError(f"ci_fn.type: unknown {cf.type!r}")
    return c


def step_flops(run: ResolvedRun) -> StepFlops:
    """The model FLOPs of one training step of `run` (its batch shape), part by part (module doc)."""
    cfg = run.cfg
    B, T = _positions(run)
    pos = B * T
    out = StepFlops()

    def scaled(c: Count, k: float) -> Count:
        return Count(c.fwd * k, c.bwd * k)

    out.add("clean forward", scaled(forward_flops(run, {}, "none"), pos))
    if any(t.type != "faithfulness" for t in cfg.loss_terms):
        out.add("ci_fn", scaled(ci_fn_flops(run), pos))
    for t in run.recon_terms:
        tc = cfg.loss_terms[t.index]
        name = f"t{t.index} {t.type}"
        delta = cfg.use_delta_component and t.source in ("stochastic", "fresh_pgd", "persistent_pgd")
        for e in t.entries:
            live = {n: (delta, e.routing == "uniform_k") for n in e.live}
            if isinstance(tc, FreshPGDTerm):
                out.add(f"{name} ascents", scaled(forward_flops(run, live, "sources"), pos * tc.n_steps))
            out.add(name, scaled(forward_flops(run, live, "train"), pos * e.n_draws))
        if isinstance(tc, PersistentPGDTerm) and tc.n_warmup:
            every = {s.name: (cfg.use_delta_component, False) for s in run.sites}
            out.add(f"{name} warmup", scaled(forward_flops(run, every, "sources"), pos * tc.n_warmup))
    if any(t.type == "faithfulness" for t in cfg.loss_terms):
        f = sum(2.0 * s.d_in * s.C * s.d_out for s in run.sites)
        out.add("faithfulness", Count(f, 2 * f))
    return out
