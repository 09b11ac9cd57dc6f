"""Every dispatcher equals the einsum reference, forward and backward; grouped_mm equals the per-expert loop."""
import pytest
import torch

from moe.dispatch import DISPATCHERS
from moe.experts import Experts
from moe.segment_matmul import _grouped_mm_ok, grouped_matmul
from routing import RouterConfig, build_router

T, E = 20, 4
TOL = dict(rtol=1e-5, atol=1e-5)


def _setup(d, f, k, cf, glu, bias, empty_expert, activation="gelu", seed=0):
    torch.manual_seed(seed)
    router = build_router(d, E, RouterConfig(top_k=k, capacity_factor=cf, min_capacity=1, drop_policy="probs",
                                             aux_loss_coef=0.0, z_loss_coef=0.0))
    experts = Experts(E, d, f, activation, glu, bias)
    with torch.no_grad():
        torch.nn.init.normal_(router.gate.weight, 0.0, 1.0)
        for p in experts.parameters():
            torch.nn.init.normal_(p, 0.0, 0.3)  # nonzero biases too
    x = torch.randn(T, d)
    if empty_expert:
        # the last feature is a constant 1 and pushes the last expert far down: it never wins a token
        x[:, -1] = 1.0
        with torch.no_grad():
            router.gate.weight[:, -1] = 0.0
            router.gate.weight[E - 1, -1] = -100.0
    return router, experts, x


def _run(name, router, experts, x, g):
    for p in list(router.parameters()) + list(experts.parameters()):
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    plan = router(x)
    y = DISPATCHERS[name](x, plan, experts)
    (y * g).sum().backward()
    grads = {"x": x.grad, "gate": router.gate.weight.grad}
    grads.update({n: p.grad for n, p in experts.named_parameters()})
    return y.detach(), grads, plan


def _compare(a, b):
    (ya, ga, _), (yb, gb, _) = a, b
    torch.testing.assert_close(ya, yb, **TOL)
    assert ga.keys() == gb.keys()
    for n in ga:
        assert ga[n] is not None and gb[n] is not None, n
        torch.testing.assert_close(ga[n], gb[n], **TOL, msg=lambda m: f"grad of {n}: {m}")


