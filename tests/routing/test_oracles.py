"""Oracles from other libraries on the same inputs (issue 17).

DeepSpeed 0.19.8's gating functions (deepspeed.moe.sharded_moe top1gating / top2gating / topkgating, one process:
no expert-parallel group, use_rts=False and no second-expert sampling so that nothing is random) against our topk
router on the same logits: kept (token, expert) pairs, combine weights, capacity and the balancing loss, after the
conventions that differ, each stated where it is asserted:

  * top1gating with use_rts=False keeps the C tokens that torch.topk picks out of an overflowing expert's 0/1 mask
    column, an order torch does not define; we keep the first C (drop_policy=position) or the C most probable
    ("probs"). So under drops only the counts, the weights and the experts that did not overflow are compared.
  * top2gating renormalises the two gates after capacity (a token that lost one choice gives the other weight 1):
    model.moe.router.renormalize_after_drop=True. Ours by default renormalises before capacity only, so the kept
    choice of such a token weighs p_j / (p_1 + p_2).
  * top2gating's l_aux counts first choices only, E * sum_e P_e * c1_e / T: balance_loss="first_choice". Our
    default (all_choices) is E * sum_e P_e * (c1_e + c2_e) / (2T), hence l_aux = 2 * ours - E * sum_e P_e * c2_e / T.
  * topkgating's l_aux counts all k choices (E^2 / k * mean(P * c / T)), which is ours exactly.
  * topkgating with drop_tokens=False is dropless with every kept gate renormalised: softmax_topk + renormalize.

transformers' MixtralSparseMoeBlock with its weights copied into our MoELayer: outputs and gradients for each
dispatcher (einsum, sorted, triton in Triton's interpreter on CPU).
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # CPU: the triton dispatcher runs in Triton's interpreter (set before import)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

ds = pytest.importorskip("deepspeed.moe.sharded_moe")
transformers = pytest.importorskip("transformers")

from moe.config import ModelConfig, MoEConfig  # noqa: E402
from moe.layer import MoELayer  # noqa: E402
from routing import RouterConfig, build_router  # noqa: E402
from routing.losses import load_balancing_loss  # noqa: E402

COEF = 0.5  # aux_loss_coef: our plan's loss is COEF * the unscaled loss


def _logits(T: int, E: int, seed: int) -> torch.Tensor:
    """Well-separated logits (no ties, no underflow): torch.topk / argmax tie rules cannot matter."""
    return 2.0 * torch.randn(T, E, generator=torch.Generator().manual_seed(seed))


def _route(logits: torch.Tensor, **cfg):
    T, E = logits.shape
    cfg.setdefault("z_loss_coef", 0.0)
    router = build_router(4, E, RouterConfig(aux_loss_coef=COEF, **cfg))
    return router.route(None, logits.clone(), None, T)


def _dense(plan, T: int, E: int):
    """plan -> (kept [T, E] bool, weight [T, E], slot [T, E] long, -1 where not kept)."""
    kept = torch.zeros(T, E, dtype=torch.bool)
    weight = torch.zeros(T, E)
    slot = torch.full((T, E), -1, dtype=torch.long)
    kept[plan.token_index, plan.expert_index] = True
    weight[plan.token_index, plan.expert_index] = plan.weight.detach()
    slot[plan.token_index, plan.expert_index] = plan.position
    return kept, weight, slot


def _ds_dense(combine: torch.Tensor, dispatch: torch.Tensor):
    """DeepSpeed's combine_weights / dispatch_mask [T, E, C] -> (kept [T, E], weight [T, E], slot [T, E])."""
    kept = dispatch.any(-1)
    slot = torch.where(kept, dispatch.float().argmax(-1), torch.full_like(kept, -1, dtype=torch.long))
    assert (dispatch.sum(-1) <= 1).all(), "one slot per (token, expert)"
    return kept, combine.sum(-1), slot


def _chosen(logits: torch.Tensor, k: int) -> torch.Tensor:
    """[T, k] each token's k best experts (no ties in _logits)."""
    return logits.topk(k, dim=-1).indices


# ------------------------------------------------------------------------------------------ DeepSpeed top1gating


