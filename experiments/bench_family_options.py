"""What the family backbone options cost in a training step (forward + backward), side by side in one process.

    python -m experiments.bench_family_options [--reps 6] [--seq 512]

One Llama-shaped dense model (4 blocks, d=256, GQA off, SwiGLU) four ways: plain (scaled_dot_product_attention,
causal), Gemma 2's score soft-capping (the explicit attention path: scores materialised, tanh, softmax), a
sliding window of 128 on every other block (a bool mask), and ALiBi (a float mask). The variants run
interleaved, one step each per round, so load from other jobs falls on all of them alike; the first round is
warm-up; the figures are each variant's median and minimum step times over the plain model's.
"""
from __future__ import annotations

import argparse
import time

import torch

from moe import ModelConfig, Transformer

BASE = dict(vocab_size=1024, n_layer=4, d_model=256, n_head=4, d_ff=1024, activation="gelu_tanh", glu=True,
            norm="rmsnorm", position="rope")
VARIANTS = {
    "plain (SDPA, causal)": {},
    "attn_softcap=50 (explicit path)": dict(attn_softcap=50.0),
    "sliding_window=128 on LG (mask)": dict(attention_pattern="LG", sliding_window=128),
    "position=alibi (float mask)": dict(position="alibi"),
}


def main(argv=None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=6)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    models = {k: Transformer(ModelConfig(**{**BASE, **v, "max_seq_len": a.seq})) for k, v in VARIANTS.items()}
    idx = torch.randint(0, BASE["vocab_size"], (a.batch, a.seq))
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(a.reps):
        for k, m in models.items():
            start = time.perf_counter()
            m(idx, idx).loss.backward()
            times[k].append(time.perf_counter() - start)
            m.zero_grad(set_to_none=True)
    median = {k: sorted(v[1:])[len(v[1:]) // 2] for k, v in times.items()}
    best = {k: min(v[1:]) for k, v in times.items()}  # the least disturbed step: robust to other jobs' bursts
    ref = "plain (SDPA, causal)"
    for k in times:
        print(f"{k:34s} median {median[k] * 1e3:7.0f} ms x{median[k] / median[ref]:.2f}   "
              f"min {best[k] * 1e3:7.0f} ms x{best[k] / best[ref]:.2f}")
    return {k: best[k] / best[ref] for k in times}


if __name__ == "__main__":
    main()
