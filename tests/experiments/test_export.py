"""The export app: a training run's checkpoint (either layout, or the run directory) becomes a directory that
AutoModelForCausalLM loads with our logits (fp32, within 1e-4) and AutoTokenizer with our token ids (byte and BPE
tokenizers; a released model's chat template kept); bf16=true writes bf16; refusals name the field and write
nothing; the upcycle app's export option writes a loadable model with its tokenizer."""
from __future__ import annotations

import json

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file

from experiments.convert_checkpoint import convert
from experiments.export import KEYS, run_export
from experiments.tokenizer import BPETokenizer, ByteTokenizer, load_tokenizer
from experiments.trainer import Trainer
from moe.checkpoint import load_model, save_checkpoint
from moe.model import Transformer
from moe.presets import get_preset
from moe.sharded_checkpoint import SHARDED_DIR
from routing.config import RouterConfig
from tests.experiments.test_train import make_run

transformers = pytest.importorskip("transformers")
TOL = 1e-4
TEXT = "the quick brown fox: héllo wörld 🙂\n  and 42 more"
MOE = ["model.moe.layers=every:2", "model.moe.num_shared_experts=1", "model.moe.shared_gate=true",
       "optim.warmup_steps=0", "trainer.max_steps=2", "trainer.ckpt_interval=2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, text_corpus):
    """A real training run (byte tokenizer, every:2 MoE with a gated shared expert, 2 steps)."""
    root = tmp_path_factory.mktemp("export_run")
    Trainer(make_run(root / "run", text_corpus, *MOE)).fit()
    return root / "run"


def compose_export(*overrides: str) -> dict:
    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = compose("export", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def hf_diff(out, model, ids) -> tuple[float, object]:
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        return (hf(input_ids=ids).logits - model.eval()(ids).logits).abs().max().item(), hf


def test_conf_has_every_option():
    assert set(compose_export("checkpoint=a", "out=b")) == set(KEYS)


def test_byte_tokenizer_as_hf_has_our_ids():
    """Every byte a UTF-8 text can hold (U+0000..U+07FF cover the one- and two-byte forms, then three- and
    four-byte characters) encodes to its own value, and decodes back."""
    from experiments.tokenizer import hf_tokenizer_files

    inner, config = hf_tokenizer_files(ByteTokenizer(), model_max_length=128)
    text = "".join(map(chr, range(0x800))) + "€你好𝄞🙂" + chr(0xFFFD) + chr(0x10FFFF)
    ours = ByteTokenizer()
    assert inner.encode(text).ids == ours.encode(text) == list(text.encode("utf-8"))
    assert inner.decode(ours.encode(text)) == ours.decode(ours.encode(text)) == text
    assert inner.get_vocab_size() == 257 and inner.token_to_id("<|endoftext|>") == 256
    assert config == {"eos_token": "<|endoftext|>", "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 128}


def test_training_checkpoint_exports_with_byte_tokenizer(run, tmp_path, capsys):
    ckpt = run / "checkpoints" / "step_2"
    res = run_export(compose_export(f"checkpoint={ckpt}", f"out={tmp_path / 'hf'}"))
    printed = capsys.readouterr().out
    assert res["format"] == "qwen2_moe" and "chosen by format=auto" in printed
    assert "mixtral: layers [0] are dense" in printed and "verify: AutoTokenizer" in printed
    assert "verify: routing: in 1 sparse layer every token goes to the same experts as in ours" in printed
    model = load_model(ckpt)
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    ids = tok(TEXT)["input_ids"]
    assert ids == ByteTokenizer().encode(TEXT) and tok.decode(ids) == TEXT
    assert tok.eos_token_id == 256 and tok.convert_ids_to_tokens(256) == "<|endoftext|>"
    diff, hf = hf_diff(tmp_path / "hf", model, torch.tensor([ids[:32]]))
    assert type(hf).__name__ == "Qwen2MoeForCausalLM" and diff < TOL, f"max |Δ logit| {diff:.2e}"
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["eos_token_id"], config["dtype"], config["vocab_size"]) == (256, "float32", 257)


def test_run_directory_exports_its_newest_checkpoint(run, tmp_path, capsys):
    run_export(compose_export(f"checkpoint={run}", f"out={tmp_path / 'hf'}", "verify=false"))
    assert f"checkpoint: {run / 'checkpoints' / 'step_2'} (step 2)" in capsys.readouterr().out


def test_sharded_layout_exports_the_same_file(run, tmp_path, capsys):
    """The layout trainer=fsdp writes (sharded/, no model.safetensors) exports tensor for tensor as the full one."""
    full = run / "checkpoints" / "step_2"
    sharded = convert(full, tmp_path / "sharded")
    assert (sharded / SHARDED_DIR).is_dir() and not (sharded / "model.safetensors").exists()
    run_export(compose_export(f"checkpoint={sharded}", f"out={tmp_path / 'a'}"))
    assert "sharded layout" in capsys.readouterr().out
    run_export(compose_export(f"checkpoint={full}", f"out={tmp_path / 'b'}", "verify=false"))
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_flag(run, tmp_path, capsys):
    res = run_export(compose_export(f"checkpoint={run}", f"out={tmp_path / 'hf'}", "bf16=true"))
    assert res["dtype"] == torch.bfloat16 and "against our weights rounded to torch.bfloat16" in capsys.readouterr().out
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}


@pytest.fixture(scope="module")
def dense_bpe(tmp_path_factory, text_corpus):
    """A dense Llama-shaped checkpoint with a trained BPE tokenizer (no chat template of its own)."""
    path = tmp_path_factory.mktemp("dense_bpe") / "ckpt"
    tok = BPETokenizer.train([text_corpus.read_text()], 300)
    cfg = get_preset("tiny_dense").replace(vocab_size=tok.vocab_size, n_layer=2, d_model=32, n_head=2, d_ff=64,
                                           max_seq_len=32, attn_bias="qkv")
    torch.manual_seed(0)
    save_checkpoint(path, Transformer(cfg), extra={"tokenizer.json": tok.save})
    return path


def test_dense_bpe_checkpoint_with_a_chat_template(dense_bpe, tmp_path):
    template = tmp_path / "chat.jinja"  # a file: a template's braces and quotes are not Hydra override syntax
    template.write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}")
    res = run_export(compose_export(f"checkpoint={dense_bpe}", f"out={tmp_path / 'hf'}", f"chat_template={template}"))
    assert res["format"] == "qwen2"  # q/k/v biases
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    ours = load_tokenizer(dense_bpe)
    assert tok(TEXT)["input_ids"] == ours.encode(TEXT) and tok.eos_token_id == ours.eos_id
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "<user>hi<|endoftext|>"
    diff, hf = hf_diff(tmp_path / "hf", load_model(dense_bpe), torch.tensor([ours.encode(TEXT)[:32]]))
    assert type(hf).__name__ == "Qwen2ForCausalLM" and diff < TOL