@pytest.mark.parametrize("empty_expert", [False, True], ids=["natural", "forced-empty"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("glu", [False, True], ids=["ffn", "glu"])
@pytest.mark.parametrize("cf", [0.0, 1.0, -1.0], ids=["dropless", "cf1", "cf-1"])
@pytest.mark.parametrize("k", [1, 2])
def test_sorted_equals_einsum(k, cf, glu, bias, empty_expert):
    router, experts, x = _setup(8, 12, k, cf, glu, bias, empty_expert)
    g = torch.randn(T, 8, generator=torch.Generator().manual_seed(5))
    ref = _run("einsum", router, experts, x, g)
    got = _run("sorted", router, experts, x, g)
    _compare(ref, got)
    plan = got[2]
    if empty_expert:
        assert plan.counts[-1] == 0
        for n in ("w_up", "w_down") + (("w_gate",) if glu else ()) + (("b_up", "b_down") if bias else ()):
            assert torch.count_nonzero(got[1][n][-1]) == 0, f"{n} of the empty expert must get a zero gradient"
    if cf != 0.0:
        assert plan.stats["dropped_fraction"] > 0, "the capacity cases must actually drop tokens"
    if cf == 0.0:
        assert plan.token_index.numel() == T * k
    # the output is exactly the definition y[t] = sum_r weight[r] * expert_{e_r}(x[t])
    y_def = torch.zeros(T, 8)
    with torch.no_grad():
        for t, e, w in zip(plan.token_index.tolist(), plan.expert_index.tolist(), plan.weight.tolist()):
            h = x[t] @ experts.w_up[e] + (experts.b_up[e] if bias else 0)
            gate = (x[t] @ experts.w_gate[e] + (experts.b_gate[e] if bias else 0)) if glu else None
            h = experts.act(gate) * h if glu else experts.act(h)
            y_def[t] += w * (h @ experts.w_down[e] + (experts.b_down[e] if bias else 0))
    torch.testing.assert_close(got[0], y_def, **TOL)


@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("cf", [0.0, 1.0])
@pytest.mark.parametrize("k", [1, 2])
def test_grouped_mm_equals_loop(k, cf, glu):
    router, experts, x = _setup(8, 12, k, cf, glu, True, empty_expert=True)
    g = torch.randn(T, 8, generator=torch.Generator().manual_seed(6))
    assert _grouped_mm_ok(x, experts.w_up) and _grouped_mm_ok(torch.zeros(3, 12), experts.w_down), \
        "these shapes must take the grouped_mm path"
    experts.gemm_impl = "grouped_mm"
    fused = _run("sorted", router, experts, x, g)
    experts.gemm_impl = "loop"
    loop = _run("sorted", router, experts, x, g)
    _compare(fused, loop)


@pytest.mark.parametrize("d,f", [(6, 12), (8, 10), (7, 9)])
@pytest.mark.parametrize("k", [1, 2])
def test_loop_fallback_for_unaligned_widths(d, f, k):
    router, experts, x = _setup(d, f, k, 0.0, True, True, empty_expert=True)
    assert not (_grouped_mm_ok(x, experts.w_up) and _grouped_mm_ok(torch.zeros(3, f), experts.w_down))
    g = torch.randn(T, d, generator=torch.Generator().manual_seed(7))
    _compare(_run("einsum", router, experts, x, g), _run("sorted", router, experts, x, g))


@pytest.mark.parametrize("impl", ["grouped_mm", "loop"])
def test_grouped_matmul_segments(impl):
    gen = torch.Generator().manual_seed(3)
    counts = torch.tensor([3, 0, 5, 2])
    x = torch.randn(10, 8, generator=gen, requires_grad=True)
    w = torch.randn(4, 8, 4, generator=gen, requires_grad=True)
    y = grouped_matmul(x, w, counts, impl)
    ref = torch.cat([x[0:3] @ w[0], x[3:8] @ w[2], x[8:10] @ w[3]])
    torch.testing.assert_close(y, ref, **TOL)
    y.sum().backward()  # a stride-0 incoming gradient
    torch.testing.assert_close(w.grad[1], torch.zeros(8, 4))
    torch.testing.assert_close(w.grad[0], x[0:3].detach().sum(0)[:, None].expand(8, 4), **TOL)
    torch.testing.assert_close(x.grad[:3], w[0].detach().sum(1).expand(3, 8), **TOL)


def test_grouped_matmul_no_rows():
    x = torch.zeros(0, 8)
    w = torch.randn(4, 8, 4)
    for impl in ("grouped_mm", "loop"):
        assert grouped_matmul(x, w, torch.zeros(4, dtype=torch.long), impl).shape == (0, 4)


@pytest.mark.parametrize("name", sorted(DISPATCHERS))
def test_dispatch_bf16_runs_close_to_fp32(name):
    router, experts, x = _setup(8, 12, 2, 0.0, True, True, empty_expert=False)
    plan = router(x)
    y32 = DISPATCHERS[name](x, plan, experts)
    experts_bf16 = experts.to(torch.bfloat16)
    y16 = DISPATCHERS[name](x.bfloat16(), plan, experts_bf16)
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32.detach(), rtol=5e-2, atol=5e-2)


# ---------------------------------------------------------------- choosing a dispatcher (auto, triton)

def test_auto_resolves_to_sorted_without_cuda(monkeypatch):
    from moe.dispatch import resolve_dispatcher

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # auto never picks the interpreter, however the variable is set
    assert resolve_dispatcher("auto", torch.device("cpu")) == ("sorted", "auto: no CUDA device (cpu tensors)")
    assert resolve_dispatcher("einsum", torch.device("cpu"))[0] == "einsum"
    assert resolve_dispatcher("auto", torch.device("cpu"), expert_parallel=True)[0] == "sorted"
    if not torch.cuda.is_available():
        name, why = resolve_dispatcher("auto", torch.device("cuda"))
        assert name == "sorted" and "CUDA" in why


def test_forced_triton_that_cannot_run_says_what_to_change(monkeypatch):
    import moe.kernels
    from moe.dispatch import resolve_dispatcher

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"model\.moe\.dispatcher=triton cannot run here: .*(TRITON_INTERPRET|triton)"):
        resolve_dispatcher("triton", torch.device("cpu"))
    monkeypatch.setattr(moe.kernels, "_triton_version", lambda: None)  # as if triton were not installed
    assert moe.kernels.triton_status()[0] is False and "not importable" in moe.kernels.triton_status()[1]
    with pytest.raises(ValueError, match=r"model\.moe\.dispatcher=triton cannot run here: triton is not importable"):
        resolve_dispatcher("triton", torch.device("cuda"))
    assert resolve_dispatcher("auto", torch.device("cuda"))[0] == "sorted"
    with pytest.raises(ValueError, match=r"model\.moe\.dispatcher=triton cannot run here"):
        resolve_dispatcher("triton", torch.device("cuda"), expert_parallel=True)


def test_auto_layer_on_cpu_runs_sorted_and_says_so():
    from moe import ModelConfig, MoEConfig, Transformer
    from moe.dispatch import describe_dispatch

    def model(layers):
        return Transformer(ModelConfig(vocab_size=32, n_layer=2, d_model=8, n_head=2, d_ff=12, max_seq_len=8,
                                       moe=MoEConfig(layers=layers, num_experts=E)))

    moe_model = model("all")
    assert describe_dispatch(moe_model) == "dispatcher: sorted (auto: no CUDA device (cpu tensors))"
    assert describe_dispatch(model("none")) == "dispatcher: none (dense model)"
    layer = moe_model.blocks[0].ffn
    assert layer.resolved_dispatcher(torch.device("cpu"))[0] == "sorted"
    kernels = layer.router_kernels(torch.device("cpu"))
    assert kernels.topk is None and kernels.sort is None  # routing's own torch code


