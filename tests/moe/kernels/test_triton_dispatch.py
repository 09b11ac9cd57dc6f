"""The `triton` dispatcher equals `sorted` and `einsum`, forward and backward, and never waits on the host.

On CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set below before triton is imported): slow per
program, so the shapes are tiny and the blocks big. The gpu-marked tests repeat the comparison at real sizes.
"""
import contextlib
import os
import sys

import torch

if not torch.cuda.is_available():  # CPU: run the kernels in Triton's interpreter (set before triton is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

pytest.importorskip("triton")

from moe import ModelConfig, MoEConfig, Transformer  # noqa: E402
from moe.dispatch import einsum_dispatch, sorted_dispatch, triton_dispatch  # noqa: E402
from moe.experts import Experts  # noqa: E402
from moe.kernels.gating import fused_topk_gating  # noqa: E402
from moe.kernels.sort import sort_by_expert  # noqa: E402
from moe.layer import MoELayer  # noqa: E402
from routing import RouterConfig, build_router  # noqa: E402
from routing.router import TORCH_KERNELS, RouterKernels  # noqa: E402
from routing.topk import topk_gating  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
T, E, D, F = 20, 4, 8, 12
TOL32 = dict(rtol=1e-5, atol=1e-5)
TOL16 = dict(rtol=2e-2, atol=2e-2)
DISPATCH = {"einsum": einsum_dispatch, "sorted": sorted_dispatch, "triton": triton_dispatch}

ROUTERS = {  # name -> RouterConfig: top-1, top-2, capacity drops (fixed and capped), expert choice
    "top1": dict(top_k=1),
    "top2": dict(top_k=2),
    "top2-cf1": dict(top_k=2, capacity_factor=1.0, min_capacity=1),
    "top1-cf-1": dict(top_k=1, capacity_factor=-1.0, min_capacity=1, drop_policy="position"),
    "expert_choice": dict(name="expert_choice", top_k=1, capacity_factor=1.0, ec_mode="batch"),
}


def _setup(router_name, glu, bias, empty_expert, dtype=torch.float32, master_fp32=False, seed=0):
    """A router and an expert bank with spread-out weights; empty_expert: expert E-1 never wins a token.
    dtype: the activations' dtype; master_fp32 keeps the experts in fp32 (autocast's layout) whatever dtype is."""
    torch.manual_seed(seed)
    router = build_router(D, E, RouterConfig(aux_loss_coef=0.0, z_loss_coef=0.0, **ROUTERS[router_name]))
    experts = Experts(E, D, F, "silu" if glu else "gelu", glu, bias)
    with torch.no_grad():
        torch.nn.init.normal_(router.gate.weight, 0.0, 1.0)
        for p in experts.parameters():
            torch.nn.init.normal_(p, 0.0, 0.3)  # nonzero biases too
    x = torch.randn(T, D)
    if empty_expert:
        # the last feature is a constant 1 and pushes the last expert far down: it never wins a token
        x[:, -1] = 1.0
        with torch.no_grad():
            router.gate.weight[:, -1] = 0.0
            router.gate.weight[E - 1, -1] = -100.0
    router.to(DEVICE)
    experts.to(DEVICE, dtype=torch.float32 if master_fp32 else dtype)
    return router, experts, x.to(DEVICE, dtype)


def _run(name, router, experts, x, g):
    """Forward and backward of (y * g).sum() through one dispatcher; gradients of x, the gate and every expert
    parameter (the gate's through plan.weight)."""
    for p in list(router.parameters()) + list(experts.parameters()):
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    plan = router(x)
    y = DISPATCH[name](x, plan, experts)
    assert y.dtype == x.dtype and y.shape == x.shape
    (y.float() * g).sum().backward()
    grads = {"x": x.grad, "gate": router.gate.weight.grad}
    grads.update({n: p.grad for n, p in experts.named_parameters()})
    return y.detach(), grads, plan


def _close(a, b, tol, what):
    if tol is TOL16:
        # bf16: the two paths round intermediates at different places, a few bf16 ulps apart on single elements;
        # compare relative to the tensor's scale (the largest reference magnitude) instead of element by element.
        err = (a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-6)
        assert err <= tol["rtol"], f"{what}: max difference {err:.4f} of the reference's scale"
    else:
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{what}: {m}")


def _compare(got, ref, tol, what):
    (y, grads, _), (y_ref, grads_ref, _) = got, ref
    _close(y, y_ref, tol, f"{what} output")
    assert grads.keys() == grads_ref.keys()
    for n in grads:
        assert grads[n] is not None and grads_ref[n] is not None, f"{what}: no gradient for {n}"
        assert grads[n].dtype == grads_ref[n].dtype, n
        _close(grads[n], grads_ref[n], tol, f"{what}, grad of {n}")


