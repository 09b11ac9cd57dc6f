"""python -m experiments.generate checkpoint=DIR prompt="..." : continue prompts with a checkpoint's model.

The model generates with its KV cache (moe.generation; use_cache=false re-runs the window per token), several
prompts at once as one left-padded batch (prompt='[a, b]'), and stops a row at the tokenizer's end-of-text token
(stop_at_eos). When the checkpoint's tokenizer ships a chat template (chat_template.jinja, or tokenizer_config.json's
chat_template; see experiments.chat_template) and chat=auto, each prompt is sent as a user message through it,
with the assistant's turn opened. It prints the speed, then each sample: its prompt as the model saw it and the
continuation, cut before the end-of-text token.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import hydra
import torch
from omegaconf import DictConfig, ListConfig

from experiments.chat_template import find_chat_template, render_chat, tokenizer_config
from experiments.engines.ranks import resolve_device
from experiments.hydra_conf import CONFIG_DIR
from experiments.tokenizer import Tokenizer, load_tokenizer
from moe.checkpoint import load_model
from moe.generation import left_pad

CHAT_CHOICES = ("auto", True, False)  # auto: the template when the tokenizer has one; True: required; False: never


@dataclass
class Generation:
    texts: list[str]  # per sample (prompts in order, num_samples each): the prompt as fed and its continuation
    rows: int  # samples generated together (B)
    new_tokens: int  # steps run: new tokens per row (fewer than max_new_tokens when every row hit eos)
    seconds: float  # wall time of the whole generation, prefill included
    first_token_s: float  # until every row's first new token (the prefill and one sampling)
    chat: bool  # whether the chat template was applied
    prompt_tokens: list[int] = field(default_factory=list)  # tokens of each row's prompt

    @property
    def tokens_per_s(self) -> float:
        """New tokens of all rows per second, prefill included."""
        return self.rows * self.new_tokens / self.seconds if self.seconds > 0 else float("nan")

    @property
    def tokens_per_s_after_first(self) -> float:
        """New tokens of all rows after the first per second of decoding (the cache's steady state)."""
        decode = self.seconds - self.first_token_s
        return self.rows * (self.new_tokens - 1) / decode if self.new_tokens > 1 and decode > 0 else float("nan")

    def summary(self) -> str:
        return (f"{self.new_tokens} new tokens x {self.rows} rows in {self.seconds:.2f} s: "
                f"{self.tokens_per_s:.1f} tokens/s, {self.tokens_per_s_after_first:.1f} tokens/s after the first "
                f"token (first after {1000 * self.first_token_s:.0f} ms; prompts of {min(self.prompt_tokens)}-"
                f"{max(self.prompt_tokens)} tokens{', chat template applied' if self.chat else ''})")


def _chat_choice(chat) -> object:
    if isinstance(chat, str) and chat.lower() in ("true", "false"):
        chat = chat.lower() == "true"
    if chat not in CHAT_CHOICES:
        raise ValueError(f"chat={chat!r} must be auto, true or false")
    return chat


def prompt_ids(tok: Tokenizer, folder: Path, prompt: str, chat, system: Optional[str]) -> tuple[list[int], bool]:
    """The token ids the model sees for `prompt`, and whether the chat template made them."""
    template = find_chat_template(folder) if chat is not False else None
    if chat is True and template is None:
        raise ValueError(f"chat=true but the tokenizer in {folder} ships no chat template (no chat_template.jinja, "
                         f"no chat_template in tokenizer_config.json); pass chat=auto or chat=false")
    if template is None:
        return tok.encode(prompt) or [tok.eos_id], False
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    text = render_chat(template, messages, tokenizer_config(folder))
    # The template writes the special tokens (bos, role markers) itself, so the tokenizer must not add its own
    # (a second BOS), as transformers' apply_chat_template tokenizes: add_special_tokens=False.
    inner = getattr(tok, "_tok", None)
    ids = inner.encode(text, add_special_tokens=False).ids if inner is not None else tok.encode(text)
    return ids or [tok.eos_id], True


def run_generation(checkpoint: str | Path, prompts: str | Sequence[str], max_new_tokens: int = 200,
                   temperature: float = 0.8, top_k: int | None = 50, num_samples: int = 1, seed: int = 0,
                   device: str = "auto", chat="auto", system: Optional[str] = None, use_cache: bool = True,
                   stop_at_eos: bool = True) -> Generation:
    path = Path(checkpoint)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"{path / 'tokenizer.json'} is missing; pass a checkpoint written by experiments.train "
            f"(runs/.../checkpoints/step_N), which stores its tokenizer"
        )
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples} must be at least 1")
    chat = _chat_choice(chat)
    tok = load_tokenizer(path / "tokenizer.json")
    dev = resolve_device(device)
    model = load_model(path, map_location=dev).eval()
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    encoded = [prompt_ids(tok, path, p, chat, system) for p in prompts]
    rows = [ids for ids, _ in encoded for _ in range(num_samples)]
    idx, mask = left_pad(rows, pad_id=tok.eos_id, device=dev)
    g = torch.Generator(device=dev).manual_seed(seed)
    stamps: list[float] = []
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=g,
                         eos_id=tok.eos_id if stop_at_eos else None, attention_mask=mask, use_cache=use_cache,
                         on_token=lambda t: stamps.append(time.perf_counter()))
    sync()
    seconds = time.perf_counter() - start
    texts = []
    width = idx.shape[1]
    for b, ids in enumerate(rows):
        new = out[b, width:].tolist()
        if stop_at_eos and tok.eos_id in new:
            new = new[:new.index(tok.eos_id)]
        texts.append(tok.decode(ids + new))
    first = stamps[0] - start if stamps else seconds
    return Generation(texts=texts, rows=len(rows), new_tokens=out.shape[1] - width, seconds=seconds,
                      first_token_s=first, chat=any(c for _, c in encoded), prompt_tokens=[len(r) for r in rows])


def generate_text(checkpoint: str | Path, prompt: str | Sequence[str], max_new_tokens: int = 200,
                  temperature: float = 0.8, top_k: int | None = 50, num_samples: int = 1, seed: int = 0,
                  device: str = "auto", chat="auto", system: Optional[str] = None, use_cache: bool = True,
                  stop_at_eos: bool = True) -> list[str]:
    """The samples' texts alone (run_generation has the timings); one argument per key of conf/generate.yaml."""
    return run_generation(checkpoint, prompt, max_new_tokens, temperature, top_k, num_samples, seed, device,
                          chat=chat, system=system, use_cache=use_cache, stop_at_eos=stop_at_eos).texts


@hydra.main(config_path=CONFIG_DIR, config_name="generate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    prompts = list(cfg.prompt) if isinstance(cfg.prompt, ListConfig) else str(cfg.prompt)
    result = run_generation(cfg.checkpoint, prompts, cfg.max_new_tokens, cfg.temperature, cfg.top_k,
                            cfg.num_samples, cfg.seed, cfg.device, chat=cfg.chat, system=cfg.system,
                            use_cache=cfg.use_cache, stop_at_eos=cfg.stop_at_eos)
    print(f"generated {result.summary()}")
    for i, text in enumerate(result.texts):
        print(f"--- sample {i} ---\n{text}")


if __name__ == "__main__":
    main()