def test_importing_the_library_does_not_import_triton():
    import subprocess
    import sys
    from pathlib import Path

    # moe.kernels itself, the dispatchers and the layer import triton only when a kernel is about to run
    code = ("import sys, moe, moe.kernels, moe.dispatch, moe.layer\n"
            "assert not any(m == 'triton' or m.startswith('triton.') for m in sys.modules), 'triton was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(Path(__file__).resolve().parents[2]))


# ---------------------------------------------------------------- sorted's atomic-free path (the default on CUDA)

def _deterministic(x, plan, experts):
    from moe.dispatch.sorted import sorted_dispatch

    return sorted_dispatch(x, plan, experts, deterministic=True)


@pytest.mark.parametrize("k,cf", [(1, 0.0), (2, 0.0), (3, 0.0), (2, 1.0)], ids=["k1", "k2", "k3", "k2-cf1"])
@pytest.mark.parametrize("glu,bias", [(True, False), (False, True)], ids=["glu", "ffn-bias"])
def test_sorted_deterministic_path_equals_einsum(k, cf, glu, bias, monkeypatch):
    """The token-major gather and combine (moe.dispatch.token_rows) that `sorted` runs on CUDA equal the einsum
    reference in outputs and every gradient, with an empty expert and with drops."""
    router, experts, x = _setup(8, 12, k, cf, glu, bias, empty_expert=True)
    g = torch.randn(T, 8, generator=torch.Generator().manual_seed(11))
    ref = _run("einsum", router, experts, x, g)
    monkeypatch.setitem(DISPATCHERS, "deterministic", _deterministic)
    got = _run("deterministic", router, experts, x, g)
    _compare(ref, got)
    if cf:
        assert got[2].stats["dropped_fraction"] > 0


def test_sorted_on_cuda_tensors_takes_the_deterministic_path(monkeypatch):
    """deterministic=None means x.is_cuda: a CPU call takes index_add_, and the token-major path is what CUDA gets."""
    import moe.dispatch.sorted as sorted_mod

    calls = []
    monkeypatch.setattr(sorted_mod, "_token_major", lambda x, plan, experts: calls.append(1) or x)
    router, experts, x = _setup(8, 12, 2, 0.0, True, False, empty_expert=False)
    plan = router(x)
    sorted_mod.sorted_dispatch(x, plan, experts)
    assert calls == []
    sorted_mod.sorted_dispatch(x, plan, experts, deterministic=True)
    assert calls == [1]


ATOMIC_ON_CUDA = {"aten::index_add", "aten::index_add_", "aten::scatter_add", "aten::scatter_add_", "aten::bincount",
                  "aten::scatter_reduce", "aten::scatter_reduce_", "aten::index_reduce", "aten::index_reduce_",
                  "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"}


def test_sorted_deterministic_path_runs_no_atomic_op():
    """The ops of the CUDA-intended path, forward and backward, every nested aten call as the profiler records it
    on CPU: none that accumulates with atomics on CUDA (not even a non-accumulating index_put, to be strict), so
    k = 3 sums are bitwise repeatable there. (With expert biases, their gradient is index_select's backward, an
    index_add_: the bank here has none, as the demo's.)"""
    from torch.profiler import ProfilerActivity, profile

    router, experts, x = _setup(8, 12, 3, 0.0, True, False, empty_expert=True)
    with torch.no_grad():
        plan = router(x)
    plan.weight = plan.weight.detach().clone().requires_grad_(True)
    x = x.clone().requires_grad_(True)
    for impl in ("auto", "loop"):  # the fused grouped GEMMs (this bank's small segments) and the per-expert loop
        experts.gemm_impl = impl
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            y = _deterministic(x, plan, experts)
            y.backward(torch.ones_like(y))
        ops = {event.key for event in prof.key_averages()}
        assert not ops & ATOMIC_ON_CUDA, (impl, ops & ATOMIC_ON_CUDA)
        assert {"aten::index_select", "aten::sort"} <= ops, ops  # it did record the dispatch
    ys = [_deterministic(x, plan, experts) for _ in range(2)]
    assert torch.equal(ys[0], ys[1])
    with profile(activities=[ProfilerActivity.CPU]) as prof:  # and the check can fail: the CPU path has them
        DISPATCHERS["sorted"](x, plan, experts).sum().backward()
    assert "aten::index_add_" in {event.key for event in prof.key_averages()}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (index_add_ is atomic only there)")
def test_sorted_on_cuda_is_bitwise_repeatable_at_k3():
    from moe.dispatch.sorted import sorted_dispatch

    torch.manual_seed(0)
    Tc, d, Ec = 4096, 64, 16
    router = build_router(d, Ec, RouterConfig(top_k=3)).cuda()
    experts = Experts(Ec, d, 32, "silu", True, False).cuda()
    x = torch.randn(Tc, d, device="cuda", requires_grad=True)
    with torch.no_grad():
        plan = router(x)
    plan.weight = plan.weight.detach().clone().requires_grad_(True)
    g = torch.randn(Tc, d, device="cuda")
    runs = []
    for _ in range(3):
        y = sorted_dispatch(x, plan, experts)  # deterministic=None: the token-major path on CUDA
        runs.append((y.detach(), *torch.autograd.grad(y, (x, plan.weight, *experts.parameters()), g)))
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)
