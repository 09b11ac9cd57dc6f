"""Export to Hugging Face checkpoints: config.json + model.safetensors (+ tokenizer files), loadable by
transformers' AutoModelForCausalLM with our logits.

  choose_format(cfg, "auto")   the format that holds the model exactly, and for every other one why it does not
  hf_checkpoint(model, fmt)    (config.json, tensors): our state through the reader's key map run backwards
  export_hf(model, dir, ...)   writes the directory atomically

The formats and what each can represent are in upcycle/export_formats.py; the tensor names and layouts are the
readers' key maps (upcycle/keymaps.py), inverted by `invert_keymap`, so reading and writing share one table.

dtype: the tensors are written in the dtype asked for (None: the model's own, i.e. its embedding's), and config.json
says so. Routers are fp32 in our model whatever its dtype; transformers' formats have one dtype for the whole model,
so a bf16 export has bf16 routers too (routing decisions can differ where two experts' logits nearly tie).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from moe.checkpoint import model_state, write_atomically
from moe.config import ModelConfig
from moe.model import Transformer
from upcycle.export_formats import FORMATS, HFFormat
from upcycle.keymaps import invert_keymap

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass
class FormatChoice:
    format: HFFormat  # the format to write
    problems: dict[str, list[str]] = field(default_factory=dict)  # format name -> why it cannot hold the model
    requested: str = "auto"  # what was asked for: auto or a format name

    def text(self) -> str:
        """What was chosen and why every other format was not."""
        how = "chosen by format=auto: the first that holds the model exactly" if self.requested == "auto" else "as asked"
        lines = [f"format: {self.format.name} ({self.format.architecture}), {how}"]
        for name, why in self.problems.items():
            if name == self.format.name:
                continue
            lines.append(f"  {name}: " + ("also exact (auto prefers the formats listed first)" if not why
                                          else "; ".join(why)))
        return "\n".join(lines)


def choose_format(cfg: ModelConfig, requested: str = "auto") -> FormatChoice:
    """The format to write `cfg` in: `requested`, or for "auto" the first of FORMATS that represents the model
    exactly. Raises ValueError naming, per format, what it cannot hold when no (or not the requested) format fits."""
    if requested != "auto" and requested not in FORMATS:
        raise ValueError(f"format={requested!r} is not a Hugging Face format we write; choose auto or one of "
                         f"{list(FORMATS)}")
    problems = {name: f.problems(cfg) for name, f in FORMATS.items()}
    if requested != "auto":
        if problems[requested]:
            raise ValueError(f"format={requested} cannot represent this model exactly: "
                             + "; ".join(problems[requested]) + _alternatives(problems))
        return FormatChoice(FORMATS[requested], problems, requested)
    for name, why in problems.items():
        if not why:
            return FormatChoice(FORMATS[name], problems, requested)
    raise ValueError("no Hugging Face format represents this model exactly:\n"
                     + "\n".join(f"  {name}: " + "; ".join(why) for name, why in problems.items()))


def _alternatives(problems: dict[str, list[str]]) -> str:
    exact = [name for name, why in problems.items() if not why]
    return f" (exact: {', '.join(exact)}; or format=auto)" if exact else " (no format holds it exactly)"


def hf_checkpoint(model: Transformer, fmt: str | HFFormat = "auto") -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(config.json contents without dtype and token ids, tensors in Hugging Face names) of this model in `fmt` (a
    name, "auto", or a chosen HFFormat; `fmt.notes(cfg)` says how parts the format spells differently are written)."""
    cfg = model.cfg
    f = fmt if isinstance(fmt, HFFormat) else choose_format(cfg, fmt).format
    tensors = invert_keymap(f.keymap, model_state(model), cfg, prefix=f.prefix)
    f.complete(cfg, tensors)
    config = {"architectures": [f.architecture], "model_type": f.name, **f.config(cfg)}
    return config, tensors


def model_dtype(model: Transformer) -> torch.dtype:
    """The dtype a model's weights are in (its embedding's: routers stay fp32 in every model)."""
    return model.embed.weight.dtype


def export_hf(model: Transformer, out: str | Path, tokenizer=None, tokenizer_config: Optional[dict] = None,
              special_ids: Optional[dict[str, int]] = None, format: str = "auto",
              dtype: Optional[torch.dtype] = None) -> Path:
    """Writes `out` (atomically: a temporary folder renamed into place) as a Hugging Face checkpoint.

    tokenizer: a `tokenizers.Tokenizer` written as tokenizer.json; tokenizer_config: written as
    tokenizer_config.json (special tokens, chat template, tokenizer_class); special_ids: bos/eos/pad token ids
    for config.json (e.g. {"eos": 256}); format: auto or a name of upcycle.export_formats.FORMATS; dtype: the
    tensors' dtype, None for the model's own (model_dtype)."""
    from safetensors.torch import save_file

    dtype = dtype or model_dtype(model)
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype={dtype} cannot be exported; use float32, bfloat16 or float16")
    config, tensors = hf_checkpoint(model, format)
    # Every id key explicitly, so a format's defaults (Mixtral: bos 1, eos 2) never name tokens we do not have.
    config.update({f"{k}_token_id": None for k in ("bos", "eos", "pad")})
    config.update({f"{k}_token_id": v for k, v in (special_ids or {}).items()})
    config.update(dtype=DTYPE_NAMES[dtype], torch_dtype=DTYPE_NAMES[dtype])  # transformers 5 reads dtype, 4 torch_dtype
    # safetensors refuses shared storage (a tied head, a split expert bank): every tensor is its own contiguous copy.
    tensors = {k: v.detach().to(dtype).contiguous().clone() for k, v in tensors.items()}
    out = Path(out)
    with write_atomically(out) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            (tmp / "tokenizer.json").write_text(tokenizer.to_str(), encoding="utf-8")
        if tokenizer is not None or tokenizer_config:
            # tokenizer.json holds the whole tokenizer, so the fast class reads it as it is (a slow class named by
            # a source, or the model type's default, would look for vocabulary files we do not write)
            side = {"tokenizer_class": "PreTrainedTokenizerFast", **(tokenizer_config or {})}
            (tmp / "tokenizer_config.json").write_text(json.dumps(side, indent=1) + "\n", encoding="utf-8")
    return out