def test_upcycled_model_keeps_its_chat_template(tmp_path):
    """The upcycle app with export_hf=DIR (an every:2 MoE of a released Llama with its own tokenizer and chat
    template) and this app on the upcycled checkpoint both write a model and tokenizer transformers loads."""
    from experiments.upcycle import run_upcycle
    from tests.upcycle.conftest import make_hf
    from tests.upcycle.test_gguf import _tiny_bpe

    src = tmp_path / "src"
    bpe, tokens, _, _ = _tiny_bpe()
    make_hf("llama", src, vocab_size=len(tokens), max_position_embeddings=64)
    (src / "tokenizer.json").write_text(bpe.to_str())
    (src / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "chat_template": "[{{ messages[0]['content'] }}]"}))
    with initialize_config_module(config_module="conf", version_base="1.3"):
        up = OmegaConf.to_container(compose("upcycle", overrides=[
            f"source={src}", f"out={tmp_path / 'moe'}", "num_experts=4", "router_init_std=0.5",
            f"export_hf={tmp_path / 'from_upcycle'}"]), resolve=True)
    run_upcycle(up)
    run_export(compose_export(f"checkpoint={tmp_path / 'moe'}", f"out={tmp_path / 'from_export'}"))
    model = load_model(tmp_path / "moe")
    for out in ("from_upcycle", "from_export"):
        tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / out))
        assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "[hi]"
        assert tok.eos_token == "<|im_end|>" and tok("the lazy fox")["input_ids"] == bpe.encode("the lazy fox").ids
        diff, hf = hf_diff(tmp_path / out, model, torch.tensor([bpe.encode("the quick brown fox jumps").ids]))
        assert type(hf).__name__ == "Qwen2MoeForCausalLM" and diff < TOL, (out, diff)


