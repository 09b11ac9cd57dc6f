"""python -m experiments.generate checkpoint=DIR prompt="..." : sample text from a trained checkpoint."""
from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from experiments.tokenizer import load_tokenizer
from experiments.engines.ranks import resolve_device
from moe.checkpoint import load_model


def generate_text(checkpoint: str | Path, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
                  top_k: int | None = 50, num_samples: int = 1, seed: int = 0, device: str = "auto") -> list[str]:
    path = Path(checkpoint)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"{path / 'tokenizer.json'} is missing; pass a checkpoint written by experiments.train "
            f"(runs/.../checkpoints/step_N), which stores its tokenizer"
        )
    tok = load_tokenizer(path / "tokenizer.json")
    dev = resolve_device(device)
    model = load_model(path, map_location=dev).eval()
    ids = tok.encode(prompt) or [tok.eos_id]
    idx = torch.tensor([ids] * num_samples, device=dev)
    g = torch.Generator(device=dev).manual_seed(seed)
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=g)
    return [tok.decode(row.tolist()) for row in out]


@hydra.main(config_path="pkg://conf", config_name="generate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    texts = generate_text(cfg.checkpoint, cfg.prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_k,
                          cfg.num_samples, cfg.seed, cfg.device)
    for i, text in enumerate(texts):
        print(f"--- sample {i} ---\n{text}")


if __name__ == "__main__":
    main()
