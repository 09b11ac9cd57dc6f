"""moe.compile: compiled blocks give eager's losses, and after warm-up a step compiles nothing new."""
import pytest
import torch

from moe.compile import compile_blocks
from moe.config import MoEConfig
from moe.model import Transformer, _rope
from moe.presets import get_preset
from routing.config import RouterConfig

B, S = 2, 16


def _config(sparse: bool):
    moe = MoEConfig(layers="all", num_experts=4, expert_hidden=24, router=RouterConfig(top_k=2)) if sparse \
        else MoEConfig(layers="none")
    return get_preset("tiny_dense").replace(vocab_size=64, n_layer=2, d_model=32, n_head=2, d_ff=48,
                                             max_seq_len=S, moe=moe)


def _trainer(cfg, compiled: dict, gemm_impl: str = "auto"):
    """A bare training loop (forward, backward, AdamW) on a fresh seeded model; returns a step -> loss closure."""
    torch.manual_seed(0)
    model = Transformer(cfg)
    for block in model.blocks:
        if hasattr(block.ffn, "experts"):
            block.ffn.experts.gemm_impl = gemm_impl
    line = compile_blocks(model, **compiled) if compiled else None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randint(0, cfg.vocab_size, (B, S), generator=g) for _ in range(2))

    def step(i: int) -> float:  # one batch throughout: six AdamW steps on it must lower its loss
        loss = model(x, y).total_loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step, line


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _check(cfg, backend: str, tol: float, gemm_impl: str = "auto"):
    torch._dynamo.reset()
    eager, _ = _trainer(cfg, {}, gemm_impl)
    compiled, line = _trainer(cfg, {"backend": backend}, gemm_impl)
    assert f"backend={backend}" in line and "2 blocks" in line
    losses = []
    for i in range(3):  # warm-up: the first steps compile (the second once more, as state appears after step 1)
        losses.append((eager(i), compiled(i)))
    warm = _graphs()
    for i in range(3, 6):
        losses.append((eager(i), compiled(i)))
    assert _graphs() == warm, "a step after warm-up compiled a new graph"
    for a, b in losses:
        assert b == pytest.approx(a, rel=tol, abs=tol)
    assert losses[-1][0] < losses[0][0]  # it trained


@pytest.mark.parametrize("sparse,gemm_impl", [(False, "auto"), (True, "fused"), (True, "loop"), (True, "grouped_mm")],
                         ids=["dense", "moe-fused", "moe-loop", "moe-grouped_mm"])
def test_compiled_blocks_equal_eager_and_do_not_recompile(sparse, gemm_impl):
    """dynamo alone (backend=eager): the expert GEMMs are opaque operators (moe.segment_matmul, moe.grouped_glu),
    so no per-expert size is traced; the traced code computes exactly what eager does, for the fused GLU path, the
    per-expert loop and grouped_mm (the test widths are 16-byte aligned) alike."""
    _check(_config(sparse), "eager", 1e-6, gemm_impl)


@pytest.mark.parametrize("gemm_impl", ["fused", "loop", "grouped_mm"])
def test_an_moe_block_is_one_graph(gemm_impl):
    """No graph break in an MoE block (nor in the backward its autograd nodes record): the router's counts have a static size
    (routing.counts) and the expert GEMMs are custom operators, so inductor sees the router, the dispatch and the
    activations of a block as one graph (before issue 16's fix: 12 graphs per block at the demo's e8 twin)."""
    torch.manual_seed(0)
    model = Transformer(_config(sparse=True))
    block = model.blocks[0]
    block.ffn.experts.gemm_impl = gemm_impl
    x = torch.randn(B, S, 32, requires_grad=True)
    rope = _rope(model.rotary, torch.arange(S))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(block)(x, rope, None)
    assert explained.graph_break_count == 0, [str(r.reason)[:200] for r in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.slow
def test_inductor_moe_blocks_equal_eager_within_round_off():
    """inductor's generated C++ (fused elementwise, its own reductions) on the MoE blocks, graph breaks and all:
    equal within fp32 round-off over six steps, and no recompilation after warm-up (a minute or two of C++
    compilation on a loaded 2-core CPU, seconds with inductor's cache warm)."""
    _check(_config(sparse=True), "inductor", 1e-5)


def test_compile_blocks_refuses_a_model_without_blocks():
    with pytest.raises(ValueError, match="model.blocks"):
        compile_blocks(torch.nn.Linear(2, 2))