def test_refusal_names_the_router_and_writes_nothing(tmp_path):
    cfg = get_preset("tiny_moe").replace(vocab_size=64, n_layer=2, d_model=32, n_head=2, d_ff=64, max_seq_len=32)
    cfg.moe.router = RouterConfig(name="expert_choice", capacity_factor=1.0)
    save_checkpoint(tmp_path / "ckpt", Transformer(cfg))
    with pytest.raises(ValueError, match="model.moe.router.name='expert_choice'"):
        run_export(compose_export(f"checkpoint={tmp_path / 'ckpt'}", f"out={tmp_path / 'hf'}"))
    with pytest.raises(ValueError, match=r"format=gpt2 cannot represent this model exactly: sparse layers \[0, 1\]"):
        run_export(compose_export(f"checkpoint={tmp_path / 'ckpt'}", f"out={tmp_path / 'hf'}", "format=gpt2"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_failed_verification_writes_nothing(run, tmp_path, monkeypatch):
    import dataclasses

    import upcycle.export_formats as formats

    good = formats.QWEN2_MOE_FORMAT
    wrong = dataclasses.replace(good, config=lambda cfg: {**good.config(cfg), "norm_topk_prob": False})  # not ours
    monkeypatch.setitem(formats.FORMATS, "qwen2_moe", wrong)
    with pytest.raises(ValueError, match=r"does not reproduce the model; nothing was written"):
        run_export(compose_export(f"checkpoint={run}", f"out={tmp_path / 'hf'}"))
    assert not list(tmp_path.iterdir())


def test_bad_paths_are_named(run, tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a checkpoint directory"):
        run_export(compose_export(f"checkpoint={tmp_path}", f"out={tmp_path / 'hf'}"))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not a Hugging Face export"):
        run_export(compose_export(f"checkpoint={run}", f"out={tmp_path / 'busy'}"))
    with pytest.raises(ValueError, match="unknown export option"):
        run_export({"checkpoint": str(run), "out": str(tmp_path / "x"), "fromat": "llama"})


@pytest.mark.distributed
def test_fsdp_sharded_checkpoint_exports(tmp_path, text_corpus):
    """trainer=fsdp on 2 processes writes the sharded layout; its checkpoint exports with our logits."""
    from tests.distributed._spawn import launch_train
    from tests.experiments.test_train import TINY, data_overrides

    launch_train(2, ["model=tiny_moe", *data_overrides(text_corpus), *TINY, *MOE, "trainer=fsdp", "trainer.threads=1",
                     f"hydra.run.dir={tmp_path / 'run'}"])
    ckpt = tmp_path / "run" / "checkpoints" / "step_2"
    assert (ckpt / SHARDED_DIR).is_dir() and not (ckpt / "model.safetensors").exists()
    res = run_export(compose_export(f"checkpoint={tmp_path / 'run'}", f"out={tmp_path / 'hf'}"))
    assert res["format"] == "qwen2_moe" and "sharded layout" in res["text"]
    ids = torch.tensor([ByteTokenizer().encode(TEXT)[:32]])
    diff, _ = hf_diff(tmp_path / "hf", load_model(ckpt), ids)
    assert diff < TOL
