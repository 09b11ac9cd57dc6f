"""Dense -> MoE recipes: how each chosen dense FFN becomes a sparse layer.

Shape legend: d model width, f dense FFN hidden width, E routed experts, k experts per token (top_k),
G shards of the FFN hidden dimension per expert (granular recipes), N = E / G copies of each shard,
s the router's weight multiplier (RouterConfig.scale). Expert weights are [E, d, f'] / [E, f', d] (moe.experts).

Recipes
  copy      Sparse upcycling (Komatsuzaki et al. 2023): every expert is the dense FFN.
  noise     copy, then independent Gaussian noise on each expert's weights, std = noise_std x the std of the
            dense matrix it perturbs (breaks the symmetry between experts; inexact by construction).
  granular  Virtual-group / granular upcycling (He et al. 2024, "Upcycling Large Language Models into Mixture of
            Experts"): the FFN hidden dimension is cut into G shards of f/G units; expert e = g*G + s holds shard s
            (g = 0..N-1 is its virtual group, a full copy of the FFN spread over G experts). The router rows of
            a virtual group are tied (equal), so a group's G experts always score the same and top-k with
            k a multiple of G selects whole groups.
  shared    A shared expert beside the routed ones (DeepSeekMoE / Qwen-MoE shape): the shared expert is the dense
            FFN with its down projection scaled by `shared_fraction` (a); the routed experts are the copy (G=1)
            or granular (G>1) recipe with their down projection scaled by (1 - a). With a shared gate
            (sigmoid(x . w), w zero-initialised, so 1/2 at step 0) the shared down projection is scaled by 2a.
  drop      Drop-Upcycling (Nakamura et al. 2025): copy, then in every expert a fraction `drop_ratio` (r) of the
            hidden neurons, chosen at random per expert, is re-initialised: their rows of W_up and W_gate and
            their columns of W_down are drawn from a normal with the mean and std of the original matrix.

The down-projection factor that preserves the output (derivation)
  Let y = Σ_{e chosen} w_e · expert_e(x), and let every chosen virtual group g carry the same router logit l_g on
  all its G members. A group's shards sum to the FFN: Σ_s W_down[:, shard s] h_s = FFN(x) - b_down.
  * topk_softmax (Mixtral: softmax over the k chosen logits) and softmax_topk with renormalize: the chosen
    weights sum to s. The G members of group g share the weight s·p_g/G with Σ_g p_g = 1, so
    y = Σ_g (s p_g / G) · (F·(FFN - b) + G·b_e) = (s F / G)(FFN - b) + s·b_e.
    Exact for any router logits with   F = G / s   and   b_e = b / s   (the bias factor is F / G).
    G = 1 (copy) gives F = 1/s: with the default scale 1, the experts are the FFN unchanged.
  * softmax_topk without renormalisation (GShard, Switch): the chosen weights are softmax probabilities over
    all E experts; they sum to a constant only when the router is zero (every probability 1/E). Then each
    chosen expert has weight s/E, k/G whole groups are chosen (with G = 1; ties make G > 1 unreliable), and
    y = (s k / (E G))·F·(FFN - b) + (s k / E)·b_e, so   F = E G / (k s)   and   b_e = (E / (k s))·b   (F / G).
    Exact only with router_init_std = 0 (and G = 1); with a random router the report shows the gap.
  Both are what `down_factor` returns; the bias factor is always F / G.

The router (router_init, router_init_std; upcycle.router_init)
  Router rows are drawn from N(0, 0.02^2): Sparse Upcycling (Komatsuzaki et al. 2023) trains a new, randomly
  initialised router, and its codebase (flaxformer's RouterWeights) draws the kernel from a normal with stddev
  2e-2. Given calibration tokens, the default router_init=mean_free then removes from each row its component
  along the layer's mean router input (keeping the row's norm): a released model's normed hidden states share a
  large token-independent component, which otherwise decides the ranking and leaves experts without tokens
  (upcycle.router_init has the numbers). Under the renormalised orders the output does not depend on the router
  at step 0 (identical experts, chosen weights summing to s), so any random router keeps the step-0 check exact.
  A zero router (router_init_std=0, on request only) gives every expert the same logit for every token: the tie
  rule (lowest index first) then sends every token to the same k experts in every sparse layer, the other E - k
  experts receive nothing and no gradient, and the load-balancing loss cannot tell the experts apart, so
  training only moves the chosen pair around. The only order that needs a zero router is softmax_topk without
  renormalisation (above).

Which layers: `layers`, in moe.config's syntax ("every:2" the default, "last:N", "all", or "1,3,5").
Router and k come from `router` (a RouterConfig; the app fills it from the routing config group).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch

from moe.config import ModelConfig, MoEConfig, DISPATCHERS
from moe.ffn import DenseFFN
from moe.layer import MoELayer
from moe.model import Transformer
from routing.config import RouterConfig
from upcycle.router_init import ROUTER_INIT_STD, ROUTER_INITS, draw_router_rows, router_input_means

RECIPES = ("copy", "noise", "granular", "shared", "drop")
EXACT_RECIPES = ("copy", "granular", "shared")  # output-preserving by construction (given a fitting router)


@dataclass
class UpcycleConfig:
    recipe: str = "copy"  # copy | noise | granular | shared | drop (see the module docstring)
    num_experts: int = 8  # routed experts per sparse layer (E); granular: a multiple of shards
    layers: str = "every:2"  # which FFN slots become sparse (moe.config syntax: every:K, last:N, all, "1,3")
    router: RouterConfig = field(default_factory=RouterConfig)  # router family, k, order, capacity, losses
    router_init_std: Optional[float] = None  # router weights ~ N(0, std); 0: a zero router (every token ties);
    #                                          None: ROUTER_INIT_STD (Komatsuzaki et al.'s 0.02)
    router_init: str = "mean_free"  # mean_free: the normal rows minus their component along the layer's mean
    #                                 router input on the calibration tokens (plain normal without them); normal
    shards: int = 1  # granular / shared: G shards of the FFN hidden dimension per expert (expert width f/G)
    shared_fraction: float = 0.5  # shared: the part a of the output the shared expert carries at step 0
    shared_gate: bool = False  # shared: a sigmoid gate on the shared expert (Qwen-MoE), zero-initialised
    drop_ratio: float = 0.5  # drop: fraction r of each expert's hidden neurons re-initialised
    noise_std: float = 0.01  # noise: std of the added noise, relative to each dense matrix's std
    dispatcher: str = "auto"  # moe.dispatcher of the result (auto: triton on CUDA, else sorted)
    seed: int = 0  # seeds router init, noise and the re-initialised neurons

    def __post_init__(self) -> None:
        if not isinstance(self.router, RouterConfig):
            from moe.config import config_from_dict

            self.router = config_from_dict(RouterConfig, self.router, "upcycle.router")
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe={self.recipe!r} is not a known recipe; choose one of {list(RECIPES)}")
        if self.num_experts < 1:
            raise ValueError(f"num_experts={self.num_experts} must be at least 1")
        if self.shards < 1:
            raise ValueError(f"shards={self.shards} must be at least 1")
        if self.shards > 1 and self.recipe not in ("granular", "shared"):
            raise ValueError(f"shards={self.shards} applies to recipe=granular or recipe=shared, not {self.recipe}")
        if self.recipe == "granular" and self.shards < 2:
            raise ValueError("recipe=granular needs shards >= 2 (one shard per expert is recipe=copy)")
        if self.router_init not in ROUTER_INITS:
            raise ValueError(f"router_init={self.router_init!r} is not a known router initialisation; choose one of "
                             f"{list(ROUTER_INITS)}")
        if self.router_init_std is not None and self.router_init_std < 0:
            raise ValueError(f"router_init_std={self.router_init_std} must be non-negative")
        if not 0.0 < self.shared_fraction < 1.0:
            raise ValueError(f"shared_fraction={self.shared_fraction} must be strictly between 0 and 1")
        if not 0.0 <= self.drop_ratio <= 1.0:
            raise ValueError(f"drop_ratio={self.drop_ratio} must be in [0, 1]")
        if self.noise_std < 0:
            raise ValueError(f"noise_std={self.noise_std} must be non-negative")
        if self.dispatcher not in DISPATCHERS:
            raise ValueError(f"dispatcher={self.dispatcher!r} must be one of {DISPATCHERS}")

    @property
    def router_std(self) -> float:
        return ROUTER_INIT_STD if self.router_init_std is None else self.router_init_std

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def down_factor(cfg: UpcycleConfig) -> float:
    """F, the multiplier on each routed expert's down-projection weight (the bias gets F / G); derivation above."""
    r, G, E = cfg.router, cfg.shards, cfg.num_experts
    if r.name == "topk" and r.order == "softmax_topk" and not r.renormalize:
        return E * G / (r.top_k * r.scale)
    return G / r.scale


