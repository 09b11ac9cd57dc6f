"""python -m experiments.export checkpoint=DIR out=HF_DIR [format=auto] [bf16=false] [verify=true]

Writes a Switchyard checkpoint as a Hugging Face model directory that transformers loads with
AutoModelForCausalLM and AutoTokenizer:

    HF_DIR/config.json             the format's config (model_type, architectures, dtype, eos_token_id, ...)
    HF_DIR/model.safetensors       the weights in the format's names and layout (upcycle/export.py)
    HF_DIR/tokenizer.json          the checkpoint's tokenizer (byte, BPE or a released model's), when it has one
    HF_DIR/tokenizer_config.json   eos_token, model_max_length, the chat template, tokenizer_class

DIR is a checkpoint directory of either layout (runs/.../checkpoints/step_N, model.safetensors or trainer=fsdp's
sharded/), an upcycled model, or a run directory (its newest checkpoint). format=auto writes the first format that
represents the model exactly (llama, qwen2, gpt2, opt for dense models; mixtral, qwen2_moe for MoEs) and prints
why each other format does not; naming a format that cannot represent the model is refused with its reasons.

dtype: the checkpoint's own (what training stored: our trainers keep fp32 weights and run bf16 autocast on them,
so a trainer.precision=bf16 run exports fp32), or bf16=true for bfloat16.

verify=true (the default) loads the export with transformers before it is put in place: its logits on a text
sample must be within verify_tol of ours (for bf16, of our model with its weights rounded to bf16, so the check
still proves the mapping exact) and AutoTokenizer must give our token ids. A failed check writes nothing.
"""
from __future__ import annotations

import copy
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import hydra
import torch
from omegaconf import DictConfig

from experiments.app_options import check_options, exits_on_config_error, resolved
from experiments.hydra_conf import CONFIG_DIR
from upcycle.export import chosen_mask, our_routing, routing_agreement

KEYS = ("checkpoint", "out", "format", "bf16", "tokenizer", "chat_template", "verify", "verify_text", "verify_tokens",
        "verify_tol")
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def find_checkpoint(path: Path) -> Path:
    """`path` when it is a checkpoint directory, or the newest checkpoints/step_N of a run directory."""
    if (path / "config.json").is_file():
        return path
    steps = []
    for p in (path / "checkpoints").iterdir() if (path / "checkpoints").is_dir() else []:
        prefix, _, number = p.name.partition("_")
        if prefix == "step" and number.isdigit() and (p / "config.json").is_file():
            steps.append((int(number), p))
    if not steps:
        raise FileNotFoundError(f"checkpoint={str(path)!r} is neither a checkpoint directory (config.json) nor a run "
                                f"directory with checkpoints/step_N; pass one of those")
    return max(steps)[1]


def stored_dtype(path: Path) -> torch.dtype:
    """The dtype a checkpoint stores its weights in (its embedding's; routers are fp32 in every model)."""
    from moe.sharded_checkpoint import SHARDED_DIR, WEIGHT, is_sharded, tensor_shapes

    if (path / "model.safetensors").is_file():
        from safetensors import safe_open

        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            code = f.get_slice("embed.weight").get_dtype()
        if code not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path / 'model.safetensors'} stores embed.weight as {code}; export writes float "
                             f"weights ({sorted(SAFETENSORS_DTYPES)})")
        return SAFETENSORS_DTYPES[code]
    if is_sharded(path):
        return tensor_shapes(path / SHARDED_DIR)[WEIGHT + "embed.weight"][1]
    raise FileNotFoundError(f"{path} has neither model.safetensors nor sharded/; the checkpoint is incomplete")


def _chat_template(value: Optional[str]) -> Optional[str]:
    """chat_template=...: a path to a Jinja file (on the command line), or the template itself (from Python)."""
    if value is None:
        return None
    p = Path(value).expanduser()
    return p.read_text(encoding="utf-8") if len(value) < 4096 and p.is_file() else value


