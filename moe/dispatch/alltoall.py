"""Expert-parallel dispatch: experts sharded over a process group, token rows moved there and back by all-to-all.

Shape legend: T tokens on this rank, d model width, E experts in all, P ranks in the expert-parallel group,
E_l = E / P experts per rank (rank p owns experts [p * E_l, (p + 1) * E_l)), N plan rows of this rank (sorted by
expert, so the rows bound for one rank are contiguous), M rows this rank receives for its E_l experts.

    1. counts:  all_to_all_single of the plan's counts [E] = [P, E_l] -> recv_counts [P, E_l]: how many rows
                each rank sends to each of my experts (one small collective).
    2. sync:    the split sizes go to the host, once (the only host synchronisation of the exchange; NCCL and
                gloo need the split sizes as Python ints, and the receive buffer's size M must be known).
    3. rows:    x[token_index] [N, d] -> [M, d], an uneven all_to_all_single inside an autograd Function whose
                backward is the reverse exchange.
    4. experts: the M rows arrive grouped by source rank; a stable sort on the device regroups them by local
                expert. `sorted` copies them into that order, runs Experts.forward_sorted and
                copies the results back; `triton` reads them through the permutation inside its first grouped
                GEMM and writes each result straight to its arrival slot from its second (no copies).
    5. return:  results back to the ranks of their tokens, [M, d] -> [N, d] (the same Function, reversed splits).
    6. combine: y[t] = sum of weight[r] * out[r] over the rows r of token t, in fp32 and in a fixed order
                (moe.dispatch.token_rows: no index_add_, whose atomics on CUDA make the sum differ between runs);
                the backward of step 3's gather is the same fixed-order sum, so forward and backward are bitwise
                repeatable. The order's K (most rows of any token) rides along in step 2's synchronisation.

Everything but step 2 stays on the device (the per-expert loop of grouped_matmul's fallback syncs too, as it
does for `sorted`). Every rank runs every collective of every layer in the same order, forward and backward,
whatever its counts: a rank or an expert with no tokens sends and receives empty buffers, and its experts get
zero gradients (never None). Exchanges that fail (a process-group timeout, a dead peer) are re-raised as
MoECollectiveError naming the rank, the layer, the phase and the per-expert token counts.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from moe.dispatch.token_rows import TokenSlots, combine_rows, gather_rows
from routing.plan import RoutingPlan


class MoECollectiveError(RuntimeError):
    """A collective of an MoE layer (the all-to-all dispatcher, the router's load-balancing all-reduce) failed or
    timed out; the message says where and with what counts."""


def collective_failure(layer: str, experts, phase: str, counts: Sequence[int],
                       error: BaseException) -> MoECollectiveError:
    """The error of a failed collective of MoE layer `layer` (its module path) holding `experts`, outside the
    exchange (e.g. in the router)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    msg = describe_exchange(layer, rank, experts.ep_rank, experts.ep_size, phase, counts)
    return MoECollectiveError(f"{msg}\ncaused by {type(error).__name__}: {error}")


def describe_exchange(layer: str, rank: int, ep_rank: int, ep_size: int, phase: str, counts: Sequence[int],
                      recv_counts: Optional[Sequence[int]] = None) -> str:
    """The report of a failed exchange: which rank, which layer, which phase, and the per-expert token counts."""
    E = len(counts)
    E_l = E // ep_size if ep_size else E
    owned = f"experts {ep_rank * E_l}..{(ep_rank + 1) * E_l - 1}"
    msg = (f"MoE collective failed on rank {rank} (expert-parallel rank {ep_rank} of {ep_size}, {owned}) "
           f"in MoE layer {layer or '?'} during the {phase}: this rank's token rows per expert {list(counts)}")
    if recv_counts is not None:
        by_source = [list(recv_counts[i * E_l:(i + 1) * E_l]) for i in range(ep_size)]
        msg += f"; rows it receives per local expert from each rank {by_source}"
    return msg + (". A process-group timeout here usually means another rank never reached this layer (it failed, "
                  "or ran a different number of MoE layers or steps); see the other ranks' errors, or raise the "
                  "process groups' timeout (init_process_group(timeout=...) and moe.parallel.make_groups(timeout=...))")


class _Where:
    """What an exchange reports when it fails; counts are read lazily (a failure path only)."""

    def __init__(self, experts, counts: Tensor):
        self.layer = experts.layer_name
        self.ep_rank, self.ep_size = experts.ep_rank, experts.ep_size
        self.counts = counts
        self.host_counts: Optional[list[int]] = None
        self.recv_counts: Optional[list[int]] = None

    def fail(self, phase: str, error: BaseException) -> MoECollectiveError:
        counts = self.host_counts if self.host_counts is not None else self.counts.detach().cpu().tolist()
        rank = dist.get_rank() if dist.is_initialized() else 0
        msg = describe_exchange(self.layer, rank, self.ep_rank, self.ep_size, phase, counts, self.recv_counts)
        return MoECollectiveError(f"{msg}\ncaused by {type(error).__name__}: {error}")


def _all_to_all(out: Tensor, inp: Tensor, out_splits, in_splits, group, where: _Where, phase: str) -> None:
    try:
        dist.all_to_all_single(out, inp, out_splits, in_splits, group=group)
    except RuntimeError as e:  # gloo and NCCL report timeouts and dead peers as RuntimeError subclasses
        raise where.fail(phase, e) from e


class _Exchange(torch.autograd.Function):
    """Uneven all_to_all_single of rows [sum(send), ...] -> [sum(recv), ...]; backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, rows: Tensor, send: list[int], recv: list[int], group, where: _Where, phase: str) -> Tensor:
        ctx.send, ctx.recv, ctx.group, ctx.where, ctx.phase = send, recv, group, where, phase
        out = rows.new_empty((sum(recv),) + tuple(rows.shape[1:]))
        _all_to_all(out, rows.contiguous(), recv, send, group, where, phase)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        out = grad.new_empty((sum(ctx.send),) + tuple(grad.shape[1:]))
        _all_to_all(out, grad.contiguous(), ctx.send, ctx.recv, ctx.group, ctx.where, f"backward of the {ctx.phase}")
        return out, None, None, None, None, None


def alltoall_dispatch(x: Tensor, plan: RoutingPlan, experts, local_dispatcher: str = "sorted") -> Tensor:
    """x [T, d] -> y [T, d]; same contract as sorted_dispatch, with `experts` a shard (moe.parallel.distribute).
    local_dispatcher: runs the local experts, "sorted" or "triton" (fused kernels; CUDA or TRITON_INTERPRET=1)."""
    if experts.ep_size == 1:
        from moe.dispatch.sorted import sorted_dispatch

        return sorted_dispatch(x, plan, experts)
    P, E_l, E = experts.ep_size, experts.num_experts, plan.num_experts
    group = experts.ep_group
    if E != P * E_l:
        raise ValueError(f"the plan routes to {E} experts but the expert-parallel shards hold {P} x {E_l}")
    where = _Where(experts, plan.counts)

    # 1. counts exchange: recv_counts[p, e] = rows rank p sends to my local expert e.
    counts = plan.counts.to(torch.long)
    recv_counts = torch.empty_like(counts)
    _all_to_all(recv_counts, counts, None, None, group, where, "exchange of per-expert counts")

    # 2. the one host synchronisation: split sizes (and the counts, kept for error reports), and K of the
    # token-major order that steps 3 and 6 reduce in.
    tokens = TokenSlots.build(plan.token_index, x.shape[0])
    host = torch.cat([counts, recv_counts, tokens.max_rows().view(1)]).tolist()
    where.host_counts, where.recv_counts = host[:E], host[E:2 * E]
    tokens.set_max_rows(host[2 * E])
    send = [sum(host[p * E_l:(p + 1) * E_l]) for p in range(P)]
    recv = [sum(host[E + p * E_l:E + (p + 1) * E_l]) for p in range(P)]
    M = sum(recv)

    # 3. rows to the ranks owning their experts.
    rows = gather_rows(x, tokens)  # [N, d] in expert order: rank p's rows are the p-th contiguous block
    got = _Exchange.apply(rows, send, recv, group, where, "exchange of token rows")  # [M, d]

    # 4. regroup by local expert (stable: source-rank order within an expert) and run the local experts.
    local = torch.arange(E_l, device=x.device).repeat(P)  # [P * E_l] local expert of each (source, expert) block
    expert_of_row = local.repeat_interleave(recv_counts, output_size=M)  # [M]
    order = torch.argsort(expert_of_row, stable=True)
    local_counts = recv_counts.view(P, E_l).sum(0)  # [E_l]
    if local_dispatcher == "triton":
        out = _triton_local(got, order, local_counts, experts)  # [M, d] in arrival order
    else:
        out = experts.forward_sorted(got[order], expert_of_row[order], local_counts)  # [M, d]
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(M, device=x.device)
        out = out[inverse]  # back to arrival order

    # 5. results back to the ranks of their tokens, 6. weighted combine.
    back = _Exchange.apply(out, recv, send, group, where, "return exchange of expert outputs")  # [N, d]
    return combine_rows(back.to(x.dtype), plan.weight, tokens)  # [T, d]; weight and k-sum in fp32


def _triton_local(got: Tensor, order: Tensor, local_counts: Tensor, experts) -> Tensor:
    """The local experts on the fused kernels: row r of expert order is arrival row order[r], and its result goes
    straight back to that arrival row (moe.kernels.expert_mlp.grouped_expert_rows: a permutation, so no
    token-major sort, no combine weight and no per-row sum)."""
    from moe.kernels.expert_mlp import grouped_expert_rows

    w_up, w_gate, w_down = experts._weights(got.dtype)
    b_up, b_gate, b_down = (None if b is None else b.to(got.dtype) for b in (experts.b_up, experts.b_gate, experts.b_down))
    offsets = torch.cat([local_counts.new_zeros(1), local_counts.cumsum(0)])  # [E_l + 1], on the device
    return grouped_expert_rows(got, order, offsets, w_up, w_gate, b_up, b_gate, w_down, b_down,
                               experts.activation)  # [M, d] in arrival order
