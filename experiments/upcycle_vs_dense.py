"""The starting points of `experiment=upcycle_vs_dense` (Sparse Upcycling's main comparison, Komatsuzaki et al. 2023).

From one released dense checkpoint, the sweep continues, with the same data, tokens, schedule and seed,
  dense     the dense model itself                       (experiments.convert of the source, or the source as it is)
  upcycled  its MoE, every chosen FFN copied into E experts (experiments.upcycle; exact at step 0)
  scratch   an MoE of the upcycled model's shape, randomly initialised (what the dense pretraining bought)
and `python -m experiments.compare SWEEP_DIR` reports them at equal extra training FLOPs and equal seconds.

Every run of the sweep is an ordinary training run with `init_from=SWEEP_DIR/init/VARIANT`; this module only
writes those starting points, before the first run starts, from a Hydra callback (conf/experiment/
upcycle_vs_dense.yaml names it under hydra.callbacks.starting_points), so that the train app and its config
stay as they are:

    SWEEP_DIR/init/dense/        a Switchyard checkpoint (a link to the source when it already is one)
    SWEEP_DIR/init/upcycled/     the upcycled checkpoint, its step-0 check in config.json
    SWEEP_DIR/init/scratch/      the same architecture, fresh weights (torch.manual_seed(seed), as the trainer does)
    SWEEP_DIR/init/sunk_cost.json  the dense checkpoint's pretraining tokens and 6*N*D FLOPs, when known
    SWEEP_DIR/dense/, upcycled/, scratch/   the training runs (run.json, metrics.jsonl, checkpoints/)

Each starting point is written once (atomically, by the apps' own writers); a second sweep into the same
directory reuses it. Two OmegaConf resolvers are registered on import, for the experiment's YAML:
  ${path_name:PATH}                       the last component of PATH (a run's sub-directory: its variant)
  ${starting_points:DIR,[a, b]}           "DIR/a,DIR/b": the sweep over init_from for the variants listed
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import OmegaConf

VARIANTS = ("dense", "upcycled", "scratch")
SUNK_COST_FILE = "sunk_cost.json"
CALIBRATIONS = ("train", "builtin")
# Enough text for the upcycle app's verify_tokens (128 by default) under any tokenizer; it keeps the first tokens.
CALIBRATION_CHARS = 4000

# Pretraining tokens of released dense models whose cards state them, matched against the source's name and path
# (lower case). SmolLM2: the model cards of HuggingFaceTB/SmolLM2-135M(-Instruct) state "Tokens: 2T" (the
# instruct model adds supervised fine-tuning and DPO, not counted here).
KNOWN_PRETRAINING_TOKENS = {
    "smollm2-135m": (2e12, "SmolLM2-135M model card (huggingface.co/HuggingFaceTB/SmolLM2-135M): 2T training tokens"),
    "smollm2-360m": (4e12, "SmolLM2-360M model card (huggingface.co/HuggingFaceTB/SmolLM2-360M): 4T training tokens"),
    "smollm2-1.7b": (11e12, "SmolLM2-1.7B model card (huggingface.co/HuggingFaceTB/SmolLM2-1.7B): 11T training tokens"),
}


def _path_name(path: Any) -> str:
    return Path(str(path)).name


def _starting_points(root: Any, variants: Sequence[str]) -> str:
    names = [variants] if isinstance(variants, str) else list(variants)
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise ValueError(f"hydra.callbacks.starting_points.variants: {unknown} are not variants; choose from "
                         f"{list(VARIANTS)}")
    return ",".join(f"{root}/{v}" for v in names)


for _name, _fn in (("path_name", _path_name), ("starting_points", _starting_points)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _fn)


@dataclass
class StartingPoints:
    """What the callback is given (conf/experiment/upcycle_vs_dense.yaml, hydra.callbacks.starting_points.*)."""

    source: Optional[str]  # the dense model: a Switchyard checkpoint, a Hugging Face directory or a .gguf file
    init_dir: str  # where the starting points are written (SWEEP_DIR/init)
    variants: Sequence[str] = VARIANTS  # which of dense, upcycled, scratch to prepare (and to sweep over)
    seed: int = 0  # the run's seed: the router's and the scratch model's initialisation
    upcycle: dict[str, Any] = field(default_factory=dict)  # experiments.upcycle options (recipe, num_experts, ...)
    router: dict[str, Any] = field(default_factory=dict)  # the upcycled model's router (RouterConfig fields)
    pretraining_tokens: Optional[float] = None  # the dense model's pretraining tokens; None: looked up when known
    pretraining_source: Optional[str] = None  # where that number comes from (printed and recorded with it)
    # The text the new router is calibrated on (router_init=mean_free) and the step-0 check runs: "train", a
    # passage of the run's training split (the text the router will route), or "builtin", the upcycle app's
    # English sample. upcycle.verify_text, when given, is used as it is.
    calibration: str = "train"


def training_passage(data: Any, chars: int = CALIBRATION_CHARS) -> Optional[tuple[str, str]]:
    """(document name, text): about `chars` characters from the middle of the first training document of the
    run's split (past titles and cast lists), starting at a line; None for data.source=tokens (no text)."""
    from experiments.data import load_documents, split_documents

    if data.source == "tokens":
        return None
    train, _ = split_documents(load_documents(data), data.val_fraction, data.split_seed)
    doc = train[0]
    start = max(0, len(doc.text) // 2 - chars // 2)
    line = doc.text.rfind("\n", 0, start)
    start = line + 1 if line >= 0 else 0
    return doc.name, doc.text[start:start + chars]


def sunk_cost(dense_params: int, source: str, origin: str, tokens: Optional[float] = None,
              where: Optional[str] = None) -> dict[str, Any]:
    """The dense checkpoint's pretraining compute, 6*N*D (Kaplan et al. 2020: forward + backward ~ 6 FLOPs per
    parameter and token) with N its parameters and D its pretraining tokens; D None when it is not known."""
    if tokens is None:
        key = f"{source} {origin}".lower()
        for name, (n, said) in KNOWN_PRETRAINING_TOKENS.items():
            if name in key:
                tokens, where = n, said
                break
    known = tokens is not None
    return {
        "source": source, "origin": origin, "params": dense_params,
        "pretraining_tokens": float(tokens) if known else None,
        "pretraining_flops": 6.0 * dense_params * float(tokens) if known else None,
        "formula": "6 * N * D (N: the dense model's parameters, tied embeddings once; D: pretraining tokens)",
        "where": where if known else "unknown: pass hydra.callbacks.starting_points.pretraining_tokens=D",
    }


def _done(path: Path) -> bool:
    return (path / "config.json").is_file()


def prepare(sp: StartingPoints, data: Any = None) -> dict[str, Any]:
    """Writes the starting points that do not exist yet; returns {variant: path, "sunk_cost": {...}, "text": ...}.
    data: the runs' DataConfig, whose training split calibrates the new router (sp.calibration="train")."""
    import torch

    from experiments.convert import is_switchyard_checkpoint, run_convert
    from experiments.upcycle import run_upcycle
    from moe.checkpoint import load_config, read_metadata, save_checkpoint
    from moe.flops import count_params
    from moe.model import Transformer

    if not sp.source:
        raise ValueError("experiment=upcycle_vs_dense needs the dense model to start from: pass "
                         "hydra.callbacks.starting_points.source=PATH (a Switchyard checkpoint, a Hugging Face "
                         "directory or a .gguf file)")
    variants = [sp.variants] if isinstance(sp.variants, str) else list(sp.variants)
    _starting_points(sp.init_dir, variants)  # names an unknown variant
    if sp.calibration not in CALIBRATIONS:
        raise ValueError(f"hydra.callbacks.starting_points.calibration={sp.calibration!r} is not one of "
                         f"{list(CALIBRATIONS)}")
    source = Path(sp.source).expanduser()
    if not source.exists():
        raise FileNotFoundError(f"hydra.callbacks.starting_points.source={sp.source!r} does not exist")
    root = Path(sp.init_dir)
    root.mkdir(parents=True, exist_ok=True)
    paths = {v: root / v for v in VARIANTS}
    lines = []
    dense = paths["dense"]
    if not _done(dense):
        if is_switchyard_checkpoint(source):
            dense.symlink_to(source.resolve(), target_is_directory=True)
            lines.append(f"dense:    {dense} -> {source.resolve()} (already a Switchyard checkpoint)")
        else:
            lines.append(run_convert({"source": str(source), "out": str(dense)})["text"])
    origin = (read_metadata(dense).get("source") or {}).get("origin", "switchyard checkpoint")
    if {"upcycled", "scratch"} & set(variants) and not _done(paths["upcycled"]):  # scratch takes its shape
        opts = {**sp.upcycle, "source": str(dense), "out": str(paths["upcycled"]), "seed": sp.seed,
                "model": {"moe": {"router": dict(sp.router)}}}
        passage = training_passage(data) if sp.calibration == "train" and data is not None else None
        if not opts.get("verify_text") and passage is not None:
            opts["verify_text"] = passage[1]
            lines.append(f"router calibration: a passage of the training split ({passage[0]}, "
                         f"{len(passage[1])} characters)")
        elif not opts.get("verify_text"):
            why = ("calibration=builtin" if sp.calibration == "builtin" else "no data config given" if data is None
                   else "the corpus is pre-tokenized")
            lines.append(f"router calibration: the upcycle app's built-in sample ({why})")
        lines.append(run_upcycle(opts)["text"])
    if "scratch" in variants and not _done(paths["scratch"]):
        cfg = load_config(paths["upcycled"])
        torch.manual_seed(sp.seed)  # what experiments.trainer does before it builds a fresh model
        model = Transformer(cfg)
        files = [f for f in ("tokenizer.json", "tokenizer_config.json") if (dense / f).is_file()]
        save_checkpoint(paths["scratch"], model,
                        extra={f: (lambda p, f=f: Path(p).write_bytes((dense / f).read_bytes())) for f in files},
                        metadata={"scratch": {"architecture_of": str(paths["upcycled"]), "seed": sp.seed}})
        lines.append(f"scratch:  {paths['scratch']}: the upcycled architecture, random weights (seed {sp.seed})")
    cost_file = root / SUNK_COST_FILE
    if cost_file.is_file():
        cost = json.loads(cost_file.read_text())
    else:
        cost = sunk_cost(count_params(load_config(dense)).total, str(source), origin, sp.pretraining_tokens,
                         sp.pretraining_source)
        cost_file.write_text(json.dumps(cost, indent=1) + "\n")
    if cost["pretraining_flops"] is not None:
        lines.append(f"sunk cost of the dense checkpoint: 6 x {cost['params']:,} parameters x "
                     f"{cost['pretraining_tokens']:.3g} tokens = {cost['pretraining_flops']:.3g} FLOPs ({cost['where']})")
    else:
        lines.append(f"sunk cost of the dense checkpoint: {cost['where']}")
    text = "\n".join(lines)
    print(text, flush=True)
    return {**{v: str(paths[v]) for v in variants}, "sunk_cost": cost, "text": text}


try:  # Hydra is an application dependency; the library folders never import it
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra is installed with the apps
    Callback = object  # type: ignore[misc,assignment]


class PrepareStartingPoints(Callback):
    """Hydra callback: writes the starting points before the sweep's (or the single run's) first job."""

    def __init__(self, **options: Any) -> None:
        known = set(StartingPoints.__dataclass_fields__)
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"hydra.callbacks.starting_points: unknown option(s) {unknown}; known: {sorted(known)}")
        self.options = StartingPoints(**{k: (OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v)
                                         for k, v in options.items()})

    def _prepare(self, config) -> None:
        try:
            from experiments.data_config import DataConfig
            from experiments.typed_config import from_mapping

            data = from_mapping(DataConfig, OmegaConf.to_container(config.data, resolve=True), "data")
            prepare(self.options, data)
        except Exception as e:  # Hydra turns a callback's exception into a warning and would start the runs anyway
            raise SystemExit(f"experiment=upcycle_vs_dense: the starting points were not written, so no run starts: "
                             f"{type(e).__name__}: {e}") from e

    def on_multirun_start(self, config, **kwargs: Any) -> None:
        self._prepare(config)

    def on_run_start(self, config, **kwargs: Any) -> None:
        self._prepare(config)
