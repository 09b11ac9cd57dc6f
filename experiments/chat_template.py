"""Chat templates: find the Jinja template a checkpoint's tokenizer ships, and render a conversation with it.

Where a template lives in a model directory (the Hugging Face conventions, newest first):
  chat_template.jinja        transformers 5 writes the template as its own file beside the tokenizer
  tokenizer_config.json      "chat_template": a string, or a list of {"name", "template"} (the "default" one used)
Switchyard checkpoints written by experiments.upcycle carry the source's template in tokenizer_config.json (read
from a GGUF file's tokenizer.chat_template or a Hugging Face directory's tokenizer_config.json).

Rendering follows transformers' apply_chat_template: a sandboxed Jinja environment with trim_blocks and
lstrip_blocks, the variables messages, add_generation_prompt, bos_token, eos_token (and the other special tokens
the tokenizer config names), and the helpers raise_exception and strftime_now.
"""
from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any, Optional

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"


def tokenizer_config(folder: str | Path) -> dict[str, Any]:
    """The folder's tokenizer_config.json as a dict ({} when there is none)."""
    path = Path(folder) / TOKENIZER_CONFIG
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(doc).__name__}")
    return doc


def find_chat_template(folder: str | Path) -> Optional[str]:
    """The chat template of the tokenizer in `folder`, or None when it ships none."""
    folder = Path(folder)
    if (folder / TEMPLATE_FILE).is_file():
        return (folder / TEMPLATE_FILE).read_text(encoding="utf-8")
    template = tokenizer_config(folder).get("chat_template")
    if isinstance(template, list):  # named templates (transformers 4): the default one, else the first
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{folder / TOKENIZER_CONFIG}: chat_template must be a string or a list of "
                         f"{{name, template}}, got {type(template).__name__}")
    return template or None


def _token_text(tok: Any) -> Optional[str]:
    return tok.get("content") if isinstance(tok, dict) else tok if isinstance(tok, str) else None


def render_chat(template: str, messages: list[dict[str, str]], special_tokens: Optional[dict[str, Any]] = None,
                add_generation_prompt: bool = True) -> str:
    """The conversation `messages` ([{"role": "system"|"user"|"assistant", "content": ...}]) as the model's text.

    special_tokens: the tokenizer config's bos_token, eos_token, ... (strings or {"content": ...})."""
    try:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:
        raise ImportError("chat templates need jinja2: pip install jinja2 (it comes with torch)") from e

    def raise_exception(message: str):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    tokens = {k: _token_text(v) for k, v in (special_tokens or {}).items() if k.endswith("_token")}
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                **{k: v for k, v in tokens.items() if v is not None})
    except TemplateError as e:
        raise ValueError(f"the chat template failed on this conversation: {e}; pass chat=false to send the "
                         f"prompt as it is") from e