@pytest.mark.parametrize("empty_expert", [False, True], ids=["natural", "forced-empty"])
@pytest.mark.parametrize("glu,bias", [(False, False), (True, True), (False, True)], ids=["ffn", "glu-bias", "ffn-bias"])
@pytest.mark.parametrize("router_name", list(ROUTERS))
def test_triton_equals_sorted_and_einsum_fp32(router_name, glu, bias, empty_expert):
    router, experts, x = _setup(router_name, glu, bias, empty_expert)
    g = torch.randn(T, D, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    got = _run("triton", router, experts, x, g)
    for ref_name in ("sorted", "einsum"):
        _compare(got, _run(ref_name, router, experts, x, g), TOL32, f"triton vs {ref_name}")
    plan = got[2]
    counts = plan.counts.tolist()
    assert len(set(counts)) > 1 or router_name == "expert_choice", "segments should be uneven"
    if "cf" in router_name:
        assert plan.stats["dropped_fraction"] > 0, "the capacity cases must actually drop tokens"
    if empty_expert and router_name != "expert_choice":  # expert choice fills every expert by construction
        assert counts[-1] == 0
        for n, grad in got[1].items():
            if n not in ("x", "gate"):
                assert torch.count_nonzero(grad[-1]) == 0, f"{n} of the empty expert must get a zero gradient"


@pytest.mark.parametrize("master_fp32", [False, True], ids=["bf16-weights", "fp32-master-weights"])
@pytest.mark.parametrize("glu,bias", [(False, False), (True, True)], ids=["ffn", "glu-bias"])
@pytest.mark.parametrize("router_name", ["top1", "top2-cf1", "expert_choice"])
def test_triton_equals_sorted_bf16(router_name, glu, bias, master_fp32):
    # master_fp32: bf16 activations with fp32 expert weights, the layout under autocast (Experts._weights casts)
    router, experts, x = _setup(router_name, glu, bias, empty_expert=True, dtype=torch.bfloat16,
                                master_fp32=master_fp32)
    g = torch.randn(T, D, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    got, ref = _run("triton", router, experts, x, g), _run("sorted", router, experts, x, g)
    assert got[1]["w_up"].dtype == experts.w_up.dtype  # gradients come back in the master weights' dtype
    _compare(got, ref, TOL16, "triton vs sorted (bf16)")


def test_layer_resolves_the_fused_router_kernels():
    cfg = ModelConfig(vocab_size=32, n_layer=1, d_model=D, n_head=2, d_ff=F, max_seq_len=16,
                      moe=MoEConfig(layers="all", num_experts=E, dispatcher="triton", router=RouterConfig(top_k=2)))
    layer = MoELayer(cfg).to(DEVICE)
    assert layer.resolved_dispatcher(torch.device(DEVICE))[0] == "triton"
    kernels = layer.router_kernels(torch.device(DEVICE))
    assert kernels.topk is fused_topk_gating and kernels.sort is not None
    layer.dispatcher = "sorted"  # as the benchmark switches dispatchers on one layer
    assert layer.resolved_dispatcher(torch.device(DEVICE))[0] == "sorted"
    assert layer.router_kernels(torch.device(DEVICE)) == TORCH_KERNELS
    assert "topk_impl" not in vars(layer.router) and "sort_impl" not in vars(layer.router)  # nothing installed


# ---------------------------------------------------------------- no host synchronisation

class HostSync(AssertionError):
    pass


@contextlib.contextmanager
def no_host_sync():
    """Inside the block, Tensor.item/tolist/cpu/numpy and int()/float()/bool() of a tensor raise HostSync, unless
    called from Triton itself (its CPU interpreter copies the arguments to numpy; on a GPU there is no such copy)."""
    with pytest.MonkeyPatch.context() as mp:
        for name in ("item", "tolist", "cpu", "numpy", "__int__", "__float__", "__bool__"):
            original = getattr(torch.Tensor, name)

            def patched(self, *args, _name=name, _original=original, **kwargs):
                frame = sys._getframe(1)
                if f"{os.sep}triton{os.sep}" not in frame.f_code.co_filename:
                    raise HostSync(f"Tensor.{_name} called from {frame.f_code.co_filename}:{frame.f_lineno}")
                return _original(self, *args, **kwargs)

            mp.setattr(torch.Tensor, name, patched)
        yield


def test_guard_catches_a_sync():
    with no_host_sync():
        with pytest.raises(HostSync):
            torch.ones(3).sum().item()
        with pytest.raises(HostSync):
            bool(torch.ones(3).sum() > 0)
    assert torch.ones(3).sum().item() == 3.0  # restored


def test_dispatch_does_not_sync():
    router, experts, x = _setup("top2-cf1", True, True, empty_expert=True)  # drops and an empty expert
    x.requires_grad_(True)
    plan = router(x)  # capacity drops need a host sync (N), so the plan is made outside the guard
    with no_host_sync():
        y = triton_dispatch(x, plan, experts)
        y.square().sum().backward()
    assert x.grad is not None and router.gate.weight.grad is not None and experts.w_gate.grad is not None


@pytest.mark.parametrize("order", ["topk_softmax", "softmax_topk"])
def test_gating_and_sort_do_not_sync(order):
    logits = torch.randn(T, E, device=DEVICE, requires_grad=True)
    with no_host_sync():
        probs, weight, idx = fused_topk_gating(logits, 2, order, True)
        rows = sort_by_expert(idx, E, use_triton=True)
        (weight.square().sum() + probs.square().sum()).backward()
    assert logits.grad is not None and rows.counts.sum() == 2 * T


def test_dropless_layer_does_not_sync():
    # The whole sparse layer under dispatcher=triton: fused gating, device sort, fused expert compute, backward.
    # (Without aux losses: routing.losses.load_balancing_loss counts with torch.bincount, a sync on CUDA.)
    cfg = ModelConfig(vocab_size=32, n_layer=1, d_model=D, n_head=2, d_ff=F, max_seq_len=16, glu=True,
                      moe=MoEConfig(layers="all", num_experts=E, dispatcher="triton",
                                    router=RouterConfig(top_k=2, aux_loss_coef=0.0, z_loss_coef=0.01)))
    torch.manual_seed(0)
    layer = MoELayer(cfg).to(DEVICE)
    layer.experts.reset_parameters(0.3)
    layer.resolved_dispatcher(torch.device(DEVICE))  # the first resolution imports the kernels (outside the guard)
    x = torch.randn(2, 10, D, device=DEVICE, requires_grad=True)
    with no_host_sync():
        y, plan = layer(x)
        (y.square().sum() + sum(plan.aux_losses.values())).backward()
    assert layer.router.gate.weight.grad is not None


# ---------------------------------------------------------------- a whole model

def _tiny_model(dispatcher: str) -> Transformer:
    # tiny_moe's architecture (RMSNorm, RoPE, SwiGLU, top-2) at toy sizes; one dense and one sparse block
    moe = MoEConfig(layers="every:2", num_experts=E, expert_hidden=F, dispatcher=dispatcher,
                    router=RouterConfig(top_k=2))
    cfg = ModelConfig(vocab_size=48, n_layer=2, d_model=16, n_head=2, d_ff=24, max_seq_len=16, activation="silu",
                      glu=True, norm="rmsnorm", position="rope", moe=moe)
    torch.manual_seed(0)
    return Transformer(cfg).to(DEVICE)


def test_tiny_model_triton_equals_sorted():
    idx = torch.randint(0, 48, (2, 9), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    results = []
    for dispatcher in ("sorted", "triton"):
        model = _tiny_model(dispatcher)
        out = model(idx[:, :-1], idx[:, 1:])
        out.total_loss.backward()
        results.append((out.total_loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_s, grads_s), (loss_t, grads_t) = results
    torch.testing.assert_close(loss_t, loss_s, **TOL32)
    for n in grads_s:
        assert (grads_t[n] is None) == (grads_s[n] is None), n
        if grads_s[n] is not None:
            torch.testing.assert_close(grads_t[n], grads_s[n], **TOL32, msg=lambda m: f"grad of {n}: {m}")


# ---------------------------------------------------------------- real sizes on a GPU

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("glu", [False, True], ids=["ffn", "glu"])
@pytest.mark.parametrize("k", [1, 2])
def test_real_size_bf16_gpu(k, glu):
    Tg, Eg, dg, fg = 4096, 8, 1024, 2048
    torch.manual_seed(0)
    router = build_router(dg, Eg, RouterConfig(top_k=k, aux_loss_coef=0.0, z_loss_coef=0.0)).cuda()
    experts = Experts(Eg, dg, fg, "silu", glu, True).cuda()
    x = torch.randn(Tg, dg, device="cuda")
    g = torch.randn(Tg, dg, device="cuda")
    results = {}
    for name in ("sorted", "triton"):
        kernels = RouterKernels(topk=fused_topk_gating) if name == "triton" else TORCH_KERNELS
        for p in list(router.parameters()) + list(experts.parameters()):
            p.grad = None
        xb = x.detach().clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            plan = router(xb, kernels=kernels)
            y = DISPATCH[name](xb.bfloat16(), plan, experts)
        (y.float() * g).sum().backward()
        results[name] = (y.float(), {"x": xb.grad, "gate": router.gate.weight.grad,
                                     **{n: p.grad for n, p in experts.named_parameters()}})
    (y_t, g_t), (y_s, g_s) = results["triton"], results["sorted"]
    scale = lambda t: t.abs().max().clamp(min=1e-6)  # noqa: E731  bf16 over d=1024: compare relative to the size
    assert ((y_t - y_s).abs().max() / scale(y_s)) < 2e-2
    for n in g_s:
        assert ((g_t[n].float() - g_s[n].float()).abs().max() / scale(g_s[n].float())) < 2e-2, n


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_real_size_gating_and_sort_gpu():
    logits = torch.randn(4096, 64, device="cuda")
    for order in ("topk_softmax", "softmax_topk"):
        probs, w, idx = fused_topk_gating(logits, 2, order, False)
        p0, w0, i0 = topk_gating(logits, 2, order, False)
        assert torch.equal(idx, i0)
        torch.testing.assert_close(w, w0, rtol=0, atol=1e-6)
        rows = sort_by_expert(idx, 64, use_triton=True)
        ref = torch.argsort(idx.t().reshape(-1), stable=True)
        assert torch.equal(rows.order, ref)
