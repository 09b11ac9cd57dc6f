"""Model configuration: ModelConfig (the backbone) holding MoEConfig (which FFN slots are sparse, and how).

A dense model is a sparse one with zero sparse layers (`moe.layers="none"`), so dense and MoE twins share
one config type and one code path.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from moe.expert_shard import check_expert_parallel
from routing.config import RouterConfig, check_finite

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")
NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rope", "alibi", "none")
ATTN_BIAS = ("none", "all", "qkv", "o")
DISPATCHERS = ("auto", "einsum", "sorted", "triton", "tutel")


@dataclass
class MoEConfig:
    # Which FFN slots are sparse: "none" (dense model), "all", "every:K" (layers K-1, 2K-1, ...: every K-th,
    # GShard/GLaM use every:2), "last:N", or explicit 0-based indices "1,3,5".
    layers: str = "none"
    num_experts: int = 8  # routed experts per sparse layer (E)
    expert_hidden: Optional[int] = None  # hidden width f of each expert; None: the dense FFN's d_ff
    glu: Optional[bool] = None  # gated experts; None: as the dense FFN (model.glu). GLaM gates only its dense FFNs
    # "auto" (triton for CUDA tensors when triton imports, else sorted; the run's log says which), "einsum" (GShard
    # one-hot reference), "sorted" (grouped matmul, dropless) or "triton" (fused gather/GEMM/combine and top-k
    # kernels; needs CUDA, or TRITON_INTERPRET=1 to run on CPU for tests) or "tutel" (Tutel's encode/decode kernels
    # around padded experts; tutel is not on PyPI, so only where it was installed from source)
    dispatcher: str = "auto"
    num_shared_experts: int = 0  # always-active experts beside the routed ones (DeepSeekMoE, Qwen-MoE)
    shared_hidden: Optional[int] = None  # hidden width of the shared experts together; None: num_shared * f
    shared_gate: bool = False  # scale the shared experts' output by sigmoid(x . w) per token (Qwen-MoE)
    # Ranks each sparse layer's experts are sharded over (ep; divides num_experts and the world size). A model
    # is built at full size and sharded by moe.parallel.distribute; checkpoints are full-size whatever ep was.
    expert_parallel: int = 1
    router: RouterConfig = field(default_factory=RouterConfig)  # how tokens choose experts

    def __post_init__(self) -> None:
        if not isinstance(self.router, RouterConfig):  # a dict from JSON/Hydra; anything else is refused by name
            self.router = config_from_dict(RouterConfig, self.router, "model.moe.router")
        if self.num_experts < 1:
            raise ValueError(f"model.moe.num_experts={self.num_experts} must be at least 1")
        if self.expert_hidden is not None and self.expert_hidden < 1:
            raise ValueError(f"model.moe.expert_hidden={self.expert_hidden} must be positive or null")
        if self.num_shared_experts < 0 or (self.shared_hidden is not None and self.shared_hidden < 1):
            raise ValueError("model.moe.num_shared_experts must be >= 0 and model.moe.shared_hidden positive or null")
        if self.dispatcher not in DISPATCHERS:
            raise ValueError(f"model.moe.dispatcher={self.dispatcher!r} must be one of {DISPATCHERS}")
        check_expert_parallel(self.num_experts, self.expert_parallel)
        if self.expert_parallel > 1 and self.dispatcher not in ("auto", "sorted", "triton"):
            raise ValueError(
                f"model.moe.dispatcher={self.dispatcher!r} cannot run expert-parallel (model.moe.expert_parallel="
                f"{self.expert_parallel}): the all-to-all dispatcher runs the local experts with 'sorted' or "
                f"'triton'; set model.moe.dispatcher=auto, sorted or triton"
            )

    def sparse_layers(self, n_layer: int) -> tuple[int, ...]:
        """Indices of the sparse FFN slots in a model of n_layer blocks."""
        spec = str(self.layers).strip()
        try:
            if not spec:
                raise ValueError
            if spec == "none":
                return ()
            if spec == "all":
                return tuple(range(n_layer))
            if spec.startswith("every:"):
                k = int(spec.split(":", 1)[1])
                if k < 1:
                    raise ValueError
                return tuple(i for i in range(n_layer) if (i + 1) % k == 0)
            if spec.startswith("last:"):
                n = int(spec.split(":", 1)[1])
                if not 0 <= n <= n_layer:
                    raise ValueError
                return tuple(range(n_layer - n, n_layer))
            idx = tuple(sorted({int(s) for s in spec.strip("[]() ").split(",") if s.strip()}))
        except ValueError:
            raise ValueError(
                f"model.moe.layers={self.layers!r} is not understood; use none, all, every:K, last:N (N <= {n_layer}) "
                f"or a list of layer indices such as '1,3,5'"
            ) from None
        bad = [i for i in idx if not 0 <= i < n_layer]
        if bad:
            raise ValueError(f"model.moe.layers lists {bad}, outside the model's layers 0..{n_layer - 1}")
        return idx


@dataclass
class ModelConfig:
    vocab_size: int = 4096  # token vocabulary (V)
    n_layer: int = 4  # transformer blocks (L)
    d_model: int = 128  # residual width (d)
    n_head: int = 4  # attention heads
    n_kv_head: Optional[int] = None  # key/value heads for grouped-query attention; None: n_head (multi-head)
    head_dim: Optional[int] = None  # width per head; None: d_model // n_head
    d_ff: int = 512  # dense FFN hidden width (f)
    max_seq_len: int = 256  # longest sequence (sizes learned positions; RoPE has no limit but we check it)
    activation: str = "gelu"  # FFN nonlinearity: gelu, gelu_tanh (GPT-2), relu (OPT), silu (Llama with glu)
    glu: bool = False  # gated FFN: act(x W_gate) * (x W_up), SwiGLU when activation=silu (Llama family)
    norm: str = "layernorm"  # layernorm (GPT-2, OPT) or rmsnorm (Llama family)
    norm_eps: float = 1e-5  # epsilon inside the norms
    position: str = "learned"  # learned absolute positions (GPT-2, OPT), rope (Llama family) or none
    position_offset: int = 0  # learned positions: index shift of the table (OPT uses 2)
    rope_theta: float = 10000.0  # RoPE base frequency (Llama 2: 1e4, Llama 3: 5e5, SmolLM2: 1e5)
    attn_bias: str = "none"  # biases on attention projections: none, all (GPT-2, OPT), qkv (Qwen2) or o (GPT-Neo)
    ffn_bias: bool = False  # biases on FFN projections (GPT-2, OPT)
    tie_embeddings: bool = True  # share the input embedding and the output head
    dropout: float = 0.0  # dropout on residual branches and attention probabilities during training
    init_std: float = 0.02  # std of the normal initialisation of weights
    # --- options of further families (Gemma, BLOOM, GPT-Neo); the defaults leave a model as it was
    embed_scale: bool = False  # multiply the token embeddings by sqrt(d_model) (Gemma; the tied head is not scaled)
    embed_norm: bool = False  # a norm (model.norm) on the embeddings before the first block (BLOOM)
    norm_unit_offset: bool = False  # RMSNorms scale by (1 + weight), weight initialised to 0 (Gemma)
    qk_norm: bool = False  # RMSNorm over each head's queries and keys before RoPE (Gemma 3)
    post_norms: bool = False  # also norm each branch's output before the residual add (Gemma 2/3 "sandwich")
    # Which blocks attend locally (a sliding window) and which globally, as a cycle of letters over the blocks:
    # G global (full causal), L local. "G" every block global (default), "LG" Gemma 2, "LLLLLG" Gemma 3,
    # "GL" GPT-Neo; a string of n_layer letters lists every block.
    attention_pattern: str = "G"
    sliding_window: Optional[int] = None  # local blocks: a query sees itself and the window - 1 tokens before it
    rope_local_theta: Optional[float] = None  # RoPE base of local blocks (Gemma 3: 1e4); None: rope_theta
    # linear RoPE scaling of the global blocks: positions / factor (transformers' rope_type "linear"; Gemma 3 4B+: 8)
    rope_linear_factor: Optional[float] = None
    # factor on the q.k scores; None: 1/sqrt(head width). Gemma: query_pre_attn_scalar^-1/2, GPT-Neo: 1 (unscaled)
    attn_scale: Optional[float] = None
    attn_softcap: Optional[float] = None  # scores -> c * tanh(scores / c) before the mask (Gemma 2: 50)
    logit_softcap: Optional[float] = None  # output logits -> c * tanh(logits / c) (Gemma 2: 30)
    moe: MoEConfig = field(default_factory=MoEConfig)  # which FFN slots are sparse and how they route

    def __post_init__(self) -> None:
        if not isinstance(self.moe, MoEConfig):  # a dict from JSON/Hydra; anything else is refused by name
            self.moe = config_from_dict(MoEConfig, self.moe, "model.moe")
        check_finite(self, "model")
        for name in ("vocab_size", "n_layer", "d_model", "n_head", "d_ff", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name}={getattr(self, name)} must be positive")
        if self.head_dim is None and self.d_model % self.n_head != 0:
            raise ValueError(
                f"model.n_head={self.n_head} does not divide model.d_model={self.d_model}; "
                f"pick a head count that divides the width or set model.head_dim"
            )
        if self.kv_heads < 1 or self.n_head % self.kv_heads != 0:
            raise ValueError(f"model.n_kv_head={self.n_kv_head} must divide model.n_head={self.n_head}")
        if self.position == "rope" and self.dim_per_head % 2:
            raise ValueError(f"RoPE needs an even head width, got {self.dim_per_head}; change model.d_model or n_head")
        for name, allowed in (("activation", ACTIVATIONS), ("norm", NORMS), ("position", POSITIONS), ("attn_bias", ATTN_BIAS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"model.{name}={getattr(self, name)!r} must be one of {allowed}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout={self.dropout} must be in [0, 1)")
        # Named here rather than by torch's normal_ at build time; std 0 would give every weight the same value.
        if self.init_std <= 0:
            raise ValueError(f"model.init_std={self.init_std} must be positive (0.02 is the usual scale)")
        for name in ("norm_eps", "rope_theta"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name}={getattr(self, name)} must be positive")
        self._check_family_options()
        if self.sparse_layers:  # only a model that routes needs a router that fits it
            self.moe.router.check_experts(self.moe.num_experts)

    def _check_family_options(self) -> None:
        pattern = self.attention_pattern
        if not pattern or set(pattern) - {"G", "L"} or len(pattern) > self.n_layer:
            raise ValueError(f"model.attention_pattern={pattern!r} must be a cycle of G (global) and L (local) letters "
                             f"of at most model.n_layer={self.n_layer} letters, e.g. 'G', 'LG', 'LLLLLG'")
        if "L" in self.layer_kinds and (self.sliding_window is None or self.sliding_window < 1):
            raise ValueError(f"model.attention_pattern={pattern!r} has local blocks, which need model.sliding_window "
                             f"(a positive window), got {self.sliding_window}")
        for name in ("sliding_window", "rope_local_theta", "rope_linear_factor", "attn_scale", "attn_softcap",
                     "logit_softcap"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"model.{name}={value} must be positive or null")
        if self.position == "alibi" and self.position_offset:
            raise ValueError("model.position_offset applies to learned positions only; set it to 0 with alibi")
        if (self.norm_unit_offset or self.qk_norm) and self.norm != "rmsnorm":
            raise ValueError(f"model.norm_unit_offset and model.qk_norm need model.norm=rmsnorm, got {self.norm!r}")

    def family_options(self) -> list[str]:
        """The options of the Gemma / BLOOM / GPT-Neo families this model uses ("model.field=value"), for formats
        that cannot hold them (upcycle.export_formats refuses a model that has any)."""
        out = [f"model.{name}={getattr(self, name)!r}" for name in _FAMILY_DEFAULTS
               if getattr(self, name) != _FAMILY_DEFAULTS[name]]
        out += [f"model.{name}={getattr(self, name)!r}" for name, value in (("position", "alibi"), ("attn_bias", "o"))
                if getattr(self, name) == value]
        return out

    @property
    def layer_kinds(self) -> str:
        """attention_pattern spelled out over the n_layer blocks (one letter per block)."""
        p = self.attention_pattern
        return (p * (self.n_layer // len(p) + 1))[: self.n_layer]

    def is_local(self, layer: int) -> bool:
        """Whether block `layer` attends through the sliding window."""
        return self.layer_kinds[layer] == "L"

    # Derived values are properties, not fields, so that a config round-trips through JSON and Hydra unchanged.
    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.n_head

    @property
    def sparse_layers(self) -> tuple[int, ...]:
        return self.moe.sparse_layers(self.n_layer)

    @property
    def expert_hidden(self) -> int:
        return self.moe.expert_hidden or self.d_ff

    @property
    def expert_glu(self) -> bool:
        return self.glu if self.moe.glu is None else self.moe.glu

    @property
    def is_moe(self) -> bool:
        return bool(self.sparse_layers)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        return config_from_dict(cls, d, "model")

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


# The family options' defaults, with which a model is as it was before they existed (family_options).
_FAMILY_DEFAULTS: dict[str, Any] = dict(embed_scale=False, embed_norm=False, norm_unit_offset=False, qk_norm=False,
                                        post_norms=False, attention_pattern="G", rope_local_theta=None,
                                        rope_linear_factor=None,
                                        attn_scale=None, attn_softcap=None, logit_softcap=None)


def config_from_dict(cls, d: dict[str, Any], where: str):
    """Builds a config dataclass from a plain dict, naming unknown keys instead of a bare TypeError."""
    if not isinstance(d, dict):
        raise ValueError(f"{where} must be a mapping, got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{where} has unknown field(s) {unknown}; known fields are {sorted(names)}")
    return cls(**d)
