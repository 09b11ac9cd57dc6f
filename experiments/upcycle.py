"""python -m experiments.upcycle source=PATH out=DIR [recipe=copy] [num_experts=8] [routing=...] [layers=every:2] [verify=true]
                              [verify_text=...] [router_init=normal] [router_init_std=0.02]

Reads a dense model (a Switchyard checkpoint directory, a Hugging Face model directory or a .gguf file), turns
the chosen FFNs into experts with a recipe (upcycle/recipes.py), checks the result against the dense model on a
text sample (the step-0 check), and writes DIR as a Switchyard checkpoint with the model's own tokenizer:

    DIR/config.json            {"model": ..., "upcycle": {...}, "source": {...}, "step0": {...}}
    DIR/model.safetensors
    DIR/tokenizer.json         the source's tokenizer (tokenizers format), when it has one
    DIR/tokenizer_config.json  its special tokens (eos_token: what `load_tokenizer` uses as end-of-text) and chat template

Nothing is written to DIR unless the conversion succeeded (and, with verify=true, an exact recipe passed the
check); the directory appears in one rename.

The new routers are N(0, 0.02^2) rows (Komatsuzaki et al.) minus their component along each sparse layer's mean
router input on the verification text (router_init=mean_free, upcycle/router_init.py), so that the text reaches
every expert at step 0; pass a sample of the training data as verify_text to calibrate on it. `router_init=normal`
keeps the plain normal rows, `router_init_std=0` gives a zero router (every token to the same k experts).

Continue training:  python -m experiments.train init_from=DIR data=shakespeare trainer.seq_len=256 ...
The corpus is then tokenized with DIR's own tokenizer. Schedules (experiments/optim.py: warmup, then decay):
  * continue the dense schedule (Komatsuzaki et al. 2023 resume the dense model's schedule where it stopped):
      optim.warmup_steps=0 optim.lr=<the dense run's final LR> optim.schedule=constant
      (or schedule=cosine with min_lr, decaying further from that LR)
  * re-warm (He et al. 2024 and Drop-Upcycling re-warm to a peak, then decay):
      optim.warmup_steps=<N, e.g. 1% of the run> optim.lr=<peak> optim.schedule=cosine optim.min_lr=<lr/10>
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from experiments.app_options import check_options, exits_on_config_error, resolved
from experiments.hydra_conf import CONFIG_DIR
from moe.checkpoint import save_checkpoint
from moe.flops import count_params
from routing.config import RouterConfig

OPTION_KEYS = ("recipe", "num_experts", "layers", "router_init_std", "router_init", "shards", "shared_fraction", "shared_gate",
               "drop_ratio", "noise_std", "dispatcher", "seed")
APP_KEYS = ("source", "out", "verify", "verify_text", "verify_tokens", "export_hf", "model")


def tokenizer_writers(src) -> dict:
    """File name -> writer for the checkpoint's tokenizer files (what experiments.tokenizer.load_tokenizer reads)."""
    if src.tokenizer_file is not None:  # a Switchyard source: its files as they are
        files = [src.tokenizer_file, src.tokenizer_file.with_name("tokenizer_config.json")]
        return {f.name: (lambda p, f=f: shutil.copyfile(f, p)) for f in files if f.is_file()}
    if src.tokenizer is None:
        return {}
    writers = {"tokenizer.json": lambda p: Path(p).write_text(src.tokenizer.to_str(), encoding="utf-8")}
    config = src.tokenizer_config()
    if config.get("eos_token"):
        writers["tokenizer_config.json"] = lambda p: Path(p).write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
    return writers


def router_init_text(ucfg, calibration_tokens: int) -> str:
    """How the new routers were initialised, in words, for the console and the checkpoint's metadata."""
    std = ucfg.router_std
    if std == 0:
        return "zero (router_init_std=0): every token ties, the lowest-index experts take them all"
    if ucfg.router_init == "mean_free":
        return (f"N(0, {std:g}^2) rows minus their component along each layer's mean router input on the "
                f"{calibration_tokens} verification tokens (router_init=mean_free)")
    return f"N(0, {std:g}^2) rows (router_init=normal)"