def exactness(cfg: UpcycleConfig) -> tuple[bool, str]:
    """Whether the recipe preserves the dense model's output at step 0 (evaluation mode), and why (not)."""
    r = cfg.router
    if cfg.recipe not in EXACT_RECIPES:
        return False, f"recipe={cfg.recipe} changes the experts on purpose (inexact by construction)"
    if r.name != "topk":
        return False, f"router {r.name!r}: exactness is derived for the token-choice topk router only"
    cf = r.capacity_factor_at(training=False)
    if cf != 0:
        return False, f"capacity factor {cf} at evaluation: tokens may be dropped (exact needs dropless, 0)"
    if r.random_second:
        return False, "random_second drops second choices at random"
    if r.order == "softmax_topk" and not r.renormalize:
        if cfg.router_std != 0 or cfg.shards > 1:
            return False, ("softmax_topk without renormalisation: the chosen probabilities sum to a constant only "
                           "for a zero router with shards=1 (router_init_std=0, which sends every token to the same "
                           "experts)")
        return True, f"zero router, softmax_topk: every weight is 1/E, down projection scaled by E/k = {down_factor(cfg):g}"
    how = "topk_softmax" if r.order == "topk_softmax" else "renormalised softmax_topk"
    return True, f"{how}: chosen weights sum to {r.scale:g}, down projection scaled by {down_factor(cfg):g}"


