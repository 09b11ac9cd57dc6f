"""A bank of E feed-forward experts stored as stacked weights.

Shape legend: E experts, d model width, f expert hidden width, N rows sorted by expert, C capacity.
Weights are laid out [E, in, out] so that a row block multiplies directly (x @ w[e]); the dense FFN's
nn.Linear weight [out, in] maps to one expert as its transpose.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from moe.activations import activation_fn
from moe.expert_shard import ExpertShard
from moe.grouped_glu import fused_glu_ok, grouped_glu, prefer_fused_glu
from moe.segment_matmul import grouped_matmul


class Experts(nn.Module):
    def __init__(self, num_experts: int, d_model: int, hidden: int, activation: str, glu: bool, bias: bool,
                 shard: Optional[ExpertShard] = None):
        """num_experts: the experts this bank holds (E_l of an expert-parallel shard); shard: which experts of
        the layer they are (None: all of them, one process)."""
        super().__init__()
        E, d, f = num_experts, d_model, hidden
        shard = shard if shard is not None else ExpertShard(num_experts)
        if shard.num_experts != num_experts:
            raise ValueError(f"a bank of {num_experts} experts cannot hold {shard.num_experts} experts of the shard "
                             f"{shard}")
        # Expert parallelism (moe.parallel.distribute): this bank holds experts [first_expert, first_expert +
        # num_experts) of num_global_experts, and ep_group is its all-to-all group. Fixed at construction.
        self.shard = shard
        self.num_experts, self.act = E, activation_fn(activation)
        self.activation = activation  # the name, for fused kernels (moe.dispatch.triton) that apply it themselves
        self.w_up = nn.Parameter(torch.empty(E, d, f))
        self.w_gate = nn.Parameter(torch.empty(E, d, f)) if glu else None
        self.w_down = nn.Parameter(torch.empty(E, f, d))
        self.b_up = nn.Parameter(torch.zeros(E, f)) if bias else None
        self.b_gate = nn.Parameter(torch.zeros(E, f)) if bias and glu else None
        self.b_down = nn.Parameter(torch.zeros(E, d)) if bias else None
        for p in self.parameters():
            _tag(p, shard.ep_size)
        # moe.segment_matmul.IMPLS or "fused": "auto" (on CPU, gated banks with small expert segments take
        # moe.grouped_glu's fused path, moe.grouped_glu.prefer_fused_glu; else torch's grouped_mm where its layout
        # rules hold, else the per-expert loop), or force "fused" / "grouped_mm" / "loop" (benchmarks compare them;
        # FLOP tests need the loop, whose matmuls FlopCounterMode sees)
        self.gemm_impl = "auto"
        self.reset_parameters()

    # The shard's fields, read where a bank is at hand (dispatchers, checkpoints, collective errors).
    num_global_experts = property(lambda self: self.shard.num_global_experts)
    first_expert = property(lambda self: self.shard.first_expert)
    ep_size = property(lambda self: self.shard.ep_size)
    ep_rank = property(lambda self: self.shard.ep_rank)
    ep_group = property(lambda self: self.shard.group)
    layer_name = property(lambda self: self.shard.layer_name)

    @torch.no_grad()
    def sharded(self, shard: ExpertShard) -> "Experts":
        """A new bank holding this full-size bank's experts [shard.first_expert, + shard.num_experts) (copies),
        with the same settings; its parameters carry the DeepSpeed tags of the shard's expert-parallel size.
        Draws no random numbers (the new bank is laid out on the meta device, then given the slices), so a run
        continues with the random state of one process."""
        if self.shard.ep_size != 1 or self.num_experts != shard.num_global_experts:
            raise ValueError(f"{shard.layer_name or 'an expert bank'}: only a full-size bank of "
                             f"{shard.num_global_experts} experts can be sharded, this one holds {self.num_experts} "
                             f"(expert_parallel={self.shard.ep_size})")
        lo, n = shard.first_expert, shard.num_experts
        with torch.device("meta"):
            bank = Experts(n, self.w_up.shape[1], self.w_up.shape[2], self.activation, self.w_gate is not None,
                           self.b_up is not None, shard=shard)
        bank.gemm_impl = self.gemm_impl
        bank.train(self.training)
        for name, p in self.named_parameters(recurse=False):
            part = nn.Parameter(p.detach()[lo:lo + n].clone(), requires_grad=p.requires_grad)
            bank.register_parameter(name, _tag(part, shard.ep_size))
        return bank

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02, down_std: Optional[float] = None) -> None:
        """Normal weights, zero biases (a bank built on its own is usable; Transformer re-initialises it with
        its own std and GPT-2's scaled std for the down projection)."""
        for name, p in self.named_parameters():
            if name.startswith("b_"):
                p.zero_()
            else:
                p.normal_(0.0, down_std if (name == "w_down" and down_std is not None) else std)

    def _weights(self, dtype: torch.dtype) -> tuple[Tensor, Optional[Tensor], Tensor]:
        # Under autocast the activations arrive in bf16 while the master weights stay fp32.
        cast = (lambda w: None if w is None else w.to(dtype)) if self.w_up.dtype != dtype else (lambda w: w)
        return cast(self.w_up), cast(self.w_gate), cast(self.w_down)

    def forward_sorted(self, x: Tensor, expert_index: Tensor, counts: Tensor,
                       row_scale: Optional[Tensor] = None) -> Tensor:
        """x [N, d] rows grouped by expert (counts [E] rows each, expert_index [N]) -> [N, d].

        row_scale [N]: each output row times its number (the dispatcher's combine weight), applied to the hidden
        rows [N, f] before the down projection when f <= d and no down bias is in the way (fewer numbers to
        scale: at the fine-grained twins' f = 37 and d = 128 it is a third of the work), else to the output."""
        fusable = self.w_gate is not None and self.b_up is None and fused_glu_ok(x, self.activation)
        if self.gemm_impl == "fused" and not fusable:
            raise ValueError(f"gemm_impl='fused' needs gated experts without biases, a known activation and CPU "
                             f"fp32/bf16 rows of a 16-byte width, eager (got glu={self.w_gate is not None}, "
                             f"bias={self.b_up is not None}, activation={self.activation!r}, rows {tuple(x.shape)} "
                             f"{x.dtype} on {x.device}); use gemm_impl='auto'")
        if fusable and (self.gemm_impl == "fused" or (self.gemm_impl == "auto" and prefer_fused_glu(
                x.shape[0], self.num_experts, self.w_up.shape[2]))):
            return self._forward_fused_glu(x, counts, row_scale)

        def matmul(h: Tensor, w: Tensor) -> Tensor:
            return grouped_matmul(h, w, counts, self.gemm_impl)

        def add_bias(h: Tensor, b: Tensor) -> Tensor:  # b [E, width]: each row gets its expert's
            return h + b.to(h.dtype).index_select(0, expert_index)

        return self._ffn(x, matmul, add_bias, row_scale)

    def _forward_fused_glu(self, x: Tensor, counts: Tensor, row_scale: Optional[Tensor]) -> Tensor:
        """forward_sorted of a gated bank without biases on CPU: gate and up as one grouped GEMM with the activation
        and the combine weight fused (moe.grouped_glu), the down projection on its aligned hidden rows."""
        w_up, w_gate, w_down = self._weights(x.dtype)
        scale_hidden = row_scale is not None and w_up.shape[2] <= x.shape[1]  # as in _ffn (no down bias here)
        h = grouped_glu(x, w_gate, w_up, counts, self.activation, row_scale if scale_hidden else None)  # [N, f]
        y = grouped_matmul(h, w_down, counts, "auto")  # [N, d]; grouped_mm on the aligned hidden rows
        return y * row_scale.to(y.dtype)[:, None] if row_scale is not None and not scale_hidden else y

    def forward_padded(self, x: Tensor) -> Tensor:
        """x [E, C, d], one padded slot block per expert -> [E, C, d] (the einsum dispatcher's path)."""
        return self._ffn(x, torch.bmm, lambda h, b: h + b.to(h.dtype)[:, None, :])

    def _ffn(self, x: Tensor, matmul: Callable[[Tensor, Tensor], Tensor], add_bias: Callable[[Tensor, Tensor], Tensor],
             row_scale: Optional[Tensor] = None) -> Tensor:
        """The one expert FFN of both layouts: down(act(gate(x)) * up(x)) or down(act(up(x))), each projection
        `matmul(h, w[E, in, out])` plus `add_bias(h, b[E, out])`; x [..., d] rows of one layout -> [..., d]."""
        w_up, w_gate, w_down = self._weights(x.dtype)

        def project(h: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
            out = matmul(h, w)
            return out if b is None else add_bias(out, b)

        h = project(x, w_up, self.b_up)  # [..., f]
        h = self.act(project(x, w_gate, self.b_gate)) * h if w_gate is not None else self.act(h)
        scale_hidden = row_scale is not None and self.b_down is None and h.shape[-1] <= x.shape[-1]
        if scale_hidden:  # (s h) W = s (h W): the same rows, scaled where there are fewer numbers
            h = h * row_scale.to(h.dtype)[:, None]
        y = project(h, w_down, self.b_down)  # [..., d]
        if row_scale is not None and not scale_hidden:
            y = y * row_scale.to(y.dtype)[:, None]
        return y


def _tag(p: nn.Parameter, ep_size: int) -> nn.Parameter:
    """Expert weights are not replicated across expert-parallel ranks: data-parallel reduction must skip them and
    reduce them over their own group (the tags DeepSpeed's MoE code reads; moe.parallel.is_expert reads the first)."""
    p.allreduce = False
    p.group_name = f"ep_size_{ep_size}"
    return p
