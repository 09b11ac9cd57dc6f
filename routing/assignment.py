"""Balanced assignment of tokens to experts, the solvers behind BASE layers (routing/base_layers.py).

Shape legend: T tokens, E experts, C = ceil(T / E) slots per expert.

Bertsekas' auction algorithm for the transportation problem (E experts of C_e identical slots, tokens bidding
for experts, epsilon scaling), the Sinkhorn approximation of S-BASE (Clark et al. 2022) and the greedy balanced
rounding that makes a fractional plan meet the slot counts exactly. Pure functions of their scores: no state is
carried between calls, so routing never depends on history and resumption stays bit-exact.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from routing.counts import count_ids
from routing.sinkhorn import sinkhorn

AUCTION_REL_EPS = 1e-4  # final epsilon of the auction, as a fraction of the logit spread (max - min)
AUCTION_EPS_FACTOR = 64.0  # epsilon scaling: each phase divides epsilon by this
AUCTION_MAX_ROUNDS = 100_000  # a safety net per phase (rounds, or serial bids); real phases take tens to hundreds
AUCTION_SERIAL_BELOW = 32  # free tokens below which bids go one at a time (cheaper than a vectorised round)


def balanced_capacity(num_tokens: int, num_experts: int, device: Optional[torch.device] = None) -> Tensor:
    """[E] long slot counts summing to T: floor(T/E) each, plus one for the first T mod E experts."""
    base, extra = divmod(num_tokens, num_experts)
    return base + (torch.arange(num_experts, device=device) < extra).long()


# ---------------------------------------------------------------- auction
#
# Tokens bid for experts (Bertsekas' auction for the transportation problem: E objects with C_e identical
# slots each). State: for each expert the bids of its holders in a [E, C] slot matrix, rows in any order (an empty
# slot holds -inf, a slot past the expert's capacity +inf). An expert's price is its lowest held bid once it is full,
# the price it started the phase with before; a bid always beats the current price, so prices never fall.
# Invariant (eps-complementary slackness): every held token t of expert e satisfies
#     s[t, e] - price[e] >= max_{e' != e} (s[t, e'] - price[e']) - eps,
# because its bid was s[t, e] - (that max at bid time) + eps >= price[e], and the max only falls as prices rise.
# When every token is held, summing the slack over tokens bounds the distance to the optimum by T * eps.


@dataclass(frozen=True)
class AuctionState:
    """What the auction carries from round to round and phase to phase, over the L experts that have slots."""

    prices: Tensor  # [L] each expert's price
    slot_bid: Tensor  # [L, C] the bids of each expert's holders (-inf an empty slot, +inf past its capacity)
    slot_tok: Tensor  # [L, C] long, the token holding each slot (-1: empty)
    free: Tensor  # [F] long, the tokens that hold no slot


def _bid_rounds(s: Tensor, state: AuctionState, eps: float) -> AuctionState:
    """Jacobi rounds (all free tokens bid at once) while many tokens are free; returns the updated state."""
    prices, slot_bid, slot_tok, free = state.prices, state.slot_bid, state.slot_tok, state.free
    E, C = slot_bid.shape
    cols = torch.arange(C, device=s.device)
    for _ in range(AUCTION_MAX_ROUNDS):
        F = free.numel()
        if F <= AUCTION_SERIAL_BELOW:
            return AuctionState(prices, slot_bid, slot_tok, free)
        top = (s[free] - prices).topk(2, dim=1)  # [F, 2]: best and second-best value under the current prices
        best = top.indices[:, 0]
        bid = s[free, best] - top.values[:, 1] + eps  # Bertsekas' bid: price + (v1 - v2) + eps
        order = torch.argsort(best, stable=True)
        best, bid, tok = best[order], bid[order], free[order]
        m = torch.bincount(best, minlength=E)  # [E] new bids per expert
        M = int(m.max())
        pos = torch.arange(F, device=s.device) - (torch.cumsum(m, 0) - m)[best]
        new_bid = torch.full((E, M), float("inf"), device=s.device).index_put_((best, pos), bid)
        new_tok = torch.full((E, M), -1, dtype=torch.long, device=s.device).index_put_((best, pos), tok)
        # Each expert keeps its C_e highest bids among holders and newcomers: drop the m_e lowest of the row
        # (an empty slot, -inf, goes first and releases nobody).
        all_bid, idx = torch.cat([slot_bid, new_bid], 1).sort(dim=1, stable=True)
        all_tok = torch.cat([slot_tok, new_tok], 1).gather(1, idx)
        keep = cols[None, :] + m[:, None]
        slot_bid, slot_tok = all_bid.gather(1, keep), all_tok.gather(1, keep)
        prices = torch.where(slot_bid[:, 0] > float("-inf"), slot_bid[:, 0], prices)
        out = all_tok[:, :M][torch.arange(M, device=s.device)[None, :] < m[:, None]]
        free = out[out >= 0]
    raise RuntimeError(f"auction did not converge in {AUCTION_MAX_ROUNDS} rounds (eps={eps:g})")


def _bid_serial(s: Tensor, state: AuctionState, eps: float, capacity: list[int],
                rows: dict[int, list[float]]) -> AuctionState:
    """Gauss-Seidel bids, one token at a time, with a min-heap of bids per expert, until no token is free.

    The end of a phase is a chain of single evictions (a token displaces one, which displaces another ...); one
    bid here costs microseconds of Python where a vectorised round costs a dozen tensor operations. Heaps are
    built only for the experts that receive a bid; rows caches the score rows already fetched (t -> [E]).
    """
    slot_bid, slot_tok = state.slot_bid, state.slot_tok
    E = slot_bid.shape[0]
    price = state.prices.tolist()
    heaps: dict[int, list[tuple[float, int]]] = {}
    queue = state.free.tolist()
    missing = [t for t in queue if t not in rows]
    if missing:
        rows.update(zip(missing, s[missing].tolist()))
    neg_inf = float("-inf")
    for _ in range(AUCTION_MAX_ROUNDS):
        if not queue:
            break
        t = queue.pop()
        row = rows.get(t)
        if row is None:
            row = rows[t] = s[t].tolist()
        v1 = v2 = neg_inf
        e1 = 0
        for e in range(E):
            v = row[e] - price[e]
            if v > v1:
                v1, v2, e1 = v, v1, e
            elif v > v2:
                v2 = v
        heap = heaps.get(e1)
        if heap is None:
            cap = capacity[e1]
            heap = heaps[e1] = list(zip(slot_bid[e1, :cap].tolist(), slot_tok[e1, :cap].tolist()))
            heapq.heapify(heap)  # the lowest held bid (an empty slot's -inf first) is what a newcomer displaces
        _, out = heapq.heappushpop(heap, (row[e1] - v2 + eps, t))  # the bid beats the lowest held one
        if heap[0][0] > neg_inf:
            price[e1] = heap[0][0]
        if out >= 0:
            queue.append(out)
    else:
        raise RuntimeError(f"auction did not converge in {AUCTION_MAX_ROUNDS} serial bids (eps={eps:g})")
    slot_bid, slot_tok = slot_bid.clone(), slot_tok.clone()
    for e, heap in heaps.items():  # write back the experts that received bids (heap order: rows need no order)
        held_bid, held_tok = zip(*heap)
        slot_bid[e, : capacity[e]] = torch.tensor(held_bid, dtype=s.dtype)
        slot_tok[e, : capacity[e]] = torch.tensor(held_tok, dtype=torch.long)
    return AuctionState(torch.tensor(price, dtype=s.dtype, device=s.device), slot_bid, slot_tok, state.free[:0])


def _rebid_holders(s: Tensor, state: AuctionState, eps: float, exists: Tensor, expert_of_slot: Tensor,
                   empty: Tensor) -> AuctionState:
    """The start of a finer phase: every holder bids again at the new eps against its expert's current price;
    those whose bid still reaches it keep their slot (re-sorted), the rest are freed."""
    L = state.prices.shape[0]
    tok = state.slot_tok.clamp(min=0)
    value = s[tok] - state.prices  # [L, C, L]: every held token's value of every expert
    other = value.masked_fill(torch.eye(L, dtype=torch.bool, device=s.device)[:, None, :], float("-inf")).amax(-1)
    rebid = s[tok, expert_of_slot] - other + eps  # [L, C]
    ok = exists & (rebid >= state.prices[:, None])
    free = state.slot_tok[exists & ~ok]
    slot_bid, idx = torch.where(ok, rebid, empty).sort(dim=1, stable=True)
    slot_tok = torch.where(ok, state.slot_tok, -1).gather(1, idx)
    prices = torch.where(slot_bid[:, 0] > float("-inf"), slot_bid[:, 0], state.prices)
    return AuctionState(prices, slot_bid, slot_tok, free)


@torch.no_grad()
def auction_assignment(scores: Tensor, capacity: Tensor, eps: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """Balanced assignment maximising total affinity, by the auction algorithm with epsilon scaling.

    scores [T, E] (any float dtype; solved in fp32), capacity [E] long summing to T (balanced_capacity).
    Returns (expert [T] long with exactly capacity[e] tokens per expert, prices [E] fp32). Every token's
    expert e satisfies scores[t, e] - prices[e] >= max_e' (scores[t, e'] - prices[e']) - eps, so the total
    affinity is within T * eps of the optimum (linear-programming duality). eps defaults to
    AUCTION_REL_EPS times the spread of the scores.
    """
    T, E = scores.shape
    if int(capacity.sum()) != T:
        raise ValueError(f"expert capacities sum to {int(capacity.sum())}, not to the {T} tokens")
    device = scores.device
    prices = torch.zeros(E, device=device)
    live = (capacity > 0).nonzero().flatten()  # experts without a slot (T < E) take no part
    prices[capacity == 0] = float("inf")
    if T == 0 or live.numel() == 1:
        return live[torch.zeros(T, dtype=torch.long, device=device)], prices
    s, cap = scores.detach().float()[:, live], capacity[live]
    spread = float(s.max() - s.min())
    if not math.isfinite(spread):
        raise FloatingPointError("BASE routing got non-finite router logits (the router diverged): lower the learning "
                                 "rate or clip the gradients")
    if spread == 0.0:  # every balanced assignment is optimal: fill the experts in token order
        return live.repeat_interleave(cap), prices
    eps_final = eps if eps is not None else AUCTION_REL_EPS * spread
    L, C = live.numel(), int(cap.max())
    exists = torch.arange(C, device=device)[None, :] < cap[:, None]  # [L, C] real slots
    expert_of_slot = torch.arange(L, device=device)[:, None].expand(L, C)
    empty = torch.where(exists, float("-inf"), float("inf"))
    cap_list, rows = cap.tolist(), {}  # rows: score rows fetched by the serial bidder, kept across phases
    state = AuctionState(torch.zeros(L, device=device), empty, torch.full((L, C), -1, dtype=torch.long, device=device),
                         torch.arange(T, device=device))
    # Epsilon scaling (Bertsekas 1988): a coarse eps settles the prices in a few rounds; each finer phase starts
    # from the previous prices and keeps the holders that still satisfy the finer eps-slackness, at a new bid.
    cur = max(spread / AUCTION_EPS_FACTOR, eps_final)
    while True:
        state = _bid_rounds(s, state, cur)
        if state.free.numel():
            state = _bid_serial(s, state, cur, cap_list, rows)
        if cur <= eps_final:
            break
        cur = max(cur / AUCTION_EPS_FACTOR, eps_final)
        state = _rebid_holders(s, state, cur, exists, expert_of_slot, empty)
    owner = torch.empty(T, dtype=torch.long, device=device)
    owner[state.slot_tok[exists]] = expert_of_slot[exists]
    prices[live] = state.prices
    return live[owner], prices


# ---------------------------------------------------------------- Sinkhorn + rounding


@torch.no_grad()
def balanced_rounding(plan: Tensor, capacity: Tensor) -> Tensor:
    """Greedy rounding of a fractional plan [T, E] to an assignment with exactly capacity[e] tokens per expert.

    Rounds of proposals: every unassigned token proposes to its highest-mass expert that still has room, and each
    expert accepts its proposers with the most mass, up to its room. A round that rejects anyone fills an expert,
    and once one expert has room it can take all the rest, so at most E rounds; the result is always complete.
    """
    T, E = plan.shape
    device = plan.device
    expert = torch.full((T,), -1, dtype=torch.long, device=device)
    room = capacity.clone()
    positions = torch.arange(T, device=device)
    for _ in range(E):
        free = (expert < 0).nonzero().flatten()
        if free.numel() == 0:
            break
        mass = plan[free].masked_fill(room[None, :] <= 0, float("-inf"))  # [F, E]
        best_mass, choice = mass.max(dim=1)
        order = torch.argsort(best_mass, descending=True, stable=True)
        order = order[torch.argsort(choice[order], stable=True)]  # by expert, most mass first
        counts = count_ids(choice, E)
        offsets = torch.cumsum(counts, 0) - counts
        sorted_choice = choice[order]
        accept = (positions[: free.numel()] - offsets[sorted_choice]) < room[sorted_choice]
        winners = order[accept]
        expert[free[winners]] = choice[winners]
        room -= count_ids(choice[winners], E)
    assert bool((expert >= 0).all()), "balanced rounding left tokens unassigned"
    return expert


@torch.no_grad()
def sinkhorn_assignment(scores: Tensor, capacity: Tensor, iters: int) -> Tensor:
    """S-BASE: Sinkhorn plan with column masses = capacity, then balanced_rounding. Returns expert [T] long."""
    return balanced_rounding(sinkhorn(scores, iters, col_mass=capacity), capacity)