@pytest.mark.parametrize("E", [4, 8])
def test_top1gating_dropless_equals_switch(E):
    """drop_tokens=False: every token kept at its argmax expert with weight p (no renormalisation), capacity the
    busiest expert's count (the einsum dispatcher's C), exp_counts our counts, l_aux our loss (1e-6)."""
    T = 32
    logits = _logits(T, E, seed=E)
    l_aux, combine, dispatch, exp_counts = ds.top1gating(logits.clone(), 1.0, 1, drop_tokens=False, use_rts=False)
    plan = _route(logits, top_k=1, order="softmax_topk", capacity_factor=0.0, min_capacity=1)
    kept, weight, slot = _dense(plan, T, E)
    d_kept, d_weight, d_slot = _ds_dense(combine, dispatch)
    assert torch.equal(kept, d_kept) and kept.sum() == T
    torch.testing.assert_close(weight, d_weight, rtol=0, atol=1e-6)
    assert torch.equal(slot, d_slot)  # token order within each expert on both sides
    assert torch.equal(plan.counts, exp_counts.long())
    assert combine.shape[-1] == int(plan.counts.max())
    assert plan.aux_losses["load_balancing_loss"].item() == pytest.approx(COEF * l_aux.item(), abs=1e-6)


@pytest.mark.parametrize("policy", ["position", "probs"])
@pytest.mark.parametrize("cf", [0.5, 1.0, 1.25, 2.0])
@pytest.mark.parametrize("E", [4, 8])
def test_top1gating_with_capacity(E, cf, policy):
    """drop_tokens=True: the same capacity ceil(T / E * cf) (min_capacity 1); per expert the same number kept,
    min(count, C); experts that did not overflow keep the same tokens; every kept token has weight p on both sides
    (1e-6); exp_counts (before capacity) our chosen counts; l_aux our loss (1e-6). Which C tokens of an overflowing
    expert survive is torch.topk's choice among equal mask values in DeepSpeed, so the sets are not compared there."""
    T = 32
    logits = _logits(T, E, seed=int(10 * cf) + E)
    l_aux, combine, dispatch, exp_counts = ds.top1gating(logits.clone(), cf, 1, drop_tokens=True, use_rts=False)
    plan = _route(logits, top_k=1, order="softmax_topk", capacity_factor=cf, min_capacity=1, drop_policy=policy)
    kept, weight, _ = _dense(plan, T, E)
    d_kept, d_weight, _ = _ds_dense(combine, dispatch)
    assert plan.capacity == combine.shape[-1]
    chosen = torch.zeros(T, E, dtype=torch.bool).scatter_(1, _chosen(logits, 1), True)
    assert torch.equal(chosen.sum(0), exp_counts.long())
    assert not (d_kept & ~chosen).any() and not (kept & ~chosen).any()
    assert torch.equal(kept.sum(0), d_kept.sum(0))
    assert torch.equal(kept.sum(0), exp_counts.long().clamp(max=plan.capacity))
    fits = exp_counts <= plan.capacity
    assert torch.equal(kept[:, fits], d_kept[:, fits])
    probs = torch.softmax(logits, -1)
    torch.testing.assert_close(weight, torch.where(kept, probs, 0.0), rtol=0, atol=1e-6)
    torch.testing.assert_close(d_weight, torch.where(d_kept, probs, 0.0), rtol=0, atol=1e-6)
    assert plan.aux_losses["load_balancing_loss"].item() == pytest.approx(COEF * l_aux.item(), abs=1e-6)


# ------------------------------------------------------------------------------------------ DeepSpeed top2gating


def _top2_case(T, E, cf, seed):
    logits = _logits(T, E, seed)
    if cf is None:
        out = ds.top2gating(logits.clone(), 1.0, 1, drop_tokens=False, top2_2nd_expert_sampling=False)
    else:
        out = ds.top2gating(logits.clone(), cf, 1, drop_tokens=True, top2_2nd_expert_sampling=False)
    plan = _route(logits, top_k=2, order="softmax_topk", renormalize=True, capacity_factor=cf or 0.0,
                  min_capacity=1, drop_policy="position")
    return logits, out, plan