def _tokenizer(opts: dict, ckpt: Path, max_len: int):
    """(our tokenizer, tokenizers.Tokenizer, tokenizer_config, special ids) or Nones when there is none."""
    from experiments.tokenizer import hf_tokenizer_files, load_tokenizer

    where = Path(opts["tokenizer"]).expanduser() if opts.get("tokenizer") else ckpt
    if not opts.get("tokenizer") and not (ckpt / "tokenizer.json").is_file():
        return None, None, None, {}
    tok = load_tokenizer(where)
    template = _chat_template(opts.get("chat_template"))
    side = (where if where.is_dir() else where.parent) / "chat_template.jinja"  # transformers 5 keeps it apart
    if template is None and side.is_file():
        template = side.read_text(encoding="utf-8")
    inner, config = hf_tokenizer_files(tok, model_max_length=max_len, chat_template=template)
    ids = {"eos": tok.eos_id}
    for kind in ("bos", "pad"):  # a released model's tokenizer may name these too
        text = config.get(f"{kind}_token")
        text = text.get("content") if isinstance(text, dict) else text
        if text and inner.token_to_id(text) is not None:
            ids[kind] = inner.token_to_id(text)
    return tok, inner, config, ids


def _check_out(out: Path, ckpt: Path) -> None:
    if out.resolve() == ckpt.resolve():
        raise ValueError(f"out={str(out)!r} is the checkpoint itself; choose a new directory")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "model.safetensors").is_file())):
        raise ValueError(f"out={str(out)!r} exists and is not a Hugging Face export; choose a new directory")


def verify_export(model, path: Path, dtype: torch.dtype, tok, text: str, n_tokens: int, tol: float) -> list[str]:
    """Loads `path` with transformers and compares it with `model` (see the module docstring); raises ValueError
    when the logits or the tokenizer differ."""
    try:
        import transformers
    except ImportError:
        raise ValueError("verify=true loads the export with transformers, which is not installed: pip install "
                         "transformers, or pass verify=false") from None
    cfg = model.cfg
    if tok is not None:
        ids = tok.encode(text)[: min(n_tokens, cfg.max_seq_len)]
    else:  # no tokenizer: seeded random ids
        ids = torch.randint(0, cfg.vocab_size, (min(n_tokens, cfg.max_seq_len),), generator=torch.Generator().manual_seed(0)).tolist()
    ref = model
    if dtype != torch.float32:  # the file holds our weights rounded to dtype: compare with exactly those, in fp32
        ref = copy.deepcopy(model)
        with torch.no_grad():
            for p in ref.parameters():
                p.copy_(p.to(dtype).float())
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    x = torch.tensor([ids])
    ours, router_logits, our_choice = our_routing(ref, x)
    theirs, their_choice = export_routing(hf, x, cfg.moe.router.top_k, cfg.moe.num_experts)
    diff = (theirs.float() - ours.float()).abs().max().item()
    lines = [f"verify: {type(hf).__name__} loads it; max |Δ logit| {diff:.2e} over {len(ids)} tokens "
             f"(tolerance {tol:g}{'' if dtype == torch.float32 else ', against our weights rounded to ' + str(dtype)})"]
    if our_choice:
        lines += routing_lines(routing_agreement(router_logits, our_choice, their_choice, cfg.moe.router.top_k))
    if not diff <= tol:
        raise ValueError("\n".join(lines) + "\nthe export does not reproduce the model; nothing was written")
    if tok is not None:
        hf_tok = transformers.AutoTokenizer.from_pretrained(str(path))
        theirs = hf_tok(text, verbose=False)["input_ids"]
        if theirs != tok.encode(text) or hf_tok.eos_token_id != tok.eos_id:
            raise ValueError(f"verify: AutoTokenizer ({type(hf_tok).__name__}) encodes differently from our {tok.name} "
                             f"tokenizer (eos {hf_tok.eos_token_id} vs {tok.eos_id}); nothing was written")
        lines.append(f"verify: AutoTokenizer ({type(hf_tok).__name__}) gives our {len(theirs)} token ids, eos id {tok.eos_id}")
    return lines


@torch.no_grad()
def export_routing(hf, ids: torch.Tensor, k: int, num_experts: int) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """(logits, {layer: [T, E] bool experts chosen}) of a transformers MoE (Mixtral, Qwen2-MoE) on ids [1, S]:
    the routers are the modules `...layers.N.mlp.gate`; transformers 5's return (logits, weights, indices),
    transformers 4's return the logits, and the block takes the top-k of their softmax."""
    chosen, hooks = {}, []

    def capture(i: int):
        def hook(module, args, output):
            if isinstance(output, tuple):
                idx = output[2]
            else:
                idx = torch.topk(torch.softmax(output.float(), dim=-1), k, dim=-1).indices
            chosen[i] = chosen_mask(idx.reshape(-1, idx.shape[-1]).cpu(), num_experts)
        return hook

    for name, module in hf.named_modules():
        m = re.search(r"layers\.(\d+)\.mlp\.gate$", name)
        if m:
            hooks.append(module.register_forward_hook(capture(int(m.group(1)))))
    try:
        logits = hf(input_ids=ids).logits
    finally:
        for h in hooks:
            h.remove()
    return logits, chosen


