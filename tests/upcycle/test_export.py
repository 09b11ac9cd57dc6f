"""Export: transformers loads what we write (Mixtral, Llama, Qwen2, GPT-2) and its logits equal ours."""
from __future__ import annotations

import json

import pytest
import torch

from routing.config import RouterConfig
from tests.upcycle.conftest import TINY, hf_logits, ids_for, make_hf
from upcycle import UpcycleConfig, read_dense, upcycle
from upcycle.export import export_hf

transformers = pytest.importorskip("transformers")
TOL = 2e-5


def _same(ours_model, path, cls, ids):
    hf = cls.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        ours = ours_model.eval()(ids).logits
    return (ours - hf_logits(hf, ids)).abs().max().item()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    make_hf("llama", path)
    return read_dense(path).build_model()


@pytest.mark.parametrize("kw", [
    dict(layers="every:2", router_init_std=0.5),
    dict(layers="all", num_experts=4, router_init_std=0.5, router=RouterConfig(order="softmax_topk", renormalize=True)),
    dict(layers="all", recipe="granular", shards=2, num_experts=8, router=RouterConfig(top_k=4)),
    dict(layers="last:2", recipe="drop", router=RouterConfig(top_k=1)),
])
def test_mixtral_roundtrip(tmp_path, llama, kw):
    moe = upcycle(llama, UpcycleConfig(**kw))
    export_hf(moe, tmp_path / "mixtral")
    cfg = json.loads((tmp_path / "mixtral" / "config.json").read_text())
    assert cfg["architectures"] == ["MixtralForCausalLM"] and cfg["num_experts_per_tok"] == moe.cfg.moe.router.top_k
    diff = _same(moe, tmp_path / "mixtral", transformers.MixtralForCausalLM, ids_for(TINY["vocab"]))
    assert diff < TOL, f"max |Δ logit| {diff:.2e}"


def test_auto_class_picks_mixtral(tmp_path, llama):
    moe = upcycle(llama, UpcycleConfig(router_init_std=0.5))
    export_hf(moe, tmp_path / "m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), dtype=torch.float32)
    assert type(hf).__name__ == "MixtralForCausalLM"


@pytest.mark.parametrize("kind, cls", [("llama", "LlamaForCausalLM"), ("qwen2", "Qwen2ForCausalLM"),
                                       ("gpt2", "GPT2LMHeadModel")])
def test_dense_export_roundtrip(tmp_path, kind, cls):
    make_hf(kind, tmp_path / "src")
    dense = read_dense(tmp_path / "src").build_model()
    export_hf(dense, tmp_path / "out")
    diff = _same(dense, tmp_path / "out", getattr(transformers, cls), ids_for(TINY["vocab"]))
    assert diff < TOL
    # And the export reads back through our own reader to the same model.
    again = read_dense(tmp_path / "out").build_model()
    ids = ids_for(TINY["vocab"])
    with torch.no_grad():
        assert (again(ids).logits - dense(ids).logits).abs().max() < 1e-6


@pytest.mark.parametrize("kw, match", [
    (dict(recipe="shared"), "no shared experts"),
    (dict(router=RouterConfig(capacity_factor=1.25)), "dropless"),
    (dict(router=RouterConfig(order="softmax_topk")), "without renormalize"),
    (dict(recipe="granular", shards=2, router_init_std=0.5), "one intermediate_size"),
])
def test_mixtral_refusals(tmp_path, llama, kw, match):
    moe = upcycle(llama, UpcycleConfig(**kw))
    with pytest.raises(ValueError, match=match):
        export_hf(moe, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_unsupported_family(tmp_path):
    make_hf("opt", tmp_path / "opt")
    with pytest.raises(ValueError, match="no Hugging Face format"):
        export_hf(read_dense(tmp_path / "opt").build_model(), tmp_path / "x")