@pytest.mark.parametrize("cf", [None, 0.5, 1.0, 1.25, 2.0])
@pytest.mark.parametrize("E", [4, 8])
def test_top2gating_kept_pairs_slots_capacity(E, cf):
    """GShard's top-2 (DeepSpeed, no sampling) is our softmax_topk + renormalize + drop_policy=position: the same
    kept (token, expert) pairs and the same slot of each within its expert (first choices before second choices,
    token order), capacity ceil(T / E * 2cf) or, dropless (cf None), the busiest expert's count; exp_counts our
    counts before capacity. Weights: equal (1e-6) for tokens that kept both choices; a token that lost one gets 1
    from DeepSpeed and p_j / (p_1 + p_2) from us (renormalisation before capacity, our default)."""
    T = 32
    logits, (l_aux, combine, dispatch, exp_counts), plan = _top2_case(T, E, cf, seed=E + int(8 * (cf or 0)))
    kept, weight, slot = _dense(plan, T, E)
    d_kept, d_weight, d_slot = _ds_dense(combine, dispatch)
    assert torch.equal(kept, d_kept)
    assert torch.equal(slot, d_slot)
    idx = _chosen(logits, 2)
    assert torch.equal(torch.bincount(idx.reshape(-1), minlength=E), exp_counts.long())
    if cf is None:
        assert plan.capacity is None and combine.shape[-1] == int(plan.counts.max()) and kept.sum() == 2 * T
    else:
        assert plan.capacity == combine.shape[-1]
        assert (plan.counts <= plan.capacity).all()
    n_kept = kept.sum(1)
    both = n_kept == 2
    torch.testing.assert_close(weight[both], d_weight[both], rtol=0, atol=1e-6)
    one = n_kept == 1
    p = torch.softmax(logits, -1)
    top2 = p.gather(1, idx).sum(1, keepdim=True)
    torch.testing.assert_close(d_weight[one].sum(1), torch.ones(int(one.sum())), rtol=0, atol=1e-6)
    torch.testing.assert_close(weight[one], torch.where(kept, p / top2, 0.0)[one], rtol=0, atol=1e-6)
    assert (d_weight[n_kept == 0] == 0).all() and (weight[n_kept == 0] == 0).all()
    if cf == 0.5:
        assert one.any(), "the case must exercise a token that lost one choice"


@pytest.mark.parametrize("E", [4, 8])
def test_top2gating_l_aux_first_choices(E):
    """DeepSpeed's top-2 l_aux counts first choices only: l_aux = E * sum_e P_e * c1_e / T (our load_balancing_loss
    of the first column, 1e-6), and in terms of our all-choices loss L: l_aux = 2 L - E * sum_e P_e * c2_e / T."""
    T = 32
    logits, (l_aux, *_), plan = _top2_case(T, E, 1.0, seed=100 + E)
    probs = torch.softmax(logits, -1)
    idx = _chosen(logits, 2)
    assert load_balancing_loss(probs, idx[:, :1], E).item() == pytest.approx(l_aux.item(), abs=1e-6)
    ours = plan.aux_losses["load_balancing_loss"].item() / COEF
    c2 = torch.bincount(idx[:, 1], minlength=E).float()
    second = E * (probs.mean(0) * c2 / T).sum().item()
    assert 2 * ours - second == pytest.approx(l_aux.item(), abs=1e-5)
    assert abs(ours - l_aux.item()) > 1e-3, "the case must tell the two conventions apart"


