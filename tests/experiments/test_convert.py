"""The convert app: a dense Hugging Face directory (written by transformers) or a GGUF file (written by the gguf
library) becomes a Switchyard checkpoint whose logits equal the source's, with the source's tokenizer;
`init_from=` continues it densely from the source's own loss; bad input names its file or field and writes
nothing; `load_source` reads every kind of model directory the apps take."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from experiments.convert import load_source, run_convert
from experiments.tokenizer import ByteTokenizer, PretrainedTokenizer, load_tokenizer
from moe.checkpoint import load_model, read_metadata, save_checkpoint
from moe.config import ModelConfig, MoEConfig
from moe.manifest import verify
from moe.model import Transformer
from moe.presets import PRESETS
from tests.experiments.test_train import make_run
from tests.upcycle.conftest import TINY, hf_logits, ids_for, make_hf, write_gguf
from tests.upcycle.test_gguf import _tiny_bpe

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

REPO_ROOT = Path(__file__).resolve().parents[2]
CKPT_FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "manifest.json"}
EOS = "<|im_end|>"
TOL = 1e-5  # fp32, the same network computed by two code paths


@pytest.fixture(scope="module")
def bpe():
    """(tokenizers.Tokenizer, its tokens, merges, token types): 300 tokens with <|endoftext|> and <|im_end|>."""
    return _tiny_bpe()


def hf_dir(path: Path, kind: str, bpe, **overrides):
    """A random `kind` model and its tokenizer, both saved by transformers (save_pretrained), as released."""
    tok, tokens, _, _ = bpe
    model = make_hf(kind, path, vocab_size=len(tokens), **overrides)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS).save_pretrained(str(path))
    return model


def convert(*overrides: str) -> dict:
    """run_convert on the config Hydra composes from conf/convert.yaml, as `python -m experiments.convert` does."""
    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = compose("convert", overrides=list(overrides))
    return run_convert(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True))


def max_diff(model, hf, ids) -> float:
    with torch.no_grad():
        return (model(ids).logits - hf_logits(hf, ids)).abs().max().item()


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def llama_converted(tmp_path_factory, bpe):
    """(HF llama directory, the transformers model, the converted checkpoint)."""
    root = tmp_path_factory.mktemp("convert_llama")
    hf = hf_dir(root / "hf", "llama", bpe)
    convert(f"source={root / 'hf'}", f"out={root / 'ckpt'}")
    return root / "hf", hf, root / "ckpt"


# ----------------------------------------------------------------------------------------- equal logits


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_hf_directory_converts_with_equal_logits(tmp_path, bpe, kind):
    hf = hf_dir(tmp_path / "hf", kind, bpe)
    out = tmp_path / "ckpt"
    res = convert(f"source={tmp_path / 'hf'}", f"out={out}")
    assert f"wrote {out}" in res["text"] and res["origin"] == f"hf {kind}"
    # A normal Switchyard checkpoint: its files, every one in the manifest and intact, nothing left beside it.
    assert set(os.listdir(out)) == CKPT_FILES and leftovers(tmp_path) == []
    verify(out)
    meta = read_metadata(out)
    assert meta["source"] == {"path": str(tmp_path / "hf"), "origin": f"hf {kind}", "notes": []}
    model = load_model(out).eval()
    assert model.cfg.moe.layers == "none" and not model.cfg.is_moe
    assert (model.cfg.n_layer, model.cfg.d_model, model.cfg.n_kv_head, model.cfg.vocab_size) == (4, 32, 2, 300)
    assert model.cfg.attn_bias == ("qkv" if kind == "qwen2" else "none")
    ids = ids_for(300)
    assert max_diff(model, hf, ids) < TOL
    # The tokenizer is the source's: same ids for the same text, its own end-of-text token.
    tok = load_tokenizer(out)
    text = f"the lazy fox says hello{EOS} 42 wörld"
    assert isinstance(tok, PretrainedTokenizer) and tok.eos_id == bpe[0].token_to_id(EOS) == 1
    assert tok.encode(text) == bpe[0].encode(text).ids and tok.decode(tok.encode(text)) == text
    assert json.loads((out / "tokenizer_config.json").read_text())["eos_token"] == EOS


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_file_converts_with_equal_logits(tmp_path, bpe, arch):
    _, tokens, merges, types = bpe
    hf = make_hf(arch, tmp_path / "hf", vocab_size=len(tokens))
    gguf_file = tmp_path / "m.gguf"
    write_gguf(gguf_file, hf, quantize=(), arch=arch, tokenizer=(tokens, merges, types, tokens.index(EOS)))
    out = tmp_path / "ckpt"
    res = convert(f"source={gguf_file}", f"out={out}")
    assert res["origin"] == f"gguf {arch}" and set(os.listdir(out)) == CKPT_FILES
    model = load_model(out).eval()
    assert max_diff(model, hf, ids_for(len(tokens))) < TOL
    tok = load_tokenizer(out)
    assert isinstance(tok, PretrainedTokenizer) and tok.eos_id == tokens.index(EOS)
    assert tok.encode("the quick brown dog") == bpe[0].encode("the quick brown dog").ids


def test_load_source_reads_hf_gguf_and_checkpoints_alike(tmp_path, bpe, llama_converted):
    src, hf, ckpt = llama_converted
    ids = ids_for(300)
    ref = hf_logits(hf, ids)
    models = {}
    for name, path in (("hf", src), ("ckpt", ckpt)):
        model, tok = load_source(path)
        assert not model.training and next(model.parameters()).device.type == "cpu"
        assert isinstance(tok, PretrainedTokenizer) and tok.eos_id == 1 and tok.decode(tok.encode("a b")) == "a b"
        with torch.no_grad():
            models[name] = model(ids).logits
    assert (models["hf"] - ref).abs().max() < TOL
    assert torch.equal(models["hf"], models["ckpt"])  # the checkpoint holds exactly what was read
    # dtype casts the parameters only: RoPE's frequencies stay fp32, so bf16 logits stay near the fp32 ones.
    model, _ = load_source(ckpt, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and model.rotary.inv_freq.dtype == torch.float32
    with torch.no_grad():
        assert (model(ids).logits.float() - ref).abs().max() < 0.05
    # A GGUF file without a tokenizer: the model alone.
    write_gguf(tmp_path / "bare.gguf", hf, quantize=())
    model, tok = load_source(tmp_path / "bare.gguf")
    assert tok is None and max_diff(model, hf, ids) < TOL


def test_load_source_reads_sparse_checkpoint(tmp_path):
    torch.manual_seed(0)
    moe = Transformer(PRESETS["tiny_moe"].replace(vocab_size=257)).eval()
    save_checkpoint(tmp_path / "moe", moe, extra={"tokenizer.json": ByteTokenizer().save})
    model, tok = load_source(tmp_path / "moe")
    assert model.cfg.is_moe and isinstance(tok, ByteTokenizer) and tok.eos_id == 256
    ids = torch.tensor([ByteTokenizer().encode("hello sparse world")])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, moe(ids).logits)
    save_checkpoint(tmp_path / "notok", moe)
    assert load_source(tmp_path / "notok")[1] is None


# ------------------------------------------------------------------------------------- continue training


def test_init_from_converted_continues_densely(tmp_path, llama_converted, text_corpus):
    from experiments.convert_checkpoint import convert as relayout
    from experiments.trainer import Trainer

    _, hf, ckpt = llama_converted
    t = Trainer(make_run(tmp_path / "run", text_corpus, f"init_from={ckpt}", "trainer.max_steps=3",
                         "optim.warmup_steps=0", "optim.lr=3e-3", "optim.schedule=constant", model="tiny_dense"))
    # The data is tokenized with the checkpoint's tokenizer, and the model is the source's dense network.
    assert isinstance(t.data.tokenizer, PretrainedTokenizer) and t.data.meta["tokenizer"] == "pretrained"
    assert t.data.tokenizer.encode("the lazy fox") == load_tokenizer(ckpt).encode("the lazy fox")
    assert t.model_cfg == load_model(ckpt).cfg and not t.model_cfg.is_moe
    # Step 0: the trainer's validation loss is transformers' loss of the source model on the same batches.
    with torch.no_grad():
        theirs = [F.cross_entropy(hf_logits(hf, x).flatten(0, 1), y.flatten()).item() for x, y in t.val_set]
    before = t.evaluate()
    assert before == pytest.approx(sum(theirs) / len(theirs), abs=1e-5)
    summary = t.fit()
    assert summary["final_val_loss"] < before
    # The run's checkpoint reads back, in either layout, with the source's tokenizer.
    sharded = relayout(summary["checkpoint"], tmp_path / "sharded", to="sharded")
    (full, tok_full), (shard, tok_shard) = load_source(summary["checkpoint"]), load_source(sharded)
    ids = ids_for(300)
    with torch.no_grad():
        assert torch.equal(full(ids).logits, shard(ids).logits)
    assert tok_full.eos_id == tok_shard.eos_id == 1


# ------------------------------------------------------------------------------------------- bad input


def _refused(tmp_path: Path, match: str, *overrides: str, error=ValueError) -> None:
    out = tmp_path / "out"
    with pytest.raises(error, match=match):
        convert(f"out={out}", *overrides)
    assert not out.exists() and leftovers(tmp_path) == [], f"something was written for {overrides}"


def test_bad_sources_write_nothing(tmp_path, bpe, llama_converted):
    _, hf, ckpt = llama_converted
    _refused(tmp_path, r"source='.*nowhere' does not exist", f"source={tmp_path / 'nowhere'}", error=FileNotFoundError)
    # A sparse Hugging Face model (Mixtral), named by the config field that makes it sparse.
    tok, tokens, merges, types = bpe
    mix = transformers.MixtralConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     max_position_embeddings=64)
    transformers.MixtralForCausalLM(mix).save_pretrained(str(tmp_path / "mixtral"))
    _refused(tmp_path, r"mixtral/config\.json: num_local_experts=4 \(model_type='mixtral'\) is a sparse Mixture-of"
                       r"-Experts model; only dense", f"source={tmp_path / 'mixtral'}")
    # An architecture no reader knows, in either format.
    make_hf("llama", tmp_path / "falcon", vocab_size=300)
    cfg_file = tmp_path / "falcon" / "config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "model_type": "falcon"}))
    _refused(tmp_path, r"falcon/config\.json: model_type='falcon' is not supported; supported: \['gpt2'",
             f"source={tmp_path / 'falcon'}")
    write_gguf(tmp_path / "falcon.gguf", hf, quantize=(), arch="falcon")
    _refused(tmp_path, r"falcon\.gguf: general\.architecture='falcon' is not supported", f"source={tmp_path / 'falcon.gguf'}")
    write_gguf(tmp_path / "experts.gguf", hf, quantize=(), meta_overrides={"expert_count": 8})
    _refused(tmp_path, r"experts\.gguf: llama\.expert_count=8: a sparse Mixture-of-Experts", f"source={tmp_path / 'experts.gguf'}")
    (tmp_path / "text.gguf").write_text("not a gguf")
    _refused(tmp_path, r"is a file but not a GGUF file", f"source={tmp_path / 'text.gguf'}")
    # Already ours: nothing to convert.
    _refused(tmp_path, r"is already a Switchyard checkpoint .*init_from=", f"source={ckpt}")


def _tokenizer_without_endoftext():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=280, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog " * 20], trainer)
    return tok


def test_bad_options_write_nothing(tmp_path):
    # A tokenizer with no end-of-text token named anywhere, and no <|endoftext|>: eos_token= has to say which.
    tok = _tokenizer_without_endoftext()
    make_hf("llama", tmp_path / "hf", vocab_size=tok.get_vocab_size())
    cfg_file = tmp_path / "hf" / "config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "eos_token_id": None, "bos_token_id": None}))
    (tmp_path / "hf" / "tokenizer.json").write_text(tok.to_str())
    src = f"source={tmp_path / 'hf'}"
    _refused(tmp_path, r"names no end-of-text token .*pass eos_token=TOKEN", src)
    _refused(tmp_path, r"eos_token='<nope>' is not a token", src, "eos_token='<nope>'")
    res = convert(src, f"out={tmp_path / 'ok'}", f"eos_token='{EOS}'")
    assert load_tokenizer(res["out"]).eos_id == tok.token_to_id(EOS) == 0
    with pytest.raises(ValueError, match=r"names no end-of-text token"):
        load_source(tmp_path / "hf")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"out='.*out' exists and is not a Switchyard checkpoint"):
        convert(src, f"out={tmp_path / 'out'}")
    assert os.listdir(tmp_path / "out") == ["notes.txt"]
    with pytest.raises(ValueError, match=r"source=\.\.\. is required"):
        run_convert({"source": None, "out": str(tmp_path / "x")})
    with pytest.raises(ValueError, match=r"unknown convert option\(s\) \['layers'\]"):
        run_convert({"source": str(tmp_path / "hf"), "out": str(tmp_path / "x"), "layers": "none"})
    assert not (tmp_path / "x").exists()


def test_command_line(tmp_path, llama_converted):
    src, hf, _ = llama_converted
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "experiments.convert", f"source={src}", f"out={out}"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "source: hf llama" in proc.stdout and f"wrote {out}" in proc.stdout
    assert max_diff(load_model(out).eval(), hf, ids_for(300)) < TOL
