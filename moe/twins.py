"""Dense and sparse twins: models that differ only in their FFN slots and match in compute or in parameters.

Given a dense base (any ModelConfig; its FFN slots are all made dense), a twin is named by a string:

  dense               the base itself, every FFN slot dense
  moe_e{E}_k{k}       E experts per sparse slot, each token routed to k of them, with the same training FLOPs
                      per token as `dense` (moe.flops.flops_per_token(...).training, the router's 2*d*E per
                      sparse layer included) to within 1%
  moe_e{E}_k{k}_s{s}  the same plus s shared experts that every token passes through (DeepSeekMoE's fine-grained
                      segmentation: many narrow routed experts, k of them chosen, beside s always-active ones of
                      the same width); the FLOP match then counts k + s experts per token
  dense_wide_e{E}_k{k} a dense model with the total parameters of moe_e{E}_k{k} (every d_ff widened alike):
                      the comparison at equal parameters, which costs more FLOPs per token

How the FLOPs are matched (the choice this module documents): the expert width shrinks, nothing else changes.
Per sparse layer, k experts of width f_e plus a router must cost what one dense FFN of width d_ff costs:

    (k + s) * P * 2*d*f_e  +  2*d*E  =  P * 2*d*d_ff        (P = 3 projections with GLU, 2 without; s shared)
    f_e = (P*d_ff - E) / (P*(k + s))                         rounded to the nearest integer (or multiple_of)

So top-1 twins keep (almost) the dense width, top-2 twins halve it, and the router's FLOPs are paid for by
shaving E/P columns off the experts (for the tiny base, d_ff=384 and E=8 top-1 gives f_e=381; moe_e64_k8_s1
gives f_e=40, nine experts of width 40 per token). The solve uses
flops_per_token itself (FLOPs are affine in f_e), so shared experts or other FFN variants are matched too;
the result is checked and a twin that cannot be matched within `tolerance` is refused with ValueError.

Which router a twin uses (twin_router, by `routers`; docs/routing_defaults.md has the measurements behind it):
- routers="auto" (the default) and the base's router is the library default (RouterConfig(), e.g. tiny_dense, whose dense FFNs never route, and
  tiny_moe): the twin gets TWIN_ROUTERS' choice for its k. Top-1 twins route with BASE layers (a balanced
  assignment in training) evaluated with the learnt prices (routing=balanced_topk): at the demo's learning rate the tiny model's FFN inputs become nearly
  the same vector for every token for tens of steps (the unigram phase; cosine ~1 after the norm), no learned
  softmax router can split identical inputs, and the balancing loss then only moves all tokens from one expert
  to the next: moe_e8_k1 had 6-7 of 8 experts dead per layer at steps 30-50, moe_e64_k1 63 of 64 at step 40. Wider twins keep top-k
  routing with a balancing coefficient of TWIN_AUX_LOSS_COEF instead of 0.01.
- any other router (routing=switch, model.moe.router.aux_loss_coef=..., ...) is the user's choice and is
  kept, with k set; top-1 then gates with the chosen expert's softmax probability (order=softmax_topk, the
  Switch Transformer's), since under topk_softmax one chosen logit always gets weight 1 and the router would
  learn only from the balancing loss. routing=topk equals the default: routers="keep" (the app's
  twin_router=keep) trains a twin with the base's router as it is, routers="balanced" always with TWIN_ROUTERS.

Which slots are sparse: `layers` ("all" by default; "every:2" for GShard/GLaM-style interleaving). Everything
else (attention, embeddings, norms, the MoE options but the router's as above) is the base's. Library code: no Hydra,
no wandb; experiments.config resolves `twin=NAME` through `build_twin`, and `python -m experiments.twins OVERRIDES`
prints the table of a composed config's twins.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from moe.config import ModelConfig
from moe.flops import count_params, flops_per_token
from routing.config import RouterConfig

TOLERANCE = 0.01  # relative mismatch allowed between a twin's training FLOPs (or total parameters) and its target
_NAME = re.compile(r"^(?:(dense)|(moe|dense_wide)_e(\d+)_k(\d+)(?:_s(\d+))?)$")
DEFAULT_EXPERTS = (4, 8, 16, 32, 64)
DEFAULT_TOP_K = (1, 2)
TWIN_AUX_LOSS_COEF = 0.1  # balancing coefficient of top-k >= 2 twins of the default router (the demo's moe_e64_k2
# ends at max/mean load 1.41-1.58 and val loss 1.754 with it, 1.86-2.78 and 1.804 with the default 0.01)
# The routers of twins whose base has the library-default router, by k (1, or 2 for every k >= 2):
# BASE layers' balanced assignment for top-1, evaluated with the learnt prices as a bias (routing=balanced_topk:
# no balancing loss, no z-loss; 0.05 and 0.12 nats better than plain BASE, whose greedy evaluation routes
# differently from its training, for the demo's moe_e8_k1 and moe_e64_k1), top-k with a stronger balancing loss
# otherwise. (routing=balanced_topk balances top-2 exactly, at equal demo loss at E = 64 and 0.013 behind at
# E = 256, where aux 0.1 leaves ~100 of 256 experts empty at step 100; not the default yet, see
# docs/routing_defaults.md "Capacity slack and the full E = 256 run".)
TWIN_ROUTERS = {
    1: lambda k: RouterConfig(name="balanced_topk", top_k=1, aux_loss_coef=0.0, z_loss_coef=0.0),
    2: lambda k: RouterConfig(top_k=k, aux_loss_coef=TWIN_AUX_LOSS_COEF),
}
# DeepSeekMoE-style (E routed, k chosen, s shared): each token reaches k + s experts of width ~d_ff / (k + s)
DEFAULT_FINE_GRAINED = ((16, 2, 1), (64, 8, 1))


@dataclass(frozen=True)
class TwinSpec:
    kind: str  # "dense", "moe" or "dense_wide"
    num_experts: int = 0  # E of the MoE twin (of the MoE whose total parameters a dense_wide twin matches)
    top_k: int = 0  # k of that MoE twin
    shared: int = 0  # s: shared (always-active) experts per sparse slot of that MoE twin

    @property
    def name(self) -> str:
        if self.kind == "dense":
            return "dense"
        return f"{self.kind}_e{self.num_experts}_k{self.top_k}" + (f"_s{self.shared}" if self.shared else "")


def parse_twin(name: str) -> TwinSpec:
    """'dense' | 'moe_e{E}_k{k}[_s{s}]' | 'dense_wide_e{E}_k{k}[_s{s}]' as a TwinSpec; else a ValueError."""
    m = _NAME.match(str(name).strip())
    if not m:
        raise ValueError(
            f"twin={name!r} is not a twin name; use dense, moe_e{{E}}_k{{k}} (e.g. moe_e8_k1), "
            f"moe_e{{E}}_k{{k}}_s{{s}} (s shared experts beside the E routed, e.g. moe_e64_k8_s1) or "
            f"dense_wide_e{{E}}_k{{k}} (a dense model with the parameters of that MoE twin)"
        )
    if m.group(1):
        return TwinSpec("dense")
    e, k, s = int(m.group(3)), int(m.group(4)), int(m.group(5) or 0)
    if e < 1 or not 1 <= k <= e:
        raise ValueError(f"twin={name!r}: need at least 1 expert and 1 <= k <= E (got E={e}, k={k})")
    if m.group(5) is not None and s < 1:
        raise ValueError(f"twin={name!r}: _s{{s}} needs at least 1 shared expert; drop _s0")
    return TwinSpec(m.group(2), e, k, s)


def twin_names(experts: Iterable[int] = DEFAULT_EXPERTS, top_k: Iterable[int] = DEFAULT_TOP_K,
               wide: Iterable[tuple[int, int]] = ((8, 1),),
               fine_grained: Iterable[tuple[int, int, int]] = DEFAULT_FINE_GRAINED) -> list[str]:
    """The names of a sweep: dense, every moe_e{E}_k{k}, the shared-expert twins moe_e{E}_k{k}_s{s} of
    `fine_grained`, and the dense_wide twins of the (E, k) in `wide`."""
    names = ["dense"] + [f"moe_e{e}_k{k}" for k in top_k for e in experts if k <= e]
    names += [f"moe_e{e}_k{k}_s{s}" for e, k, s in fine_grained]
    return names + [f"dense_wide_e{e}_k{k}" for e, k in wide]


def dense_base(base: ModelConfig) -> ModelConfig:
    """The base with every FFN slot dense (its MoE options are kept for the twins that route)."""
    return base.replace(moe=dataclasses.replace(base.moe, layers="none"))


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def _solve_affine(f, target: float, lo: int = 64, hi: int = 128) -> float:
    """x with f(x) = target for an affine f, from two evaluations."""
    f_lo, f_hi = f(lo), f(hi)
    return lo + (target - f_lo) * (hi - lo) / (f_hi - f_lo)


def _round(x: float, multiple_of: int) -> int:
    return max(multiple_of, int(round(x / multiple_of)) * multiple_of)


ROUTER_CHOICES = ("auto", "balanced", "keep")  # how a twin's router is chosen (see the module docstring)


def twin_router(router: RouterConfig, top_k: int, routers: str = "auto") -> RouterConfig:
    """The router of a top-k twin whose base has `router` (see the module docstring)."""
    if routers not in ROUTER_CHOICES:
        raise ValueError(f"routers={routers!r} must be one of {list(ROUTER_CHOICES)}")
    if routers == "balanced" or (routers == "auto" and router == RouterConfig()):
        return TWIN_ROUTERS[min(top_k, 2)](top_k)
    router = dataclasses.replace(router, top_k=top_k)
    if top_k == 1 and router.order == "topk_softmax":
        # A softmax over one chosen logit is 1: the router would get no gradient from the LM loss (it learnt
        # nothing in the demo's first try). Top-1 twins gate with the chosen expert's probability, as Switch does.
        router = dataclasses.replace(router, order="softmax_topk")
    return router


def moe_twin(base: ModelConfig, num_experts: int, top_k: int, *, shared: Optional[int] = None, layers: str = "all",
             seq_len: Optional[int] = None, multiple_of: int = 1, tolerance: float = TOLERANCE,
             routers: str = "auto") -> ModelConfig:
    """An MoE with E=num_experts routed experts, top-k routing, and the training FLOPs per token of the dense
    base to within `tolerance` (router included): the expert width is solved for, see the module docstring.
    shared: that many shared experts of the routed experts' width (None: the base's shared-expert settings)."""
    dense = dense_base(base)
    if str(layers).strip() == "none":
        raise ValueError("an MoE twin needs sparse layers; use layers=all, every:K, last:N or a list")
    moe = dataclasses.replace(base.moe, layers=layers, num_experts=num_experts,
                              router=twin_router(base.moe.router, top_k, routers))
    if shared is not None:  # fine-grained segmentation: the shared experts are as narrow as the routed ones
        moe = dataclasses.replace(moe, num_shared_experts=shared, shared_hidden=None)
    if not moe.sparse_layers(base.n_layer):
        raise ValueError(f"layers={layers!r} makes no FFN slot of a {base.n_layer}-layer model sparse")
    target = flops_per_token(dense, seq_len).training

    def flops(f_e: float) -> int:
        return flops_per_token(base.replace(moe=dataclasses.replace(moe, expert_hidden=int(f_e))), seq_len).training

    f_e = _round(_solve_affine(flops, target), multiple_of)
    twin = base.replace(moe=dataclasses.replace(moe, expert_hidden=f_e))  # validates (router vs E, ...)
    got = flops_per_token(twin, seq_len).training
    if _rel(got, target) > tolerance:
        raise ValueError(
            f"{TwinSpec('moe', num_experts, top_k, shared or 0).name}: no expert width matches the dense base's {target:.4g} training FLOPs per "
            f"token within {tolerance:.0%} (best {f_e} gives {got:.4g}); the router alone costs 2*d*E per layer, so "
            f"use fewer experts, a wider base (model.d_ff) or multiple_of=1"
        )
    return twin


def dense_wide_twin(base: ModelConfig, num_experts: int, top_k: int, *, shared: Optional[int] = None,
                    layers: str = "all", seq_len: Optional[int] = None, multiple_of: int = 1,
                    tolerance: float = TOLERANCE, routers: str = "auto") -> ModelConfig:
    """A dense model whose every FFN is widened so that its total parameters equal moe_twin(...)'s."""
    moe = moe_twin(base, num_experts, top_k, shared=shared, layers=layers, seq_len=seq_len, routers=routers)
    target = count_params(moe).total
    dense = dense_base(base)

    def params(d_ff: float) -> int:
        return count_params(dense.replace(d_ff=int(d_ff))).total

    d_ff = _round(_solve_affine(params, target), multiple_of)
    wide = dense.replace(d_ff=d_ff)
    got = count_params(wide).total
    if _rel(got, target) > tolerance:
        raise ValueError(f"{TwinSpec('dense_wide', num_experts, top_k, shared or 0).name}: d_ff={d_ff} gives {got:,} parameters, not "
                         f"{target:,} within {tolerance:.0%}")
    return wide


