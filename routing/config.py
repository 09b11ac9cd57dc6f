"""Router configuration: one typed dataclass shared by every router family."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

ORDERS = ("topk_softmax", "softmax_topk")
DROP_POLICIES = ("probs", "position")
EC_MODES = ("per_position", "batch")
BASE_SOLVERS = ("auction", "sinkhorn")
SCORE_FNS = ("sigmoid", "softmax")


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
    aux_loss_coef: float = 0.01  # Switch load-balancing loss coefficient (alpha)
    z_loss_coef: float = 0.001  # ST-MoE router z-loss coefficient
    jitter: float = 0.0  # Switch multiplicative noise: router input scaled by U(1-eps, 1+eps) in training
    # --- family-specific settings (each ignored by the other families)
    random_second: bool = False  # topk with k=2: keep the second expert with probability min(1, 2*g2) (GShard)
    ec_mode: str = "per_position"  # expert_choice: "per_position" (decoder-safe) or "batch" (sees the future)
    hash_seed: int = 0  # hash: seed of the fixed token-id -> expert table
    base_solver: str = "auction"  # base: "auction" (exact balanced assignment) or "sinkhorn" (approximate)
    sinkhorn_iters: int = 20  # base (sinkhorn solver) and sinkhorn: normalisation iterations
    bias_update_rate: float = 1e-3  # bias_balanced: step of the per-expert bias after each optimizer step (u)
    score_fn: str = "sigmoid"  # bias_balanced: expert scores, "sigmoid" (DeepSeek-V3) or "softmax" (DeepSeek-V2)

    def __post_init__(self) -> None:
        from routing.registry import ROUTERS  # late import: the registry imports this module

        if self.name not in ROUTERS:
            raise ValueError(f"model.moe.router.name={self.name!r} is not a known router; choose one of {sorted(ROUTERS)}")
        if self.top_k < 1:
            raise ValueError(f"model.moe.router.top_k={self.top_k} must be at least 1")
        if self.order not in ORDERS:
            raise ValueError(f"model.moe.router.order={self.order!r} must be one of {ORDERS}")
        if self.drop_policy not in DROP_POLICIES:
            raise ValueError(f"model.moe.router.drop_policy={self.drop_policy!r} must be one of {DROP_POLICIES}")
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
        if self.name == "base" and self.top_k != 1:
            raise ValueError(
                f"model.moe.router.top_k={self.top_k} but BASE layers send every token to exactly one expert; set model.moe.router.top_k=1"
            )
        if self.random_second and self.top_k != 2:
            raise ValueError(f"model.moe.router.random_second needs model.moe.router.top_k=2, got {self.top_k}")
        if not 0.0 <= self.jitter < 1.0:
            raise ValueError(f"model.moe.router.jitter={self.jitter} must be in [0, 1)")

    @property
    def has_gate(self) -> bool:
        """Whether the router owns a d x E linear gate (hash routing reads token ids instead)."""
        return self.name != "hash"

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