@pytest.mark.parametrize("cf", [None, 0.5, 1.0, 1.25, 2.0])
@pytest.mark.parametrize("E", [4, 8])
def test_top2gating_under_its_conventions(E, cf):
    """With DeepSpeed's two conventions switched on, renormalize_after_drop=True and balance_loss="first_choice"
    (routing=gshard's loss), our top-2 plan is top2gating's: the same kept pairs, every combine weight equal (1e-6,
    a token that lost one choice keeps 1.0 on the other) and our balancing loss its l_aux (1e-6)."""
    T = 32
    logits = _logits(T, E, seed=E + int(8 * (cf or 0)))
    if cf is None:
        l_aux, combine, dispatch, _ = ds.top2gating(logits.clone(), 1.0, 1, drop_tokens=False,
                                                    top2_2nd_expert_sampling=False)
    else:
        l_aux, combine, dispatch, _ = ds.top2gating(logits.clone(), cf, 1, drop_tokens=True,
                                                    top2_2nd_expert_sampling=False)
    plan = _route(logits, top_k=2, order="softmax_topk", renormalize=True, capacity_factor=cf or 0.0,
                  min_capacity=1, drop_policy="position", renormalize_after_drop=True, balance_loss="first_choice")
    kept, weight, slot = _dense(plan, T, E)
    d_kept, d_weight, d_slot = _ds_dense(combine, dispatch)
    assert torch.equal(kept, d_kept) and torch.equal(slot, d_slot)
    torch.testing.assert_close(weight, d_weight, rtol=0, atol=1e-6)
    assert plan.aux_losses["load_balancing_loss"].item() == pytest.approx(COEF * l_aux.item(), abs=1e-6)


# ------------------------------------------------------------------------------------------ DeepSpeed topkgating


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("E", [4, 8])
def test_topkgating_dropless(E, k):
    """drop_tokens=False: all T*k pairs kept, weights the k chosen probabilities renormalised (softmax_topk +
    renormalize, 1e-6), capacity the busiest expert, exp_counts our counts, and l_aux (all k choices, E^2/k *
    mean(P * c / T)) our loss (1e-6)."""
    T = 32
    logits = _logits(T, E, seed=7 * E + k)
    l_aux, combine, dispatch, exp_counts = ds.topkgating(logits.clone(), k, 1.0, 1, drop_tokens=False)
    plan = _route(logits, top_k=k, order="softmax_topk", renormalize=True, capacity_factor=0.0, min_capacity=1)
    kept, weight, _ = _dense(plan, T, E)
    d_kept, d_weight, _ = _ds_dense(combine, dispatch)
    assert torch.equal(kept, d_kept) and kept.sum() == T * k
    torch.testing.assert_close(weight, d_weight, rtol=0, atol=1e-6)
    assert torch.equal(plan.counts, exp_counts.long())
    assert combine.shape[-1] == int(plan.counts.max())
    assert plan.aux_losses["load_balancing_loss"].item() == pytest.approx(COEF * l_aux.item(), abs=1e-6)