def upcycled_config(dense: ModelConfig, cfg: UpcycleConfig) -> ModelConfig:
    """The MoE twin's model config, with a clear error when the recipe does not fit the dense model."""
    if dense.is_moe:
        raise ValueError(f"the source model is already sparse (moe.layers={dense.moe.layers!r}); upcycle a dense model")
    G, f = cfg.shards, dense.d_ff
    if G > f:
        raise ValueError(f"shards={G} is more than the FFN's {f} hidden units; use at most {f} shards")
    if f % G:
        raise ValueError(f"shards={G} does not divide the FFN hidden width d_ff={f}; pick a divisor of {f}")
    if G > 1:
        if cfg.num_experts % G:
            raise ValueError(f"num_experts={cfg.num_experts} must be a multiple of shards={G} (N = E / G copies of "
                             f"each shard)")
        if cfg.router.name != "topk" or cfg.router.top_k % G:
            raise ValueError(f"shards={G} needs the topk router with top_k a multiple of {G} (each token must take "
                             f"whole virtual groups); got routing {cfg.router.name} with top_k={cfg.router.top_k}")
        if cfg.router_std == 0:
            raise ValueError("shards > 1 needs router_init_std > 0: a zero router ties every expert, and top-k then "
                             "splits virtual groups")
    moe = MoEConfig(
        layers=cfg.layers, num_experts=cfg.num_experts, expert_hidden=f // G if G > 1 else None, glu=None,
        dispatcher=cfg.dispatcher, num_shared_experts=1 if cfg.recipe == "shared" else 0,
        shared_hidden=f if cfg.recipe == "shared" else None, shared_gate=cfg.shared_gate and cfg.recipe == "shared",
        router=dataclasses.replace(cfg.router),
    )
    if not moe.sparse_layers(dense.n_layer):
        raise ValueError(f"layers={cfg.layers!r} selects no layer of the {dense.n_layer}-layer model; nothing to upcycle")
    return dense.replace(moe=moe)


# ------------------------------------------------------------------------------------------------ filling