def run_upcycle(opts: dict[str, Any]) -> dict[str, Any]:
    """The app without Hydra: opts holds the keys of conf/upcycle.yaml (model.moe.router: the router)."""
    from upcycle import UpcycleConfig, exactness, read_dense, sample_tokens, step0_check, upcycle

    check_options("upcycle", opts, OPTION_KEYS + APP_KEYS, ("source", "out"),
                  "python -m experiments.upcycle source=PATH out=DIR")
    out = Path(opts["out"]).expanduser()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "model.safetensors").is_file())):
        raise ValueError(f"out={str(out)!r} exists and is not a Switchyard checkpoint; choose a new directory")
    router = ((opts.get("model") or {}).get("moe") or {}).get("router") or {}
    ucfg = UpcycleConfig(router=RouterConfig(**router) if isinstance(router, dict) else router,
                         **{k: opts[k] for k in OPTION_KEYS if k in opts})

    t0 = time.perf_counter()
    src = read_dense(opts["source"])
    dense = src.build_model()
    t1 = time.perf_counter()
    # The verification text (verify_text, else the built-in sample) is also the router's calibration sample:
    # router_init=mean_free removes each layer's mean router input on it (upcycle.router_init).
    tokens = sample_tokens(dense.cfg.vocab_size, src.tokenizer, text=opts.get("verify_text"),
                           max_len=min(int(opts.get("verify_tokens") or 128), dense.cfg.max_seq_len))
    calibration = tokens[:, :-1]  # [1, S - 1]: exactly the positions the step-0 check routes
    moe = upcycle(dense, ucfg, calibration=calibration)
    t2 = time.perf_counter()
    exact, reason = exactness(ucfg)
    lines = [f"source: {src.origin} ({opts['source']}), read in {t1 - t0:.1f}s"]
    lines += [f"  note: {n}" for n in src.notes]
    dp, mp = count_params(dense.cfg), count_params(moe.cfg)
    lines.append(f"dense: {dense.cfg.n_layer} layers, d={dense.cfg.d_model}, d_ff={dense.cfg.d_ff}, vocab {dense.cfg.vocab_size}, "
                 f"{dp.total:,} parameters")
    lines.append(f"moe:   recipe={ucfg.recipe}, {ucfg.num_experts} experts (top-{ucfg.router.top_k}, {ucfg.router.order}) on "
                 f"layers {list(moe.cfg.sparse_layers)}; {mp.total:,} parameters, {mp.active:,} active per token; "
                 f"upcycled in {t2 - t1:.1f}s")
    lines.append(f"router: {router_init_text(ucfg, calibration.numel())}")
    report = None
    if opts.get("verify", True):
        report = step0_check(dense, moe, tokens, ucfg.recipe, exact, reason)
        lines.append(report.text())
        if not report.passed:
            print("\n".join(lines))
            raise ValueError(f"the step-0 check failed for the exact recipe {ucfg.recipe}: max |Δ logit| "
                             f"{report.max_abs_diff:.3e} > {report.tolerance:.1e}; nothing was written to {out}")
    meta = {
        "upcycle": {**ucfg.to_dict(), "expected_exact": exact, "reason": reason,
                    "router_init_text": router_init_text(ucfg, calibration.numel()), "calibration_tokens": calibration.numel()},
        "source": {"path": str(opts["source"]), "origin": src.origin, "notes": src.notes,
                   "dense_model": dense.cfg.to_dict()},
        "step0": report.to_dict() if report is not None else None,
    }
    save_checkpoint(out, moe, extra=tokenizer_writers(src), metadata=meta)
    lines.append(f"wrote {out}" + ("" if (out / "tokenizer.json").is_file() else " (no tokenizer: the source has none)"))
    if opts.get("export_hf"):
        from upcycle.export import export_hf

        vocab = src.tokenizer.get_vocab(with_added_tokens=True) if src.tokenizer is not None else {}
        ids = {k.removesuffix("_token"): vocab[v] for k, v in src.special_tokens.items() if v in vocab}
        path = export_hf(moe, opts["export_hf"], tokenizer=src.tokenizer, tokenizer_config=src.tokenizer_config(),
                         special_ids=ids)
        lines.append(f"wrote the Hugging Face checkpoint {path}")
    text = "\n".join(lines)
    print(text)
    return {"out": str(out), "report": report, "config": moe.cfg, "text": text}


@hydra.main(config_path=CONFIG_DIR, config_name="upcycle", version_base="1.3")
@exits_on_config_error("upcycle")
def main(cfg: DictConfig) -> None:
    run_upcycle(resolved(cfg, "python -m experiments.upcycle source=PATH out=DIR"))


if __name__ == "__main__":
    main()