@pytest.mark.parametrize("policy", ["position", "probs"])
@pytest.mark.parametrize("cf", [0.5, 1.0, 1.25])
def test_topkgating_top1_with_capacity(cf, policy):
    """k=1, drop_tokens=True: DeepSpeed's drop policies are ours for one choice: the same capacity, the same kept
    pairs (position: the first C tokens; probs: the C most probable), and l_aux our loss (1e-6). DeepSpeed
    renormalises the kept gate (weight 1); ours is softmax_topk without renormalize (weight p, 1e-6), because our
    "probs" ranks by the plan's weight, which renormalize makes 1 for every token at k=1 (ranking by position).
    (For k >= 2 the priorities differ: DeepSpeed's position is token order and its probs ranks all choices
    together; ours puts every first choice before any second choice.)"""
    T, E = 32, 4
    logits = _logits(T, E, seed=int(8 * cf))
    logits[:, 0] += 1.5  # expert 0 overflows at every cf here
    l_aux, combine, dispatch, _ = ds.topkgating(logits.clone(), 1, cf, 1, drop_tokens=True, drop_policy=policy)
    plan = _route(logits, top_k=1, order="softmax_topk", capacity_factor=cf, min_capacity=1, drop_policy=policy)
    kept, weight, _ = _dense(plan, T, E)
    d_kept, d_weight, _ = _ds_dense(combine, dispatch)
    assert plan.capacity == combine.shape[-1]
    assert torch.equal(kept, d_kept) and kept.sum() < T
    torch.testing.assert_close(d_weight, kept.float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(weight, torch.where(kept, torch.softmax(logits, -1), 0.0), rtol=0, atol=1e-6)
    assert plan.aux_losses["load_balancing_loss"].item() == pytest.approx(COEF * l_aux.item(), abs=1e-6)


# ------------------------------------------------------------------------------------------ transformers' Mixtral


def _triton_ok() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    from moe.kernels import triton_status

    return triton_status(torch.device("cpu" if not torch.cuda.is_available() else "cuda"))[0]


DISPATCHERS = ["einsum", "sorted",
               pytest.param("triton", marks=pytest.mark.skipif(not _triton_ok(), reason="triton cannot run here"))]


def _mixtral_pair(dispatcher: str, E: int, k: int, d: int = 8, f: int = 12):
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    mcfg = transformers.MixtralConfig(hidden_size=d, intermediate_size=f, num_local_experts=E, num_experts_per_tok=k,
                                      hidden_act="silu", router_jitter_noise=0.0)
    mcfg._experts_implementation = "eager"  # the reference loop, not a hub kernel
    torch.manual_seed(0)
    theirs = MixtralSparseMoeBlock(mcfg)
    with torch.no_grad():
        theirs.gate.weight.normal_(0.0, 1.0)
        theirs.experts.gate_up_proj.normal_(0.0, 0.3)
        theirs.experts.down_proj.normal_(0.0, 0.3)
    cfg = ModelConfig(vocab_size=16, n_layer=1, d_model=d, n_head=2, d_ff=f, activation="silu", glu=True,
                      moe=MoEConfig(layers="all", num_experts=E, dispatcher=dispatcher, router=RouterConfig(
                          top_k=k, order="topk_softmax", capacity_factor=0.0, aux_loss_coef=0.0, z_loss_coef=0.0)))
    ours = MoELayer(cfg)
    with torch.no_grad():  # Mixtral: gate_up_proj [E, 2f, d] = [w1 (gate); w3 (up)], down_proj (w2) [E, d, f]
        ours.router.gate.weight.copy_(theirs.gate.weight)
        ours.experts.w_gate.copy_(theirs.experts.gate_up_proj[:, :f, :].transpose(1, 2))
        ours.experts.w_up.copy_(theirs.experts.gate_up_proj[:, f:, :].transpose(1, 2))
        ours.experts.w_down.copy_(theirs.experts.down_proj.transpose(1, 2))
    return theirs, ours


@pytest.mark.parametrize("E,k", [(4, 2), (8, 2), (4, 1)])
@pytest.mark.parametrize("dispatcher", DISPATCHERS)
def test_mixtral_block_outputs_and_gradients(dispatcher, E, k):
    """MixtralSparseMoeBlock (softmax, top-k, renormalise: our topk_softmax; dropless) with its weights copied into
    our MoELayer: outputs within 1e-6, gradients of the loss sum(y * g) w.r.t. the input, the router weight and the
    three expert matrices within 1e-5 (ours mapped back to Mixtral's layout), on every dispatcher."""
    f = 12
    theirs, ours = _mixtral_pair(dispatcher, E, k, f=f)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 8, generator=gen)
    g = torch.randn(2, 5, 8, generator=gen)
    xt = x.clone().requires_grad_(True)
    xo = x.clone().requires_grad_(True)
    yt = theirs(xt)
    yo, plan = ours(xo)
    assert ours.resolved_dispatcher(x.device)[0] == dispatcher
    torch.testing.assert_close(yo, yt, rtol=0, atol=1e-6)
    (yt * g).sum().backward()
    (yo * g).sum().backward()
    tol = dict(rtol=0, atol=1e-5)
    torch.testing.assert_close(xo.grad, xt.grad, **tol)
    torch.testing.assert_close(ours.router.gate.weight.grad, theirs.gate.weight.grad, **tol)
    gate_up = torch.cat([ours.experts.w_gate.grad, ours.experts.w_up.grad], dim=2).transpose(1, 2)
    torch.testing.assert_close(gate_up, theirs.experts.gate_up_proj.grad, **tol)
    torch.testing.assert_close(ours.experts.w_down.grad.transpose(1, 2), theirs.experts.down_proj.grad, **tol)
    assert theirs.gate.weight.grad.abs().sum() > 0  # the router learns through the combine weights on both sides
