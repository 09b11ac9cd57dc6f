"""Balanced top-k assignment: every token to k distinct experts, every expert exactly its share of the T*k choices
(or, with a capacity slack, at most ceil(c * T*k / E) of them).

Shape legend: T tokens, E experts, k choices per token, C = ceil(T*k / E) slots per expert, F free tokens,
S = sum(cap) - T*k spare slots (0 without slack), R = T + S rows of the auction.

The b-matching behind BASE layers with k slots per token (routing/base_layers.py):
    maximise sum_{t,e} s[t,e] x[t,e]   subject to   sum_e x[t,e] = k,   sum_t x[t,e] = cap[e],   x in {0, 1}.
Its LP dual over expert prices p is D(p) = sum_t topk_sum(s[t] - p) + sum_e cap[e] p[e] (a token's best k
experts at the prices), so an assignment where every token holds k experts each within eps of its best
non-held one under p, and every expert is full, is within T*k*eps of the optimum (the gap is
sum_t topk_sum(s[t] - p) - sum_{held} (s - p) <= k * eps per token). For k = 1 this is the transportation
problem routing.assignment.auction_assignment solves; this solver handles any k and is the faster one there too.

Two parts, both pure functions of the scores (no state between calls, so resumption stays bit-exact):
1. a warm start: damped Jacobi coordinate descent on D(p). For each expert alone, the price that gives it
   exactly cap[e] tokens is between the cap[e]-th and (cap[e]+1)-th largest margin s[t,e] - theta_t(-e) (theta:
   the token's k-th best value among the other experts); all experts move there at once (damped after the
   first steps). Where all
   tokens look alike (the unigram phase, docs/routing_defaults.md) the old auction spent hundreds of rounds of
   price war finding these prices; a few of these steps find them to a fraction of the token spread.
2. Bertsekas' auction from those prices with eps scaling. Free tokens bid once a round for their best
   non-held expert at s[t,e] - (second best non-held value) + eps (Jacobi rounds while many are free, serial
   bids on per-expert heaps for the short end of a phase). A token evicted from an expert it held while
   it bid for another can leave that other bid eps-stale, so a phase ends only when a re-bid of every holder
   against its expert's price (the complementary-slackness check) frees nobody.

Capacity slack (cap summing to more than T*k: every expert AT MOST cap[e], slack_capacity). The dual is then
D(p) over p >= 0, and the gap of an assignment adds sum_e p[e] * (empty slots of e): an expert that is not full
must have price 0. The forward auction from all prices 0, in one phase at the final eps, keeps that (an expert's
price rises only once it is full), but the slackness check can free a holder of an expert that then stays
short at a raised price; such experts are lowered (a reverse-auction step, _Auction.drop_spare) until that part
of the gap is at most T*k*eps, so the total is within T*k*eps*(2 + CHECK_SLACK) of the optimum. On diverse
logits that takes about one bid per choice (faster than the exact balance's eps scaling); where tokens look alike
it is a price war at the final eps (~500 bids per choice), so after FLOOR_BIDS per choice, or where the drops do
not settle in DROP_ROUNDS, the solver falls back to an exact and slower form: S dummy rows that take one expert each take the
spare slots, and the equality problem above over T + S rows is solved (a dummy's value does not depend on where
it sits, so the real rows are an optimum of the inequality problem). Dummy d scores DUMMY_SPREAD * eps * u[d, e],
u a fixed pseudo-random [0, 1) table, so that dummies do not all bid for the same cheapest expert each round;
that costs at most S * DUMMY_SPREAD * eps of the real rows' total.
"""
from __future__ import annotations

import heapq
import math
from typing import Optional

import numpy as np
import torch
from torch import Tensor

