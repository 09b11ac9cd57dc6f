"""experiments.generate: the chat template is read (chat_template.jinja first, then tokenizer_config.json) and applied
by chat=auto, required by chat=true, skipped by chat=false; several prompts run as one padded batch and each
gives the text it gives alone; the app prints tokens/s overall and after the first token."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from experiments.chat_template import find_chat_template, render_chat
from experiments.generate import generate_text, run_generation
from experiments.tokenizer import BPETokenizer, PretrainedTokenizer
from moe import ModelConfig, MoEConfig, Transformer
from moe.checkpoint import save_checkpoint
from routing import RouterConfig

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXT = ["the quick brown fox jumps over the lazy dog", "hello world, hello there", "a user asks and an assistant answers"]


def _tokenizer(template=CHATML) -> PretrainedTokenizer:
    inner = BPETokenizer.train(TEXT, 300)._tok
    inner.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    config = {"eos_token": "<|im_end|>", **({"chat_template": template} if template else {})}
    return PretrainedTokenizer(inner, config)


def _checkpoint(path, tok, jinja=None):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=2, d_model=32, n_head=4, n_kv_head=2, d_ff=48,
                      max_seq_len=64, activation="silu", glu=True, norm="rmsnorm", position="rope",
                      tie_embeddings=False, init_std=0.2,
                      moe=MoEConfig(layers="all", num_experts=4, router=RouterConfig(top_k=2)))
    extra = {"tokenizer.json": tok.save}  # PretrainedTokenizer.save writes tokenizer_config.json beside it
    if jinja is not None:
        extra["chat_template.jinja"] = lambda p: p.write_text(jinja, encoding="utf-8")
    return save_checkpoint(path, Transformer(cfg), extra=extra)


@pytest.fixture(scope="module")
def chat_ckpt(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("gen") / "chat", _tokenizer())


def test_render_chat():
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert render_chat(CHATML, msgs) == ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                                         "<|im_start|>assistant\n")
    assert render_chat("{{ bos_token }}{{ messages[0]['content'] }}", msgs[1:], {"bos_token": {"content": "<s>"}}) \
        == "<s>hi"
    with pytest.raises(ValueError, match="chat=false"):
        render_chat("{{ raise_exception('no system role') }}", msgs)


def test_find_chat_template(tmp_path):
    assert find_chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}))
    assert find_chat_template(tmp_path) == "D"
    (tmp_path / "chat_template.jinja").write_text("J")  # transformers 5's file wins
    assert find_chat_template(tmp_path) == "J"


def test_chat_template_is_applied(chat_ckpt):
    result = run_generation(chat_ckpt, "hello", max_new_tokens=4, temperature=0, device="cpu", stop_at_eos=False)
    assert result.chat
    assert result.texts[0].startswith("<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n")
    tok = _tokenizer()
    rendered = "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert result.prompt_tokens == [len(tok._tok.encode(rendered, add_special_tokens=False).ids)]
    assert result.new_tokens == 4 and result.rows == 1
    assert result.tokens_per_s > 0 and result.tokens_per_s_after_first > 0 and 0 < result.first_token_s < result.seconds
    system = run_generation(chat_ckpt, "hello", max_new_tokens=1, temperature=0, device="cpu", system="be brief")
    assert system.texts[0].startswith("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhello")
    raw = run_generation(chat_ckpt, "hello", max_new_tokens=1, temperature=0, device="cpu", chat=False)
    assert not raw.chat and raw.texts[0].startswith("hello")


def test_chat_template_jinja_file_is_read(tmp_path):
    ckpt = _checkpoint(tmp_path / "jinja", _tokenizer(template=None), jinja="[[{{ messages[0]['content'] }}]]")
    assert generate_text(ckpt, "hello", max_new_tokens=2, temperature=0, device="cpu")[0].startswith("[[hello]]")
    plain = _checkpoint(tmp_path / "plain", _tokenizer(template=None))
    assert not run_generation(plain, "hello", max_new_tokens=1, temperature=0, device="cpu").chat
    with pytest.raises(ValueError, match="chat=true"):
        run_generation(plain, "hello", max_new_tokens=1, device="cpu", chat=True)
    with pytest.raises(ValueError, match="chat="):
        run_generation(plain, "hello", max_new_tokens=1, device="cpu", chat="maybe")


def test_prompts_of_different_lengths_give_what_they_give_alone(chat_ckpt):
    prompts = ["hi", "the quick brown fox jumps over the lazy dog again and again"]
    together = generate_text(chat_ckpt, prompts, max_new_tokens=6, temperature=0, device="cpu", stop_at_eos=False)
    alone = [generate_text(chat_ckpt, p, max_new_tokens=6, temperature=0, device="cpu", stop_at_eos=False)[0]
             for p in prompts]
    assert together == alone
    assert together == generate_text(chat_ckpt, prompts, max_new_tokens=6, temperature=0, device="cpu",
                                     stop_at_eos=False, use_cache=False)
    samples = run_generation(chat_ckpt, prompts, max_new_tokens=3, temperature=1.0, num_samples=2, device="cpu")
    assert samples.rows == 4 and len(samples.texts) == 4


def test_cli_prints_tokens_per_second(chat_ckpt, tmp_path):
    out = subprocess.run([sys.executable, "-m", "experiments.generate", f"checkpoint={chat_ckpt}", "prompt=hello",
                          "max_new_tokens=3", "temperature=0", "device=cpu", "stop_at_eos=false"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    head, sample = out.stdout.split("--- sample 0 ---\n", 1)
    assert "3 new tokens x 1 rows" in head and "tokens/s after the first token" in head
    assert "chat template applied" in head
    assert sample.rstrip("\n") == generate_text(chat_ckpt, "hello", max_new_tokens=3, temperature=0, device="cpu",
                                                stop_at_eos=False)[0]