@torch.no_grad()
def _fill_routed(layer: MoELayer, ffn: DenseFFN, cfg: UpcycleConfig, scale: float, g: torch.Generator,
                 mean: Optional[torch.Tensor]) -> None:
    """Experts e = group * G + shard: shard s of the FFN hidden units, down weight x F x scale, bias x F/G x scale;
    router rows from upcycle.router_init (mean: the layer's [d] mean router input for mean_free, else None)."""
    ex, G, E = layer.experts, cfg.shards, cfg.num_experts
    f = ffn.up.weight.shape[0]
    w = f // G
    F = down_factor(cfg) * scale
    for e in range(E):
        sl = slice((e % G) * w, (e % G + 1) * w)
        ex.w_up[e].copy_(ffn.up.weight[sl].t())
        if ex.w_gate is not None:
            ex.w_gate[e].copy_(ffn.gate.weight[sl].t())
        ex.w_down[e].copy_(ffn.down.weight[:, sl].t() * F)
        if ex.b_up is not None:
            ex.b_up[e].copy_(ffn.up.bias[sl])
            ex.b_down[e].copy_(ffn.down.bias * (F / G))
            if ex.b_gate is not None:
                ex.b_gate[e].copy_(ffn.gate.bias[sl])
    gate = getattr(layer.router, "gate", None)
    if gate is not None:
        rows = draw_router_rows(E // G, gate.weight.shape[1], cfg.router_std, g, mean)  # [E / G, d]
        gate.weight.copy_(rows.repeat_interleave(G, dim=0))  # a virtual group's G experts share one row


@torch.no_grad()
def _fill_shared(layer: MoELayer, ffn: DenseFFN, cfg: UpcycleConfig) -> None:
    a = cfg.shared_fraction
    factor = 2 * a if layer.shared_gate is not None else a  # sigmoid(0) = 1/2 at step 0
    sh = layer.shared
    sh.up.weight.copy_(ffn.up.weight)
    if sh.gate is not None:
        sh.gate.weight.copy_(ffn.gate.weight)
    sh.down.weight.copy_(ffn.down.weight * factor)
    if sh.up.bias is not None:
        sh.up.bias.copy_(ffn.up.bias)
        sh.down.bias.copy_(ffn.down.bias * factor)
        if sh.gate is not None:
            sh.gate.bias.copy_(ffn.gate.bias)
    if layer.shared_gate is not None:
        layer.shared_gate.weight.zero_()


@torch.no_grad()
def _add_noise(layer: MoELayer, ffn: DenseFFN, cfg: UpcycleConfig, g: torch.Generator) -> None:
    ex = layer.experts
    for p, ref in ((ex.w_up, ffn.up.weight), (ex.w_gate, ffn.gate.weight if ffn.gate is not None else None),
                   (ex.w_down, ffn.down.weight)):
        if p is None:
            continue
        p.add_(torch.randn(p.shape, generator=g) * (cfg.noise_std * float(ref.float().std())))


@torch.no_grad()
def _drop_reinit(layer: MoELayer, ffn: DenseFFN, cfg: UpcycleConfig, g: torch.Generator) -> None:
    """Drop-Upcycling: per expert, a random r-fraction of hidden neurons re-drawn from N(mean, std) of the matrix."""
    ex = layer.experts
    f = ex.w_up.shape[-1]
    n = int(round(cfg.drop_ratio * f))
    if n == 0:
        return
    stats = {name: (float(ref.float().mean()), float(ref.float().std()))
             for name, ref in (("up", ffn.up.weight), ("gate", ffn.gate.weight if ffn.gate is not None else None),
                               ("down", ffn.down.weight)) if ref is not None}
    for e in range(ex.num_experts):
        idx = torch.randperm(f, generator=g)[:n]
        d = ex.w_up.shape[1]
        mu, sd = stats["up"]
        ex.w_up[e][:, idx] = torch.randn(d, n, generator=g) * sd + mu
        if ex.w_gate is not None:
            mu, sd = stats["gate"]
            ex.w_gate[e][:, idx] = torch.randn(d, n, generator=g) * sd + mu
        mu, sd = stats["down"]
        ex.w_down[e][idx, :] = torch.randn(n, d, generator=g) * sd + mu
        for b, ref in ((ex.b_up, ffn.up.bias), (ex.b_gate, ffn.gate.bias if ffn.gate is not None else None)):
            if b is not None and ref is not None:
                b[e][idx] = torch.randn(n, generator=g) * float(ref.float().std()) + float(ref.float().mean())


def upcycle(dense: Transformer, cfg: UpcycleConfig, calibration: Optional[torch.Tensor] = None) -> Transformer:
    """The MoE twin of `dense`: every non-FFN weight copied, each chosen FFN turned into a sparse layer by the
    recipe. The result is in eval mode (dropout and router jitter off), on the CPU, in fp32.

    calibration: token ids [B, S] (a sample of the text the model will route; experiments.upcycle passes the
    verification text) from which router_init=mean_free estimates each sparse layer's mean router input. Without
    it, or with router_init=normal or a zero router, the rows are plain N(0, std^2), the paper's init."""
    moe_cfg = upcycled_config(dense.cfg, cfg)
    means: dict[int, torch.Tensor] = {}
    if calibration is not None and cfg.router_init == "mean_free" and cfg.router_std > 0:
        means = router_input_means(dense, calibration, moe_cfg.sparse_layers)
    g = torch.Generator().manual_seed(cfg.seed)
    model = Transformer(moe_cfg)
    sparse = set(moe_cfg.sparse_layers)
    src = dense.state_dict()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            parts = name.split(".")
            if parts[0] == "blocks" and int(parts[1]) in sparse and parts[2] == "ffn":
                continue
            assert name in src, f"{name} has no counterpart in the dense model"
            t.copy_(src[name])
        for i in sorted(sparse):
            layer, ffn = model.blocks[i].ffn, dense.blocks[i].ffn
            assert isinstance(layer, MoELayer) and isinstance(ffn, DenseFFN)
            routed_scale = 1.0 - cfg.shared_fraction if cfg.recipe == "shared" else 1.0
            _fill_routed(layer, ffn, cfg, routed_scale, g, means.get(i))
            if cfg.recipe == "shared":
                _fill_shared(layer, ffn, cfg)
            elif cfg.recipe == "noise":
                _add_noise(layer, ffn, cfg, g)
            elif cfg.recipe == "drop":
                _drop_reinit(layer, ffn, cfg, g)
    return model.eval()