AUCTION_REL_EPS = 1e-4  # final eps, as a fraction of the logit spread (routing.assignment's default)
EPS_FACTOR = 16.0  # eps scaling: each phase divides eps by at most this (equal steps down to the final eps)
WARM_ITERS = 8  # Jacobi steps of the dual warm start
WARM_FULL_STEPS = 2  # the first steps go all the way to each expert's own balancing price (far from the optimum)
WARM_DAMPING = 0.6  # later steps go this fraction of the way (a full step oscillates near the optimum; measured in
# docs/routing_defaults.md: 8 steps leave 2-22 of the 2,048-16,384 choices over capacity at E = 32-256)
WARM_GOOD = 0.01  # the warm start stops once at most this fraction of the T*k choices is over capacity
SERIAL_BELOW = 32  # free tokens below which bids go one at a time (cheaper than a vectorised round)
MAX_ROUNDS = 100_000  # a safety net per phase; real phases take tens of rounds
CHECK_SLACK = 0.125  # fraction of eps by which a holder's re-bid may miss its price (rounding; see _Auction.rebid)
NEG_INF = float("-inf")
FLOOR_BIDS = 8  # the floor auction's bids per choice before the dummy-row fallback (diverse logits: ~1; alike: ~500)
DROP_ROUNDS = 50  # capacity slack: price drops before the solver falls back to dummy rows (see the docstring)
DUMMY_SPREAD = 1.0  # dummy rows' scores span this many final eps (see the module docstring)
DUMMY_SEED = 0  # seed of the dummy rows' table (fixed: the solver stays a pure function of its inputs)


def topk_capacity(num_tokens: int, num_experts: int, k: int, device: Optional[torch.device] = None) -> Tensor:
    """[E] long slot counts summing to T*k: floor(T*k/E) each, plus one for the first (T*k mod E) experts."""
    base, extra = divmod(num_tokens * k, num_experts)
    return base + (torch.arange(num_experts, device=device) < extra).long()


def slack_capacity(num_tokens: int, num_experts: int, k: int, slack: float,
                   device: Optional[torch.device] = None) -> Tensor:
    """[E] long upper bounds on each expert's choices: min(T, ceil(slack * T*k/E)); slack <= 1 (or 0, the
    config's "no slack") is the exact balance of topk_capacity."""
    if slack <= 1.0:
        return topk_capacity(num_tokens, num_experts, k, device)
    c = min(num_tokens, math.ceil(slack * num_tokens * k / num_experts - 1e-9))  # 1e-9: 1.25 * 64 is 80, not 81
    return torch.full((num_experts,), c, dtype=torch.long, device=device)