# ------------------------------------------------------------------------------------------ routing agreement
# Shape legend: T tokens, E experts, k experts per token. When is an export's logits equal to ours? The two models
# compute the same router logits up to fp32 round-off (other kernels, other summation orders); a token routes the
# same in both whenever its k-th and (k+1)-th largest router logits differ by more than that round-off (the top-k
# margin). At a near-tie (margin ~1e-7) either choice is a correct reading of the weights, and one token sent to
# another expert can move a logit by whole units. So the export check reports routing beside max |Δ logit|.


@dataclass
class LayerRouting:
    layer: int  # sparse layer (our block index)
    tokens: int  # tokens compared
    differ: int  # tokens whose set of chosen experts differs between our model and the export
    min_margin_differ: Optional[float]  # smallest top-k margin of our router logits among those tokens; None: none
    min_margin: float  # smallest top-k margin over all the layer's tokens: its closest near-tie

    def text(self) -> str:
        if not self.differ:
            return f"layer {self.layer}: all {self.tokens} tokens route alike (smallest top-k margin {self.min_margin:.1e})"
        return (f"layer {self.layer}: {self.differ} of {self.tokens} tokens route to other experts (smallest router "
                f"margin among them {self.min_margin_differ:.1e})")


def topk_margin(logits: Tensor, k: int) -> Tensor:
    """[T]: the k-th minus the (k+1)-th largest router logit of each token of logits [T, E] (inf when k >= E)."""
    if k >= logits.shape[-1]:
        return torch.full(logits.shape[:-1], float("inf"))
    top = logits.float().topk(k + 1, dim=-1).values
    return top[..., k - 1] - top[..., k]


def chosen_mask(indices: Tensor, num_experts: int) -> Tensor:
    """[T, E] bool from chosen expert indices [T, k]."""
    return torch.zeros(indices.shape[0], num_experts, dtype=torch.bool).scatter_(1, indices.long(), True)


def routing_agreement(logits: dict[int, Tensor], ours: dict[int, Tensor], theirs: dict[int, Tensor], k: int
                      ) -> list[LayerRouting]:
    """Per sparse layer: logits [T, E] our router logits, ours / theirs [T, E] bool the experts each token went to
    in our model and in the export (the same tokens, in order)."""
    missing = sorted(set(ours) ^ set(theirs))
    if missing:
        raise ValueError(f"sparse layers {missing} were seen in only one of the two models; the export's layers do "
                         f"not match ours")
    out = []
    for i in sorted(ours):
        a, b = ours[i], theirs[i]
        if a.shape != b.shape:
            raise ValueError(f"layer {i}: our routing covers {tuple(a.shape)} (tokens, experts), the export's "
                             f"{tuple(b.shape)}")
        differ = (a != b).any(-1)
        margin = topk_margin(logits[i], k)
        n = int(differ.sum())
        out.append(LayerRouting(layer=i, tokens=a.shape[0], differ=n, min_margin=float(margin.min()),
                                min_margin_differ=float(margin[differ].min()) if n else None))
    return out


@torch.no_grad()
def our_routing(model: Transformer, ids: Tensor) -> tuple[Tensor, dict[int, Tensor], dict[int, Tensor]]:
    """(logits [B, S, V], router logits per sparse layer [T, E], chosen experts per sparse layer [T, E] bool) of
    one evaluation-mode forward pass over ids [B, S]."""
    from moe.layer import MoELayer

    router_logits, chosen, hooks = {}, {}, []

    def capture(i: int):
        def hook(layer, args, output):
            h = args[0].reshape(-1, args[0].shape[-1])  # [T, d]
            plan = output[1]
            router_logits[i] = layer.router.logits(h).float()
            mask = torch.zeros(plan.num_tokens, plan.num_experts, dtype=torch.bool)
            mask[plan.token_index.cpu(), plan.expert_index.cpu()] = True
            chosen[i] = mask
        return hook

    for i, block in enumerate(model.blocks):
        if isinstance(block.ffn, MoELayer):
            hooks.append(block.ffn.register_forward_hook(capture(i)))
    try:
        logits = model.eval()(ids).logits
    finally:
        for h in hooks:
            h.remove()
    return logits, router_logits, chosen