def routing_lines(layers) -> list[str]:
    """The routing part of the check: one line for a model routed alike everywhere, else one per layer that differs."""
    differ = [r for r in layers if r.differ]
    if not differ:
        closest = min(layers, key=lambda r: r.min_margin)
        return [f"verify: routing: in {len(layers)} sparse layer{'s' * (len(layers) != 1)} every token goes to the same experts as in ours "
                f"(smallest top-k router margin {closest.min_margin:.1e}, layer {closest.layer})"]
    lines = [f"verify: routing: {len(differ)} of {len(layers)} sparse layers send tokens elsewhere than ours (near-ties: "
             f"the k-th and (k+1)-th router logits within fp32 round-off; either choice reads the weights correctly)"]
    return lines + [f"verify: routing: {r.text()}" for r in differ]


def run_export(opts: dict[str, Any]) -> dict[str, Any]:
    """The app without Hydra: opts holds the keys of conf/export.yaml."""
    from moe.checkpoint import commit, load_model, read_metadata
    from moe.sharded_checkpoint import is_sharded
    from upcycle.export import DTYPE_NAMES, choose_format, export_hf
    from upcycle.verify import SAMPLE_TEXT

    check_options("export", opts, KEYS, ("checkpoint", "out"), "python -m experiments.export checkpoint=DIR out=HF_DIR")
    ckpt = find_checkpoint(Path(opts["checkpoint"]).expanduser())
    out = Path(opts["out"]).expanduser()
    _check_out(out, ckpt)

    meta = read_metadata(ckpt)
    model = load_model(ckpt).eval()
    cfg = model.cfg
    choice = choose_format(cfg, opts.get("format") or "auto")
    dtype = torch.bfloat16 if opts.get("bf16") else stored_dtype(ckpt)
    tok, inner, tok_config, ids = _tokenizer(opts, ckpt, cfg.max_seq_len)
    if tok is not None and tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but the model's embedding only {cfg.vocab_size}; "
                         f"pass the tokenizer the model was trained with (tokenizer=...)")
    step = meta.get("step")
    lines = [f"checkpoint: {ckpt}" + (f" (step {step})" if step is not None else "")
             + (", sharded layout" if is_sharded(ckpt) and not (ckpt / "model.safetensors").is_file() else ""),
             choice.text()]
    lines += [f"  note: {n}" for n in choice.format.notes(cfg)]
    lines.append(f"dtype: {DTYPE_NAMES[dtype]}" + (" (bf16=true)" if opts.get("bf16") else " (the checkpoint's weights)"))
    lines.append(f"tokenizer: {tok.name}, {tok.vocab_size} tokens, eos id {tok.eos_id}"
                 + (", with a chat template" if tok_config.get("chat_template") else ", no chat template")
                 if tok is not None else "tokenizer: none in the checkpoint (AutoTokenizer will not load the export; "
                                         "pass tokenizer=PATH)")

    tmp = out.parent / f".{out.name}.export-{os.getpid()}"
    try:
        export_hf(model, tmp, tokenizer=inner, tokenizer_config=tok_config, special_ids=ids, format=choice.format.name,
                  dtype=dtype)
        if opts.get("verify", True):
            lines += verify_export(model, tmp, dtype, tok, opts.get("verify_text") or SAMPLE_TEXT,
                                   int(opts.get("verify_tokens") or 64), float(opts.get("verify_tol") or 1e-4))
        commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        print("\n".join(lines))
        raise
    size = sum(p.stat().st_size for p in out.iterdir())
    lines.append(f"wrote {out} ({size / 1e6:.1f} MB)")
    text = "\n".join(lines)
    print(text)
    return {"out": str(out), "format": choice.format.name, "dtype": dtype, "text": text}


@hydra.main(config_path=CONFIG_DIR, config_name="export", version_base="1.3")
@exits_on_config_error("export")
def main(cfg: DictConfig) -> None:
    run_export(resolved(cfg, "python -m experiments.export checkpoint=DIR out=HF_DIR"))


if __name__ == "__main__":
    main()