def _kth_margin(v: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """v [T, E] values s - p -> (theta [T, E]: the token's k-th best value among the experts other than e;
    in_topk [T, E] bool: e is among t's k best, ties counted in)."""
    top = v.topk(k + 1, dim=1).values  # [T, k+1]
    in_topk = v >= top[:, k - 1 : k]
    return torch.where(in_topk, top[:, k : k + 1], top[:, k - 1 : k]), in_topk


def _margins(v: Tensor, k: int, real: int) -> tuple[Tensor, Tensor]:
    """_kth_margin with k for the first `real` rows and 1 for the dummy rows after them."""
    if real == v.shape[0]:
        return _kth_margin(v, k)
    theta, in_topk = _kth_margin(v[:real], k)
    theta_d, in_d = _kth_margin(v[real:], 1)
    return torch.cat([theta, theta_d]), torch.cat([in_topk, in_d])


def warm_prices(s: Tensor, k: int, cap: Tensor, iters: int = WARM_ITERS, real: Optional[int] = None) -> Tensor:
    """[E] prices near a minimiser of the dual D(p) (see the module docstring); s [R, E] fp32, 1 <= cap[e] < R;
    rows from `real` on (default: none) are dummies that take one expert each.
    Stops early once the greedy top-k under the prices puts at most WARM_GOOD of the choices over capacity."""
    T, E = s.shape
    real = T if real is None else real
    choices = real * k + (T - real)
    p = torch.zeros(E, dtype=s.dtype, device=s.device)
    cols = torch.arange(E, device=s.device)
    depth = min(int(cap.max()) + 1, T)
    hi_rank, lo_rank = (cap - 1).clamp(max=depth - 1), cap.clamp(max=depth - 1)  # the cap-th and (cap+1)-th largest
    for i in range(iters):
        theta, in_topk = _margins(s - p, k, real)
        if int((in_topk.sum(0) - cap).clamp(min=0).sum()) <= WARM_GOOD * choices:
            break
        margin = s - theta  # [T, E]: t takes e iff p[e] < margin[t, e]
        ranked = margin.topk(depth, dim=0).values  # [depth, E], descending
        target = 0.5 * (ranked[hi_rank, cols] + ranked[lo_rank, cols])
        p = p + (1.0 if i < WARM_FULL_STEPS else WARM_DAMPING) * (target - p)
    return p - p.mean()  # only differences matter


class _OverBudget(Exception):
    """The floor auction placed more than its budget of bids (see _phases)."""


class _Auction:
    """The auction's state over the L experts that have slots; methods advance it at a given eps."""

    def __init__(self, s: Tensor, k: int, cap: Tensor, prices: Tensor, real: int):
        self.s, self.k, self.cap = s, k, cap  # s [R, L]: the real rows, then the dummies (one choice each)
        T, L = s.shape
        C = int(cap.max())
        dev = s.device
        self.exists = torch.arange(C, device=dev)[None, :] < cap[:, None]  # [L, C] real slots
        self.empty = torch.where(self.exists, NEG_INF, float("inf"))  # an empty slot -inf, past capacity +inf
        self.prices = prices.clone()  # [L]
        self.slot_bid = self.empty.clone()  # [L, C] bids of each expert's holders
        self.slot_tok = torch.full((L, C), -1, dtype=torch.long, device=dev)  # [L, C] the holders (-1 empty)
        self.held = torch.zeros(T, L, dtype=torch.bool, device=dev)  # [T, L] whether t holds a slot of e
        self.need = torch.full((T,), k, dtype=torch.long, device=dev)  # [R] choices still to place
        self.need[real:] = 1
        self.s_np: Optional[np.ndarray] = None  # the scores as numpy, for the serial bidder (made on first use)
        self.bids = 0  # bids placed so far (vectorised and serial)
        self.max_bids: Optional[int] = None  # beyond this many, _OverBudget (the floor auction's price war)

    def _count(self, bids: int) -> None:
        self.bids += bids
        if self.max_bids is not None and self.bids > self.max_bids:
            raise _OverBudget

    def _set_prices(self) -> None:
        # A full expert's price is its lowest held bid; one with an empty slot keeps the price it had.
        self.prices = torch.where(self.slot_bid[:, 0] > NEG_INF, self.slot_bid[:, 0], self.prices)

    def rounds(self, eps: float) -> None:
        """Jacobi rounds: every token with a choice to place bids for its best non-held expert."""
        s, dev = self.s, self.s.device
        L, C = self.slot_bid.shape
        cols = torch.arange(C, device=dev)
        for _ in range(MAX_ROUNDS):
            free = (self.need > 0).nonzero().flatten()
            F = free.numel()
            if F <= SERIAL_BELOW:
                return
            self._count(F)
            top = (s[free] - self.prices).masked_fill(self.held[free], NEG_INF).topk(2, dim=1)  # [F, 2]
            best = top.indices[:, 0]
            bid = s[free, best] - top.values[:, 1] + eps  # price + (v1 - v2) + eps
            order = torch.argsort(best, stable=True)
            best, bid, tok = best[order], bid[order], free[order]
            m = torch.bincount(best, minlength=L)  # [L] new bids per expert
            M = int(m.max())
            pos = torch.arange(F, device=dev) - (torch.cumsum(m, 0) - m)[best]
            new_bid = torch.full((L, M), float("inf"), device=dev).index_put_((best, pos), bid)
            new_tok = torch.full((L, M), -1, dtype=torch.long, device=dev).index_put_((best, pos), tok)
            # Each expert keeps its cap[e] highest bids among holders and newcomers: the m_e lowest of the row
            # go (an empty slot, -inf, goes first and releases nobody).
            all_bid, idx = torch.cat([self.slot_bid, new_bid], 1).sort(dim=1, stable=True)
            all_tok = torch.cat([self.slot_tok, new_tok], 1).gather(1, idx)
            keep = cols[None, :] + m[:, None]
            self.slot_bid, self.slot_tok = all_bid.gather(1, keep), all_tok.gather(1, keep)
            self._set_prices()
            self.held[tok, best] = True
            self.need[tok] -= 1
            gone = (torch.arange(M, device=dev)[None, :] < m[:, None]) & (all_tok[:, :M] >= 0)  # [L, M] released
            out_e, out_j = gone.nonzero(as_tuple=True)
            out_t = all_tok[out_e, out_j]
            self.held[out_t, out_e] = False
            self.need.index_add_(0, out_t, torch.ones_like(out_t))
        raise RuntimeError(f"balanced top-k auction did not converge in {MAX_ROUNDS} rounds (eps={eps:g})")

    def serial(self, eps: float) -> None:
        """Gauss-Seidel bids, one at a time, on min-heaps of the experts' held bids, until nothing is free.

        The end of a phase is a chain of single evictions; one bid here is a handful of numpy operations on an
        [L] row (microseconds) where a vectorised round costs a dozen tensor operations."""
        waiting = (self.need > 0).nonzero().flatten()
        queue = [t for t, n in zip(waiting.tolist(), self.need[waiting].tolist()) for _ in range(n)]
        if not queue:
            return
        cap = self.cap.tolist()
        if self.s_np is None:
            self.s_np = self.s.cpu().numpy()
        s = self.s_np
        price = self.prices.cpu().numpy().astype(np.float64)
        touched = set(queue)  # tokens whose held set may change, written back at the end
        held = self.held.cpu().numpy()  # [T, L] bool (on CPU the tensor's own memory), updated in place
        heaps: dict[int, list[tuple[float, int]]] = {}
        for _ in range(MAX_ROUNDS):
            if not queue:
                break
            t = queue.pop()
            self._count(1)
            v = s[t] - price
            v[held[t]] = NEG_INF
            e1 = int(v.argmax())
            v[e1] = NEG_INF
            v2 = v.max()
            heap = heaps.get(e1)
            if heap is None:
                heap = heaps[e1] = list(zip(self.slot_bid[e1, : cap[e1]].tolist(), self.slot_tok[e1, : cap[e1]].tolist()))
                heapq.heapify(heap)  # the lowest held bid (an empty slot's -inf first) is what a newcomer displaces
            _, out = heapq.heappushpop(heap, (float(s[t, e1] - v2 + eps), t))  # beats the lowest
            held[t, e1] = True
            if heap[0][0] > NEG_INF:
                price[e1] = heap[0][0]
            if out >= 0:
                held[out, e1] = False
                touched.add(out)
                queue.append(out)
        else:
            raise RuntimeError(f"balanced top-k auction did not converge in {MAX_ROUNDS} serial bids (eps={eps:g})")
        self.slot_bid, self.slot_tok = self.slot_bid.clone(), self.slot_tok.clone()
        for e, heap in heaps.items():  # write back the experts that received bids (heap order: rows need no order)
            held_bid, held_tok = zip(*heap)
            self.slot_bid[e, : cap[e]] = torch.tensor(held_bid, dtype=self.s.dtype)
            self.slot_tok[e, : cap[e]] = torch.tensor(held_tok, dtype=torch.long)
        rows = torch.tensor(sorted(touched), dtype=torch.long)
        self.held[rows] = torch.from_numpy(held[rows.numpy()]).to(self.held.device)
        self.need.zero_()
        self.prices = torch.tensor(price, dtype=self.s.dtype, device=self.s.device)

    def rebid(self, eps: float) -> int:
        """Every holder bids again at eps against its expert's price, competing with its token's best non-held
        expert; those whose bid still reaches the price keep their slot at the new bid, the rest are freed.
        Returns how many were freed."""
        L = self.prices.shape[0]
        best_other = (self.s - self.prices).masked_fill(self.held, NEG_INF).amax(1)  # [T] best non-held value
        tok = self.slot_tok.clamp(min=0)  # [L, C]
        expert = torch.arange(L, device=self.s.device)[:, None].expand_as(tok)
        again = self.s[tok, expert] - best_other[tok] + eps  # [L, C]
        # The serial bids are Python floats stored in fp32: a holder whose bid was exact may miss the price by
        # rounding, which would free it again and again. CHECK_SLACK of eps absorbs that (the bound grows by it).
        filled = self.exists & (self.slot_tok >= 0)  # with a capacity slack some slots stay empty
        ok = filled & (again >= self.prices[:, None] - CHECK_SLACK * eps)
        lost = filled & ~ok
        self.held[self.slot_tok[lost], expert[lost]] = False
        self.need.index_add_(0, self.slot_tok[lost], torch.ones_like(self.slot_tok[lost]))
        self.slot_bid, idx = torch.where(ok, again, self.empty).sort(dim=1, stable=True)
        self.slot_tok = torch.where(ok, self.slot_tok, -1).gather(1, idx)
        self._set_prices()
        return int(lost.sum())

    def solve_phase(self, eps: float) -> None:
        """Bids until every token holds k experts; for k > 1 then the slackness check (see the module
        docstring), repeated until it frees nobody. For k = 1 no token holds another expert while it bids, so
        every holder's slackness holds from its bid on and the check is skipped."""
        for _ in range(MAX_ROUNDS):
            self.rounds(eps)
            self.serial(eps)
            if self.k == 1 or self.rebid(eps) == 0:
                return
        raise RuntimeError(f"balanced top-k auction did not settle (eps={eps:g})")

    def spare_gap(self) -> float:
        """Capacity slack: sum over experts with empty slots of price * empty slots, what the dual bound adds to
        the eps-slackness gap (complementary slackness of "at most cap[e]" wants price 0 there)."""
        spare = (self.exists & (self.slot_tok < 0)).sum(1)  # [L] empty slots
        return float((self.prices.clamp(min=0.0) * spare).sum())

    def drop_spare(self, eps: float) -> None:
        """Lowers each expert with n > 0 empty slots and a price above 0 to max(0, 2 eps below the price at which
        its n-th most eager non-holder would swap its worst held expert for it): coordinate descent on the dual,
        a reverse-auction step (to 0 at once, every token would rush the expert and the next step would undo it);
        the 2 eps make those tokens fail rebid's check."""
        spare = (self.exists & (self.slot_tok < 0)).sum(1)  # [L]
        high = (spare > 0) & (self.prices > 0)
        v = self.s - self.prices  # [R, L]
        worst = v.masked_fill(~self.held, float("inf")).amin(1)  # [R] each token's worst held value
        entry = (self.s - worst[:, None]).masked_fill(self.held, NEG_INF)[:, high]  # [R, H] price drawing t to e
        n = spare[high]
        ranked = entry.topk(min(int(n.max()), entry.shape[0]), dim=0).values  # [depth, H], descending
        target = (ranked.gather(0, (n - 1).clamp(max=ranked.shape[0] - 1)[None, :])[0] - 2 * eps).clamp(min=0.0)
        self.prices = self.prices.clone()
        self.prices[high] = torch.minimum(self.prices[high], target)

    def solve_floor_phase(self, eps: float, tol: float) -> bool:
        """solve_phase for a capacity slack, then, while spare_gap() > tol, drop_spare and re-check the holders
        against the cheaper experts (rebid) and bid again. False if that does not settle within DROP_ROUNDS
        (prices fall as well as rise here, so no bound on the rounds is known)."""
        self.solve_phase(eps)
        for _ in range(DROP_ROUNDS):
            if self.spare_gap() <= tol:
                return True
            self.drop_spare(eps)
            self.rebid(eps)
            self.solve_phase(eps)
        return False


def _dummy_rows(rows: int, experts: int, scale: float, device: torch.device) -> Tensor:
    """[rows, experts] fp32 scores of the dummy rows: scale * a fixed pseudo-random [0, 1) table."""
    g = torch.Generator().manual_seed(DUMMY_SEED)
    return (scale * torch.rand(rows, experts, generator=g)).to(device)


@torch.no_grad()
def balanced_topk_assignment(scores: Tensor, k: int, capacity: Tensor, eps: Optional[float] = None,
                             warm_iters: int = WARM_ITERS) -> tuple[Tensor, Tensor]:
    """The b-matching of the module docstring: scores [T, E] (any float dtype; solved in fp32), capacity [E] long
    summing to T*k (topk_capacity: every expert exactly capacity[e]) or more (slack_capacity: at most
    capacity[e]). Returns (expert [T, k] long, each row k distinct experts in descending score order, every
    expert e in exactly (at most, with slack) capacity[e] rows; prices [E] fp32, +inf for an expert without
    slots). The total score is within T*k*eps*(1 + CHECK_SLACK) of the optimum (with slack: T*k*eps*(2 +
    CHECK_SLACK), or on the dummy-row fallback (T*k + S)*eps*(1 + CHECK_SLACK) + S*eps*DUMMY_SPREAD, S spare
    slots); eps defaults to AUCTION_REL_EPS times the score spread."""
    T, E = scores.shape
    if not 1 <= k <= E:
        raise ValueError(f"model.moe.router.top_k={k} must be between 1 and the {E} experts")
    spare = int(capacity.sum()) - T * k
    if spare < 0:
        raise ValueError(f"expert capacities sum to {int(capacity.sum())}, fewer than the {T} tokens x k={k}")
    if capacity.numel() and int(capacity.max()) > T:
        raise ValueError(f"an expert capacity of {int(capacity.max())} exceeds the {T} tokens (each token once)")
    device = scores.device
    prices = torch.full((E,), float("inf"), device=device)
    if T == 0:
        return torch.zeros(0, k, dtype=torch.long, device=device), prices.masked_fill(capacity > 0, 0.0)
    live = (capacity > 0).nonzero().flatten()  # experts without a slot take no part
    s = scores.detach().float()[:, live]
    L = live.numel()
    if L == k:  # every token takes every live expert
        prices[live] = 0.0
        return live[None, :].expand(T, k).contiguous(), prices
    spread = float(s.max() - s.min())
    if not math.isfinite(spread):
        raise FloatingPointError("BASE routing got non-finite router logits (the router diverged): lower the learning "
                                 "rate or clip the gradients")
    cap = capacity[live]
    if spread == 0.0:  # every assignment is optimal: deal the choices out round-robin
        flat = live.repeat_interleave(cap)[: T * k]  # [T*k], each expert's copies together (truncated: slack)
        expert = flat.view(k, T).t()  # token t gets flat[t], flat[T + t], ...: distinct since cap[e] <= T
        prices[live] = 0.0
        return expert.contiguous(), prices
    eps_final = eps if eps is not None else AUCTION_REL_EPS * spread
    auction = None
    if spare > 0:  # at most cap[e]: the floor auction, else (rarely) dummy rows (module docstring)
        auction = _phases(s, k, cap, spread, eps_final, warm_iters, T, floor=True)
        if auction is None:
            s = torch.cat([s, _dummy_rows(spare, L, DUMMY_SPREAD * eps_final, device)])
    if auction is None:
        auction = _phases(s, k, cap, spread, eps_final, warm_iters, T, floor=False)
    assert auction is not None
    held = auction.held[:T]  # [T, L], exactly k per row, at most (without slack exactly) cap[e] per column
    load = held.sum(0)
    assert bool((held.sum(1) == k).all()) and bool((load <= cap).all()), "auction left choices unplaced"
    order = s[:T].masked_fill(~held, NEG_INF).topk(k, dim=1).indices  # [T, k] the held experts, best first
    room = load < cap  # with slack: the experts not full, whose price the dual wants at 0
    # The dummy rows' prices are relative (an equality problem): shifted so those experts' lowest is 0.
    prices[live] = auction.prices - auction.prices[room].min() if spare > 0 and bool(room.any()) else auction.prices
    return live[order], prices


def _phases(s: Tensor, k: int, cap: Tensor, spread: float, eps_final: float, warm_iters: int, real: int,
            floor: bool) -> Optional[_Auction]:
    """The warm start and the eps-scaled phases down to eps_final; s [R, L] (rows from `real` on: dummies).
    floor: the capacity-slack auction without dummies, cold (all prices 0) and one phase at eps_final (None
    where its price drops do not settle): an expert that never fills then keeps price 0, as the dual wants.
    Warm prices or coarser phases leave experts with empty slots above 0, and lowering them did not settle
    (docs/routing_defaults.md)."""
    if floor:
        auction = _Auction(s, k, cap, torch.zeros(s.shape[1], device=s.device), real)
        auction.max_bids = FLOOR_BIDS * real * k
        try:
            return auction if auction.solve_floor_phase(eps_final, real * k * eps_final) else None
        except _OverBudget:  # alike tokens: a price war at the final eps; the dummy rows' eps scaling is faster
            return None
    p0 = warm_prices(s, k, cap, warm_iters, real) if warm_iters > 0 else torch.zeros(s.shape[1], device=s.device)
    auction = _Auction(s, k, cap, p0, real)
    # A coarse eps first, relative to what the warm start leaves: the token-dependent spread of s - p.
    residual = float(((s[:real] - p0).amax(1) - (s[:real] - p0).amin(1)).max())
    start = max(min(spread, residual) / EPS_FACTOR, eps_final)
    phases = max(1, math.ceil(math.log(start / eps_final) / math.log(EPS_FACTOR) - 1e-9) + 1)
    factor = (start / eps_final) ** (1.0 / max(phases - 1, 1))  # <= EPS_FACTOR, equal steps down to eps_final
    for i in range(phases):
        cur = eps_final if i == phases - 1 else start / factor**i
        if i > 0:
            auction.rebid(cur)  # the holders that still satisfy the finer slackness keep their slots, at a new bid
        auction.solve_phase(cur)
    return auction
