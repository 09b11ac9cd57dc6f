"""Router configuration: one typed dataclass shared by every router family."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

ORDERS = ("topk_softmax", "softmax_topk")
DROP_POLICIES = ("probs", "position")
BALANCE_LOSSES = ("all_choices", "first_choice")  # see RouterConfig.balance_loss and routing.losses
EC_MODES = ("per_position", "batch")
BASE_SOLVERS = ("auction", "sinkhorn")
SCORE_FNS = ("sigmoid", "softmax")
# A capacity factor cf gives the E experts cf * T * k slots together, so at most cf * k of the T tokens reach any
# expert. Below this many slots per token most tokens must skip the layer however well the router balances.
MIN_SLOTS_PER_TOKEN = 0.5
USES_CAPACITY = ("topk", "expert_choice", "sinkhorn", "bias_balanced")  # base and hash ignore the capacity settings


def check_finite(cfg: Any, where: str) -> None:
    """Refuses nan and inf in every float field of the config dataclass cfg, naming it as `where.field`.

    Comparisons with nan are all false, so a range check such as `x <= 0` lets nan through to the first forward
    or optimizer step; each config with float fields runs this before its range checks. No float field of these
    configs means anything when infinite."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{where}.{f.name}={value} must be a finite number")


@dataclass
class RouterConfig:
    name: str = "topk"  # router family, a key of routing.registry.ROUTERS
    top_k: int = 2  # experts each token is sent to (k)
    # "topk_softmax": top-k of the logits, softmax over the chosen k (Mixtral);
    # "softmax_topk": softmax over all E experts, then top-k (GShard, Switch, DeepSeek)
    order: str = "topk_softmax"
    renormalize: bool = False  # softmax_topk only: rescale the k chosen probabilities to sum to 1
    scale: float = 1.0  # multiplier on the combine weights (DeepSeek's routed scaling factor)
    # Tutel's sign convention: > 0 a fixed capacity ceil(cf * T * k / E) per expert; 0 dropless;
    # < 0 dropless but capped at ceil(|cf| * T * k / E)
    capacity_factor: float = 0.0
    eval_capacity_factor: Optional[float] = None  # capacity factor at evaluation; None: same as training
    min_capacity: int = 4  # lower bound on a fixed or capped capacity (small batches would otherwise drop most tokens)
    drop_policy: str = "probs"  # which assignments overflow first: lowest router weight ("probs") or latest ("position")
    # a token that loses some of its k choices to capacity: False keeps the surviving weights as they were before
    # the drop (a kept first choice of a top-2 token keeps e.g. 0.88); True rescales them to carry the token's
    # whole pre-drop weight (1.0 there), DeepSpeed's top2gating, which renormalises the gates after dropping
    renormalize_after_drop: bool = False
    aux_loss_coef: float = 0.01  # load-balancing loss coefficient (alpha), on the convention of balance_loss
    # which assignments the load-balancing loss E * sum_i f_i * P_i counts in f_i (routing.losses):
    # "all_choices": all T*k choices (Switch for k = 1; for k > 1 transformers' load_balancing_loss_func is exactly
    # k times this, so its coefficient is ours / k); "first_choice": only the T first choices (GShard, DeepSpeed's
    # top2gating l_aux). The two agree for k = 1.
    balance_loss: str = "all_choices"
    z_loss_coef: float = 0.001  # ST-MoE router z-loss coefficient
    jitter: float = 0.0  # Switch multiplicative noise: router input scaled by U(1-eps, 1+eps) in training
    # --- family-specific settings (each ignored by the other families)
    random_second: bool = False  # topk with k=2: keep the second expert with probability min(1, 2*g2) (GShard)
    ec_mode: str = "per_position"  # expert_choice: "per_position" (decoder-safe) or "batch" (sees the future)
    hash_seed: int = 0  # hash: seed of the fixed token-id -> expert table
    base_solver: str = "auction"  # base: "auction" (exact balanced assignment) or "sinkhorn" (approximate)
    sinkhorn_iters: int = 20  # base (sinkhorn solver) and sinkhorn: normalisation iterations
    bias_update_rate: float = 1e-3  # bias_balanced: step of the per-expert bias after each optimizer step (u)
    score_fn: str = "sigmoid"  # bias_balanced: expert scores, "sigmoid" (DeepSeek-V3) or "softmax" (DeepSeek-V2);
    # base/balanced_topk: gate of each chosen expert, "sigmoid" of its logit or "softmax" over the k chosen logits

    def __post_init__(self) -> None:
        from routing.registry import ROUTERS  # late import: the registry imports this module

        check_finite(self, "model.moe.router")
        if self.name not in ROUTERS:
            raise ValueError(f"model.moe.router.name={self.name!r} is not a known router; choose one of {sorted(ROUTERS)}")
        if self.top_k < 1:
            raise ValueError(f"model.moe.router.top_k={self.top_k} must be at least 1")
        if self.order not in ORDERS:
            raise ValueError(f"model.moe.router.order={self.order!r} must be one of {ORDERS}")
        if self.drop_policy not in DROP_POLICIES:
            raise ValueError(f"model.moe.router.drop_policy={self.drop_policy!r} must be one of {DROP_POLICIES}")
        if self.balance_loss not in BALANCE_LOSSES:
            raise ValueError(f"model.moe.router.balance_loss={self.balance_loss!r} must be one of {BALANCE_LOSSES}")
        if self.min_capacity < 0:
            raise ValueError(f"model.moe.router.min_capacity={self.min_capacity} must be non-negative")
        if self.ec_mode not in EC_MODES:
            raise ValueError(f"model.moe.router.ec_mode={self.ec_mode!r} must be one of {EC_MODES}")
        if self.base_solver not in BASE_SOLVERS:
            raise ValueError(f"model.moe.router.base_solver={self.base_solver!r} must be one of {BASE_SOLVERS}")
        if self.score_fn not in SCORE_FNS:
            raise ValueError(f"model.moe.router.score_fn={self.score_fn!r} must be one of {SCORE_FNS}")
        if self.sinkhorn_iters < 1:
            raise ValueError(f"model.moe.router.sinkhorn_iters={self.sinkhorn_iters} must be at least 1")
        if self.bias_update_rate < 0:
            raise ValueError(f"model.moe.router.bias_update_rate={self.bias_update_rate} must be non-negative")
        if self.name == "expert_choice" and self.capacity_factor <= 0:
            raise ValueError(
                f"model.moe.router.capacity_factor={self.capacity_factor} must be positive for expert_choice: each expert "
                f"takes ceil(capacity_factor * T * top_k / E) tokens"
            )
        if self.name == "expert_choice" and self.eval_capacity_factor is not None and self.eval_capacity_factor <= 0:
            raise ValueError(
                f"model.moe.router.eval_capacity_factor={self.eval_capacity_factor} must be positive or null for expert_choice"
            )
        if self.name == "base" and self.top_k != 1 and self.base_solver != "auction":  # routing.base_layers
            raise ValueError(f"model.moe.router.base_solver={self.base_solver!r} sends every token to one expert, but "
                             f"top_k={self.top_k}; use base_solver=auction for top_k > 1 or set top_k=1")
        if self.name in ("base", "balanced_topk") and self.top_k == 1 and self.score_fn == "softmax":
            raise ValueError("model.moe.router.score_fn=softmax with top_k=1 gates every token with the constant 1 (a "
                             "softmax over one logit), so the router would never learn; use score_fn=sigmoid")
        if self.random_second and self.top_k != 2:
            raise ValueError(f"model.moe.router.random_second needs model.moe.router.top_k=2, got {self.top_k}")
        if not 0.0 <= self.jitter < 1.0:
            raise ValueError(f"model.moe.router.jitter={self.jitter} must be in [0, 1)")
        if self.scale <= 0:
            raise ValueError(f"model.moe.router.scale={self.scale} must be positive: it multiplies every combine "
                             f"weight, so 0 switches the experts off (1 is the plain router, DeepSeek-V3 uses 2.5)")
        for name in ("aux_loss_coef", "z_loss_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.moe.router.{name}={getattr(self, name)} must be non-negative: a negative "
                                 f"coefficient rewards what the loss penalises (0 turns the loss off)")
        if self.name in USES_CAPACITY:
            for name in ("capacity_factor", "eval_capacity_factor"):
                self._check_capacity(name, getattr(self, name))

    def _check_capacity(self, name: str, cf: Optional[float]) -> None:
        """Refuses a fixed or capped capacity so small that most tokens must be dropped."""
        if not cf:  # None (as training) or 0 (dropless)
            return
        slots = abs(cf) * self.top_k  # expert slots per token: C = ceil(|cf| * T * k / E) for each of E experts
        if slots < MIN_SLOTS_PER_TOKEN:
            raise ValueError(
                f"model.moe.router.{name}={cf} with top_k={self.top_k} gives the experts {slots:g} slots per token "
                f"(each expert takes ceil(|{name}| * T * top_k / E) tokens), so at most {100 * slots:.3g}% of the "
                f"tokens reach an expert and at least {100 * (1 - slots):.3g}% skip the layer, however well the "
                f"router balances. The capacity factor is a multiple of an evenly balanced expert's load: use 1.0 to "
                f"2.0 (Switch: 1.25), 0 for dropless, or at least {MIN_SLOTS_PER_TOKEN / self.top_k:g} "
                f"(= {MIN_SLOTS_PER_TOKEN} / top_k)"
            )

    @property
    def has_gate(self) -> bool:
        """Whether the router owns a d x E linear gate (hash routing reads token ids instead)."""
        return self.name != "hash"

    def capacity_factor_at(self, training: bool) -> float:
        """The capacity factor of training, or of evaluation (eval_capacity_factor where set, else the same)."""
        if not training and self.eval_capacity_factor is not None:
            return self.eval_capacity_factor
        return self.capacity_factor

    @property
    def experts_per_token(self) -> float:
        """Experts a token reaches on average in training: k for token choice, capacity_factor * k for expert
        choice (experts fill capacity_factor * T * k / E slots each). FLOP accounting uses this."""
        return self.capacity_factor * self.top_k if self.name == "expert_choice" else float(self.top_k)

    def check_experts(self, num_experts: int) -> None:
        """Checks what depends on the layer this router serves; raised when the model config is built."""
        if self.top_k > num_experts:
            raise ValueError(
                f"model.moe.router.top_k={self.top_k} is larger than moe.num_experts={num_experts}; "
                f"lower model.moe.router.top_k or raise moe.num_experts"
            )
