"""Plan rows <-> tokens without atomics: a gather whose backward, and a weighted combine whose forward, add each
token's rows in a fixed order, in fp32.

Shape legend: T tokens, d row width, N plan rows (sorted by expert), K the most rows any one token has (k for a
dropless top-k plan; up to E for expert choice), token_index [N] the token each row carries.

Why: `index_add_` (and the backward of `x[token_index]`, an accumulating `index_put_`) add a token's k rows with
atomics on CUDA, so which row lands first changes from run to run, and for k >= 3 the last bits of the sum with it
(two adds onto zero commute; three do not associate), in bf16 and fp32 alike. Here each token's rows get fixed
slots instead:

    slots [K, T]:  slots[j, t] = the j-th row of token t in row order (a stable sort of token_index keeps the
                   plan's expert order within a token), or N (a padding row of zeros) where t has fewer than j+1.
    sum:           y[t] = ((r_0 + r_1) + r_2) + ...  over j = 0..K-1, each a gather of T rows and one add, in fp32,
                   rounded once to the output dtype: the same order as moe.kernels.combine.segment_sum's loop.

Every step is a sort, a search, a gather or an elementwise add, none of them atomic, so the result depends on the
plan alone, on CUDA as on CPU. The backward of the combine is a gather (no reduction at all). K is a host integer:
alltoall_dispatch reads it in the one host synchronisation it already has (`token_slots`, for other callers, reads
it on its own).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


@dataclass
class TokenSlots:
    """The fixed order in which each token's rows are added."""

    token_index: Tensor  # [N] long, the token of each row (the plan's)
    perm: Tensor  # [N] long, the rows in token-major order (a stable sort of token_index)
    start: Tensor  # [T] long, first token-major position of each token's rows
    per_token: Tensor  # [T] long, how many rows each token has
    num_tokens: int  # T
    slots: Optional[Tensor] = None  # [K, T] long, row of the j-th contribution to token t, or N (the zero row)

    @staticmethod
    def build(token_index: Tensor, num_tokens: int) -> "TokenSlots":
        """The token-major order, on the device (a sort and a search: no bincount, which is atomic on CUDA and
        refused under torch.use_deterministic_algorithms). `set_max_rows` completes it."""
        # Stable: a token's rows keep the plan's (expert) order, so the order of the sum is fixed by the plan.
        sorted_token, perm = torch.sort(token_index, stable=True)
        tokens = torch.arange(num_tokens + 1, device=token_index.device, dtype=sorted_token.dtype)
        offsets = torch.searchsorted(sorted_token, tokens)  # [T+1]; offsets[T] = N (every token is < T)
        return TokenSlots(token_index=token_index, perm=perm, start=offsets[:-1], per_token=offsets.diff(),
                          num_tokens=num_tokens)

    def max_rows(self) -> Tensor:
        """K on the device (0-d long; 0 without rows): the caller reads it with its other host values."""
        if self.per_token.numel() == 0:
            return self.per_token.new_zeros(())
        return self.per_token.max()

    def set_max_rows(self, max_rows: int) -> "TokenSlots":
        """Builds the [K, T] slot table for K = max_rows (>= every token's row count); returns self."""
        N, dev = self.token_index.numel(), self.token_index.device
        j = torch.arange(max_rows, device=dev)[:, None]  # [K, 1]
        pos = (self.start[None, :] + j).clamp(max=max(N - 1, 0))  # [K, T], clamped only where masked below
        pad = torch.full((), N, dtype=torch.long, device=dev)
        gathered = self.perm[pos] if N else pad
        self.slots = torch.where(j < self.per_token[None, :], gathered, pad)
        return self

    def padded(self, width: int, device: torch.device) -> Tensor:
        """An fp32 [N + 1, width] buffer whose last row (index N, the padding slot) is zero; callers write the
        N rows into [:N] directly (one pass, no separate cast and concatenation)."""
        N = self.token_index.numel()
        buf = torch.empty(N + 1, width, device=device, dtype=torch.float32)
        buf[N].zero_()
        return buf

    def sum_rows(self, padded: Tensor) -> Tensor:
        """padded [N + 1, d] fp32 (see `padded`) -> [T, d] fp32: y[t] = sum of t's rows, added in slot order."""
        if self.slots is None:
            raise RuntimeError("TokenSlots.sum_rows before set_max_rows: the slot table needs K (max_rows())")
        K = self.slots.shape[0]
        if K == 0:
            return padded.new_zeros(self.num_tokens, padded.shape[1])
        out = padded.index_select(0, self.slots[0])  # [T, d]: every token's first row (or the zero row)
        if K > 1:
            tmp = torch.empty_like(out)
            for j in range(1, K):  # in a fixed order: ((r_0 + r_1) + r_2) + ...
                out += torch.index_select(padded, 0, self.slots[j], out=tmp)
        return out


def token_slots(token_index: Tensor, num_tokens: int) -> TokenSlots:
    """TokenSlots with its table, K read from the device (one host synchronisation; alltoall_dispatch avoids it
    by reading K with its split sizes)."""
    order = TokenSlots.build(token_index, num_tokens)
    return order.set_max_rows(int(order.max_rows()))


class _Combine(torch.autograd.Function):
    """y[t] = sum over rows r of t of weight[r] * rows[r], products and sum in fp32, one rounding to rows' dtype."""

    @staticmethod
    def forward(ctx, rows: Tensor, weight: Tensor, slots: TokenSlots) -> Tensor:
        ctx.save_for_backward(rows, weight)
        ctx.slots = slots
        padded = slots.padded(rows.shape[1], rows.device)
        torch.mul(rows, weight.float()[:, None], out=padded[:-1])  # the product in fp32, written in place
        return slots.sum_rows(padded).to(rows.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor):
        rows, weight = ctx.saved_tensors
        g = grad_y.index_select(0, ctx.slots.token_index).float()  # [N, d] each row's token gradient: a gather
        grad_rows = (g * weight.float()[:, None]).to(rows.dtype)
        grad_weight = g.mul_(rows).sum(1).to(weight.dtype)  # a per-row dot product in fp32, no cross-row sum
        return grad_rows, grad_weight, None


class _Gather(torch.autograd.Function):
    """rows[r] = x[token_index[r]]; backward sums each token's row gradients in slot order, in fp32."""

    @staticmethod
    def forward(ctx, x: Tensor, slots: TokenSlots) -> Tensor:
        ctx.slots, ctx.dtype = slots, x.dtype
        return x.index_select(0, slots.token_index)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_rows: Tensor):
        padded = ctx.slots.padded(grad_rows.shape[1], grad_rows.device)
        padded[:-1].copy_(grad_rows)
        return ctx.slots.sum_rows(padded).to(ctx.dtype), None


def combine_rows(rows: Tensor, weight: Tensor, slots: TokenSlots) -> Tensor:
    """rows [N, d], weight [N] -> y [T, d] in rows' dtype; deterministic, differentiable in rows and weight."""
    if rows.shape[0] != slots.token_index.numel() or weight.shape != (rows.shape[0],):
        raise ValueError(f"combine_rows: rows {tuple(rows.shape)} and weight {tuple(weight.shape)} must have one "
                         f"entry per plan row ({slots.token_index.numel()})")
    return _Combine.apply(rows, weight, slots)


def gather_rows(x: Tensor, slots: TokenSlots) -> Tensor:
    """x [T, d] -> rows [N, d] = x[token_index]; its backward is the deterministic per-token sum."""
    return _Gather.apply(x, slots)