def build_twin(base: ModelConfig, name: str, *, layers: Optional[str] = None, seq_len: Optional[int] = None,
               multiple_of: int = 1, routers: str = "auto") -> ModelConfig:
    """The twin `name` of `base` (see the module docstring). layers=None: the base's model.moe.layers when it
    names sparse slots, else "all"; so `model=tiny_moe twin=dense` is tiny_moe with dense FFNs."""
    spec = parse_twin(name)
    if layers is None:
        layers = base.moe.layers if base.is_moe else "all"
    if spec.kind == "dense":
        return dense_base(base)
    build = moe_twin if spec.kind == "moe" else dense_wide_twin
    return build(base, spec.num_experts, spec.top_k, shared=spec.shared or None, layers=layers, seq_len=seq_len,
                 multiple_of=multiple_of, routers=routers)


def describe_twin(cfg: ModelConfig, seq_len: Optional[int] = None) -> dict[str, Any]:
    """Plain numbers for a table: sizes and training FLOPs per token of one model."""
    p, f = count_params(cfg), flops_per_token(cfg, seq_len)
    return {"experts": cfg.moe.num_experts if cfg.is_moe else 0, "top_k": cfg.moe.router.top_k if cfg.is_moe else 0,
            "shared": cfg.moe.num_shared_experts if cfg.is_moe else 0, "d_ff": cfg.d_ff, "expert_hidden": cfg.expert_hidden if cfg.is_moe else None,
            "params_total": p.total, "params_active": p.active, "training_flops_per_token": f.training,
            "router_flops_per_token": f.router}


def twin_table(base: ModelConfig, names: Iterable[str], seq_len: Optional[int] = None, **kwargs: Any) -> list[dict]:
    """One row per twin name: describe_twin of build_twin(base, name), with the FLOPs relative to dense."""
    ref = flops_per_token(dense_base(base), seq_len).training
    rows = []
    for name in names:
        row = {"twin": name, **describe_twin(build_twin(base, name, seq_len=seq_len, **kwargs), seq_len)}
        row["flops_vs_dense"] = row["training_flops_per_token"] / ref
        rows.append(row)
    return rows
