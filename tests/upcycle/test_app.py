"""The upcycle app: Hydra config -> checkpoint dir with the source's tokenizer; nothing written on failure;
`experiments.train init_from=DIR` trains it on data tokenized by that tokenizer."""
from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from experiments.config import run_config_from_dict
from experiments.hydra_conf import register_configs
from experiments.tokenizer import PretrainedTokenizer, load_tokenizer
from experiments.trainer import Trainer
from experiments.upcycle import run_upcycle
from moe.checkpoint import load_model, read_metadata
from tests.upcycle.conftest import make_hf
from tests.upcycle.test_gguf import _tiny_bpe
from upcycle import read_dense, sample_tokens
from upcycle.router_init import router_input_means


@pytest.fixture(scope="module")
def hf_with_tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_tok")
    tok, tokens, _, _ = _tiny_bpe()
    make_hf("llama", path, vocab_size=len(tokens), max_position_embeddings=128)
    (path / "tokenizer.json").write_text(tok.to_str())
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "chat_template": "{{ x }}"}))
    return path


def compose_upcycle(*overrides: str) -> dict:
    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = compose("upcycle", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def test_app_writes_checkpoint_with_tokenizer(tmp_path, hf_with_tokenizer, capsys):
    out = tmp_path / "moe"
    res = run_upcycle(compose_upcycle(f"source={hf_with_tokenizer}", f"out={out}", "num_experts=4", "routing=glam",
                                      "model.moe.router.capacity_factor=0"))
    printed = capsys.readouterr().out
    assert "EXACT" in printed and "max |Δ logit|" in printed
    assert res["report"].max_abs_diff < 1e-5
    meta = read_metadata(out)
    assert meta["upcycle"]["recipe"] == "copy" and meta["upcycle"]["router"]["order"] == "softmax_topk"
    assert meta["step0"]["passed"] and meta["model"]["moe"]["layers"] == "every:2"
    # the routing at step 0 is in the report and the checkpoint: per sparse layer, k = 2 assignments per token
    rep = res["report"]
    assert "routing at step 0" in printed and meta["step0"]["experts_used"] == {str(i): n for i, n in rep.experts_used.items()}
    assert {i: sum(c) for i, c in meta["step0"]["tokens_per_expert"].items()} == {"1": 2 * rep.tokens, "3": 2 * rep.tokens}
    tok = load_tokenizer(out)
    assert isinstance(tok, PretrainedTokenizer) and tok.eos_id == tok._tok.token_to_id("<|im_end|>")
    moe = load_model(out)
    assert moe.cfg.moe.num_experts == 4
    # The default router is calibrated on the verification text: its rows have no component along each sparse
    # layer's mean router input there (upcycle.router_init).
    assert meta["upcycle"]["router_init"] == "mean_free" and meta["upcycle"]["calibration_tokens"] == rep.tokens
    assert f"mean router input on the {rep.tokens} verification tokens" in printed
    src = read_dense(hf_with_tokenizer)
    dense = src.build_model()
    means = router_input_means(dense, sample_tokens(dense.cfg.vocab_size, src.tokenizer)[:, :-1], (1, 3))
    for i, m in means.items():
        assert float((moe.blocks[i].ffn.router.gate.weight.detach() @ (m / m.norm())).abs().max()) < 1e-7


def test_failures_write_nothing(tmp_path, hf_with_tokenizer, monkeypatch):
    out = tmp_path / "moe"
    with pytest.raises(ValueError, match="multiple of shards=2"):
        run_upcycle(compose_upcycle(f"source={hf_with_tokenizer}", f"out={out}", "recipe=granular", "shards=2",
                                    "num_experts=5"))
    assert not out.exists()
    import upcycle.verify

    monkeypatch.setattr(upcycle.verify, "RELATIVE_TOLERANCE", -1.0)  # make the exact recipe "fail" its check
    with pytest.raises(ValueError, match="step-0 check failed"):
        run_upcycle(compose_upcycle(f"source={hf_with_tokenizer}", f"out={out}"))
    assert not out.exists() and not list(tmp_path.glob(".moe*"))
    with pytest.raises(ValueError, match="is required"):
        run_upcycle({"source": str(hf_with_tokenizer), "out": None})


def test_inexact_recipe_reports_gap_and_writes(tmp_path, hf_with_tokenizer):
    res = run_upcycle(compose_upcycle(f"source={hf_with_tokenizer}", f"out={tmp_path / 'm'}", "recipe=drop"))
    assert not res["report"].expected_exact and res["report"].max_abs_diff > 0 and "INEXACT" in res["text"]


def test_train_continues_from_upcycled_checkpoint(tmp_path, hf_with_tokenizer, text_corpus):
    out = tmp_path / "moe"
    run_upcycle(compose_upcycle(f"source={hf_with_tokenizer}", f"out={out}", "num_experts=4", "router_init_std=0.02"))
    register_configs()  # the model presets, as experiments.train registers them
    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = compose("train", overrides=[
            "model=tiny_dense", "data=text", f"data.path={text_corpus}", f"init_from={out}", "trainer.max_steps=3",
            "trainer.batch_size=4", "trainer.seq_len=32", "trainer.eval_batches=2", "trainer.progress=false",
            "trainer.log_interval=1", "optim.warmup_steps=0", "optim.lr=3e-3", "optim.schedule=constant"])
    run = run_config_from_dict(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True), str(tmp_path / "run"))
    t = Trainer(run)
    assert isinstance(t.data.tokenizer, PretrainedTokenizer) and t.data.meta["tokenizer"] == "pretrained"
    assert t.data.tokenizer.encode("the lazy fox") == load_tokenizer(out).encode("the lazy fox")
    assert t.model_cfg.moe.num_experts == 4
    before = t.evaluate()
    summary = t.fit()
    assert summary["final_val_loss"] < before
    # The run's checkpoint keeps the tokenizer (and its end-of-text token) for generation and later runs.
    assert load_tokenizer(summary["checkpoint"]).eos_id == load_tokenizer(out).eos_id


def test_chat_template_jinja_file_wins(tmp_path, hf_with_tokenizer):
    """transformers 5 writes the template to chat_template.jinja: it is read, before tokenizer_config.json's."""
    import shutil

    from upcycle.hf import read_hf

    src = tmp_path / "hf"
    shutil.copytree(hf_with_tokenizer, src)
    assert read_hf(src).chat_template == "{{ x }}"
    (src / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}", encoding="utf-8")
    assert read_hf(src).chat_template == "{% for m in messages %}{{ m.content }}{% endfor %}"


def test_plain_normal_router_on_request(tmp_path, hf_with_tokenizer):
    """`router_init=normal` keeps the paper's plain N(0, 0.02^2) rows:
    the same draw as the default's, before the mean direction is removed."""
    plain = run_upcycle(compose_upcycle(f"source={hf_with_tokenizer}", f"out={tmp_path / 'n'}", "router_init=normal"))
    assert read_metadata(tmp_path / "n")["upcycle"]["router_init"] == "normal" and "router_init=normal" in plain["text"]
    w = load_model(tmp_path / "n").blocks[1].ffn.router.gate.weight.detach()
    assert 0.015 < float(w.std()) < 0.025
