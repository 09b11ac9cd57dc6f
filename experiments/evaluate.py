"""python -m experiments.evaluate checkpoint=DIR [data=CORPUS] [split=train|val|all] ... -> eval.json

The language-model loss of one or more checkpoints over a whole text, in nats per token and in bits per byte, with
per-layer routing statistics of the MoE layers on that text. One table for all the checkpoints, one eval.json.

What is read. `checkpoint` is a Switchyard checkpoint directory (full or sharded layout), a training run directory
(its newest complete checkpoint), a dense Hugging Face model directory or a .gguf file (all read by
experiments.convert.load_source); a list `checkpoint=[A,B]` evaluates each on the same text. The text is `data`
(the groups of conf/data: shakespeare, text with data.path a file, a directory or a glob, tokens with data.path a
token file) or, without `data`, the corpus the checkpoint was trained on (its config.json records the run's data
settings). `split` picks the training or the validation part, cut as
training cuts it (experiments.data), or `all` of it; by default the validation split of a corpus a run trained on or
of data=shakespeare, and all of a text or token file named with data=text / data=tokens.

How the text becomes sequences. Each checkpoint's own tokenizer encodes the documents, which are joined as training
joins them (end-of-text between documents) into one stream, with one end-of-text in front so that the first token is
predicted from the same context as every later document's first token (a token file is one stream as it is, with
the end-of-text in front when the tokenizer is known). The stream is cut into non-overlapping windows of L = seq_len
predicted tokens (the model's max_seq_len unless set): window i reads tokens [iL, iL+L) and predicts [iL+1, iL+L+1),
the last window being shorter. So every token after the leading end-of-text is predicted exactly once, with the
tokens before it in its window as context (none is carried over from the previous window; lm-eval's rolling
perplexity windows, experiments/lm_eval_model.py, are the same but fill the last one up with earlier context), and

  nats_per_token = sum over predicted tokens of -ln p(token | context) / tokens
  bits_per_byte  = that sum / (bytes * ln 2) = nats_per_token * tokens / (bytes * ln 2)

with `bytes` the UTF-8 bytes of the documents as read (universal newlines; the end-of-text separators are predicted
but have no bytes). Bits per byte are independent of the tokenizer, so any two models compare on them; nats per
token compare only between models with one tokenizer. A token file's bytes are those of its decoded text.

Batching. Windows of equal length go through the model batch_size at a time. Token-choice routing without a capacity
(capacity_factor 0, the default) routes every token on its own, so the numbers do not depend on batch_size; with a
capacity at evaluation (model.moe.router.eval_capacity_factor, else capacity_factor), or with expert choice, the
tokens of a batch compete for expert slots, as in training, and the loss depends on batch_size (hash, and BASE and
Sinkhorn at evaluation, route per token).

Routing statistics per sparse layer, over every token of the text: tokens per expert (assignments after capacity),
each expert's share of them (`load`), max_load (the busiest expert's share over an even split's), the dead experts
(no token at all), the mean router entropy and top-1 probability, and the fraction of assignments dropped.

eval.json (`out`, by default RUN_DIR/eval.json when every checkpoint belongs to one training run, else ./eval.json)
holds {"format": 1, "evaluations": [one record per checkpoint and text]}; an evaluation of the same checkpoint on
the same text replaces the earlier record, others are kept. experiments.compare reads these files.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import hydra
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from experiments.engines import ranks
from experiments.eval_file import EVAL_FILE, default_out, read_eval_file, routing_lines, table, write_eval_file  # noqa: F401
from experiments.data import DataConfig, Document, corpus_hash, load_documents, prepare, split_documents
from experiments.hydra_conf import CONFIG_DIR
from experiments.tokenizer import Tokenizer, tokenizer_fingerprint
from moe.checkpoint import CONFIG_FILE, read_metadata
from moe.flops import count_params
from moe.model import Transformer

SPLITS = ("train", "val", "all")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Routers whose choices for one token depend on the other tokens of the batch at evaluation, whatever the capacity
# factor (BASE and Sinkhorn route each token by itself at evaluation: routing.generation's docstring).
BATCH_COUPLED_ROUTERS = ("expert_choice",)


@dataclass
class EvalConfig:
    checkpoints: list[str]  # checkpoint dirs, training run dirs, HF model dirs or .gguf files (the `checkpoint` key)
    data: Optional[DataConfig] = None  # the text; None: the corpus the checkpoints were trained on
    split: Optional[str] = None  # train, val or all; None: val for a corpus, all for data=text / data=tokens
    batch_size: int = 8  # windows per forward pass
    seq_len: Optional[int] = None  # predicted tokens per window (L); None: each model's max_seq_len
    device: str = "auto"  # auto (cuda when available), cpu, cuda, cuda:1, ...
    dtype: str = "float32"  # the weights' dtype for the forward passes: float32, bfloat16 or float16
    progress: bool = True  # a progress bar over the tokens of each checkpoint
    out: Optional[str] = None  # eval.json's path (a file, or a directory to hold it); None: see the module docstring

    def __post_init__(self) -> None:
        if not self.checkpoints:
            raise ValueError("checkpoint is empty; pass checkpoint=DIR or checkpoint=[DIR1,DIR2]")
        if self.split is not None and self.split not in SPLITS:
            raise ValueError(f"split={self.split!r} is not a split; use one of {list(SPLITS)} (or leave it out)")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be positive")
        if self.seq_len is not None and self.seq_len < 1:
            raise ValueError(f"seq_len={self.seq_len} must be positive (or null: the model's max_seq_len)")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not supported; use one of {list(DTYPES)}")


def eval_config_from_dict(d: dict[str, Any]) -> EvalConfig:
    """The boundary: a resolved Hydra mapping (conf/evaluate.yaml) becomes an EvalConfig, every key checked."""
    from experiments.typed_config import from_mapping

    d = dict(d)
    d.pop("hydra", None)
    ckpt = d.pop("checkpoint", None)
    if ckpt is None or ckpt == "":
        raise ValueError("checkpoint is missing; pass checkpoint=DIR (or checkpoint=[DIR1,DIR2] for a table)")
    checkpoints = [str(c) for c in ckpt] if isinstance(ckpt, (list, tuple)) else [str(ckpt)]
    return from_mapping(EvalConfig, {"checkpoints": checkpoints, **d})


# ------------------------------------------------------------------------------------------ checkpoints


@dataclass
class LoadedModel:
    path: Path  # what was loaded (a run directory resolved to its newest checkpoint)
    kind: str  # "switchyard", "hf" or "gguf"
    model: Transformer  # in eval mode, on the evaluation device
    tokenizer: Optional[Tokenizer]  # None: the checkpoint has none (only token files can be read)
    metadata: dict[str, Any] = field(default_factory=dict)  # a Switchyard checkpoint's config.json (step, run)


def resolve_checkpoint(spec: str) -> Path:
    """The checkpoint a `checkpoint=` entry names: the path itself, or a training run's newest complete checkpoint."""
    from experiments.checkpoints import CHECKPOINTS, CheckpointManager

    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint={spec!r} does not exist (relative paths start at {os.getcwd()})")
    if path.is_dir() and not (path / CONFIG_FILE).is_file() and (path / CHECKPOINTS).is_dir():
        found = CheckpointManager(path, keep=1).complete()
        if not found:
            raise FileNotFoundError(f"checkpoint={spec!r} is a run directory without a complete checkpoint in "
                                    f"{path / CHECKPOINTS}; pass a checkpoint directory")
        return found[-1][1]
    return path


def load_checkpoint(spec: str, device: torch.device, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """A checkpoint of any kind (experiments.convert.load_source reads them all) in eval mode, and its tokenizer."""
    from experiments.convert import is_switchyard_checkpoint, load_source

    path = resolve_checkpoint(spec)
    if is_switchyard_checkpoint(path):
        meta, kind = read_metadata(path), "switchyard"
    elif path.suffix == ".gguf" or (path.is_dir() and (path / CONFIG_FILE).is_file()):
        meta, kind = {}, "gguf" if path.suffix == ".gguf" else "hf"
    else:
        raise FileNotFoundError(f"checkpoint={spec!r} is neither a checkpoint directory (no {CONFIG_FILE}), a "
                                f"training run directory (no checkpoints/) nor a .gguf file")
    # load_source casts the parameters only: RoPE's frequencies stay fp32 whatever dtype is
    model, tok = load_source(path, dtype=dtype)
    return LoadedModel(path, kind, model.to(device).eval(), tok, meta)


def batch_coupling(model: Transformer) -> Optional[str]:
    """Why the model's routing of a token depends on the other tokens of its batch, or None when it does not."""
    cfg = model.cfg
    if not cfg.sparse_layers:
        return None
    router = cfg.moe.router
    if router.name in BATCH_COUPLED_ROUTERS:
        return f"model.moe.router.name={router.name} assigns tokens jointly over a batch"
    cf = router.eval_capacity_factor if router.eval_capacity_factor is not None else router.capacity_factor
    if cf != 0:
        return f"the evaluation capacity factor {cf} (model.moe.router.eval_capacity_factor / capacity_factor)"
    return None


# ------------------------------------------------------------------------------------------ the text


@dataclass
class EvalText:
    """The text an evaluation reads, before any tokenizer sees it."""
    source: str  # shakespeare, text or tokens
    path: Optional[str]  # data.path (None for shakespeare)
    split: str  # train, val or all
    fingerprint: str  # sha256 of the documents (or token files) and split: two records compare when it matches
    documents: list[Document] = field(default_factory=list)  # shakespeare / text: the documents, in order
    token_streams: list[np.ndarray] = field(default_factory=list)  # tokens: the token ids, one array per file part
    token_vocab: Optional[int] = None  # tokens: data.vocab_size

    @property
    def num_documents(self) -> Optional[int]:
        return len(self.documents) if self.documents else None

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "path": self.path, "split": self.split, "text_fingerprint": self.fingerprint,
                "documents": self.num_documents}


def default_split(data: DataConfig, from_run: bool) -> str:
    return "val" if from_run or data.source == "shakespeare" else "all"


def load_text(data: DataConfig, split: str) -> EvalText:
    """The documents (or token streams) of `split` of the corpus `data`; the train/val cut is training's."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not a split; use one of {list(SPLITS)}")
    if data.source == "tokens":
        prepared = prepare(data)  # checks the files, their dtype and ids; cuts off the validation tail
        if split == "all" and data.val_path is None:  # the one file, whole
            streams = [np.memmap(Path(str(data.path)).expanduser(), dtype=data.token_dtype, mode="r")]
        else:
            streams = {"train": [prepared.train], "val": [prepared.val], "all": [prepared.train, prepared.val]}[split]
        fp = hashlib.sha256(f"tokens\0{prepared.fingerprint}\0{split}".encode()).hexdigest()
        return EvalText("tokens", str(data.path), split, fp, token_streams=streams, token_vocab=data.vocab_size)
    docs = load_documents(data)
    if split != "all":
        train, val = split_documents(docs, data.val_fraction, data.split_seed)
        docs = train if split == "train" else val
    fp = hashlib.sha256(f"text\0{corpus_hash(docs)}".encode()).hexdigest()
    return EvalText(data.source, data.path, split, fp, documents=docs)


@dataclass
class TokenizedText:
    streams: list[np.ndarray]  # int64 token ids, each stream evaluated on its own (windows never cross streams)
    num_bytes: Optional[int]  # UTF-8 bytes of the text; None when unknown (a token file without a tokenizer)


def tokenize(text: EvalText, tok: Optional[Tokenizer], group: int = 16) -> TokenizedText:
    """The token streams of `text` under `tok` (see the module docstring for the layout) and the text's bytes."""
    if text.documents:
        if tok is None:
            raise ValueError("this checkpoint has no tokenizer, so it cannot read text; evaluate it on a token file "
                             "(data=tokens data.path=FILE.bin data.vocab_size=V) or add its tokenizer.json")
        ids: list[int] = []
        for i in range(0, len(text.documents), group):
            for doc_ids in tok.encode_batch([d.text for d in text.documents[i:i + group]]):
                ids.append(tok.eos_id)  # in front of every document: training's separator, and the first's context
                ids.extend(doc_ids)
        num_bytes = sum(len(d.text.encode("utf-8")) for d in text.documents)
        return TokenizedText([np.asarray(ids, dtype=np.int64)], num_bytes)
    streams, num_bytes = [], 0 if tok is not None else None
    for s in text.token_streams:
        s = np.asarray(s, dtype=np.int64)
        if tok is not None:
            num_bytes += decoded_bytes(s, tok)
            s = np.concatenate([np.array([tok.eos_id], dtype=np.int64), s])
        streams.append(s)
    return TokenizedText(streams, num_bytes)


def decoded_bytes(ids: np.ndarray, tok: Tokenizer) -> int:
    """UTF-8 bytes of the text a token stream decodes to, end-of-text tokens left out. Decoded a whole document (the
    ids between two end-of-text tokens) at a time: a cut inside one could split a character's bytes."""
    cuts = np.flatnonzero(ids == tok.eos_id)
    total, start = 0, 0
    for stop in [*cuts.tolist(), len(ids)]:
        if stop > start:
            total += len(tok.decode(ids[start:stop].tolist()).encode("utf-8"))
        start = stop + 1
    return total


def windows(stream_len: int, seq_len: int) -> list[tuple[int, int]]:
    """(start, n) of each window over a stream of stream_len tokens: inputs [start, start+n), targets one later."""
    return [(s, min(seq_len, stream_len - 1 - s)) for s in range(0, max(stream_len - 1, 0), seq_len)]


# ------------------------------------------------------------------------------------------ routing statistics


class RoutingTotals:
    """Sums one MoE layer's per-batch routing statistics (routing.stats) over every batch of a text."""

    MEANS = ("router_entropy", "top1_prob", "dropped_fraction")  # per-token means, combined weighted by tokens

    def __init__(self) -> None:
        self.tokens = 0
        self.counts: Optional[torch.Tensor] = None  # [E] float64, assignments per expert
        self.sums: dict[str, float] = {}

    def add(self, stats: dict[str, torch.Tensor], num_tokens: int) -> None:
        counts = stats["tokens_per_expert"].detach().double().cpu()
        self.counts = counts if self.counts is None else self.counts + counts
        self.tokens += num_tokens
        for key in self.MEANS:
            if key in stats:
                self.sums[key] = self.sums.get(key, 0.0) + float(stats[key]) * num_tokens

    def summary(self) -> dict[str, Any]:
        assert self.counts is not None, "no batch was added"
        counts = self.counts
        total = float(counts.sum())
        load = (counts / total).tolist() if total > 0 else [0.0] * counts.numel()
        dead = (counts == 0).nonzero().flatten().tolist()
        out: dict[str, Any] = {
            "tokens": self.tokens, "num_experts": counts.numel(), "tokens_per_expert": [int(c) for c in counts.tolist()],
            "load": load, "max_load": max(load) * counts.numel(), "dead_experts": dead, "num_dead_experts": len(dead),
        }
        out.update({key: s / self.tokens for key, s in self.sums.items()})
        return out


# ------------------------------------------------------------------------------------------ the evaluation


@dataclass
class LossTotals:
    nats: float  # sum of -ln p over every predicted token
    tokens: int  # predicted tokens
    windows: int  # sequences the text was cut into
    routing: dict[int, dict[str, Any]]  # sparse layer index -> RoutingTotals.summary()


@torch.no_grad()
def loss_over(model: Transformer, streams: Sequence[np.ndarray], seq_len: int, batch_size: int,
              device: torch.device, progress: bool = False, desc: str = "") -> LossTotals:
    """Sums the next-token loss over every window of every stream (see windows()), batch_size equal-length windows
    per forward pass, and the routing statistics of every sparse layer."""
    if seq_len > model.cfg.max_seq_len:
        raise ValueError(f"seq_len={seq_len} exceeds the model's max_seq_len={model.cfg.max_seq_len}; lower seq_len "
                         f"or leave it out")
    by_len: dict[int, list[tuple[int, int]]] = {}
    for k, s in enumerate(streams):
        for start, n in windows(len(s), seq_len):
            by_len.setdefault(n, []).append((k, start))
    total_tokens = sum(n * len(w) for n, w in by_len.items())
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total_tokens, unit="tok", unit_scale=True, desc=desc, dynamic_ncols=True, leave=False,
                   file=sys.stderr)
    nats, count, routing = 0.0, 0, {}
    for n in sorted(by_len, reverse=True):
        group = by_len[n]
        for b in range(0, len(group), batch_size):
            rows = [np.asarray(streams[k][start:start + n + 1], dtype=np.int64) for k, start in group[b:b + batch_size]]
            w = torch.from_numpy(np.stack(rows)).to(device)
            x, y = w[:, :-1], w[:, 1:]
            out = model(x)
            nats += float(F.cross_entropy(out.logits.float().reshape(-1, out.logits.size(-1)), y.reshape(-1),
                                          reduction="sum"))
            count += y.numel()
            for layer, stats in out.stats.items():
                routing.setdefault(layer, RoutingTotals()).add(stats, x.numel())
            if bar is not None:
                bar.update(y.numel())
    if bar is not None:
        bar.close()
    if count == 0:
        raise ValueError("the text has no token to predict (it is empty, or a single token); point data at more text")
    return LossTotals(nats, count, sum(len(w) for w in by_len.values()),
                      {layer: t.summary() for layer, t in sorted(routing.items())})


def evaluate_checkpoint(loaded: LoadedModel, text: EvalText, tokens: TokenizedText, seq_len: Optional[int],
                        batch_size: int, device: torch.device, progress: bool = False,
                        spec: Optional[str] = None) -> dict[str, Any]:
    """One eval.json record: the checkpoint's loss over the text, its sizes and routing statistics."""
    model = loaded.model
    if text.token_vocab is not None and text.token_vocab > model.cfg.vocab_size:
        raise ValueError(f"the token files have data.vocab_size={text.token_vocab} ids but {loaded.path} has a "
                         f"vocabulary of {model.cfg.vocab_size}; evaluate token files of the model's own tokenizer")
    L = seq_len or model.cfg.max_seq_len
    t0 = time.perf_counter()
    totals = loss_over(model, tokens.streams, L, batch_size, device, progress, desc=loaded.path.name)
    seconds = time.perf_counter() - t0
    nats_per_token = totals.nats / totals.tokens
    bpb = totals.nats / (tokens.num_bytes * math.log(2)) if tokens.num_bytes else None
    params = count_params(model.cfg)
    coupling = batch_coupling(model)
    return {
        "checkpoint": str(loaded.path.resolve()), "given_as": spec or str(loaded.path), "kind": loaded.kind,
        "step": loaded.metadata.get("step"), "run_dir": _run_dir_of(loaded.path),
        "params_total": params.total, "params_active": params.active,
        "sparse_layers": list(model.cfg.sparse_layers), "vocab_size": model.cfg.vocab_size,
        "tokenizer": tokenizer_fingerprint(loaded.tokenizer) if loaded.tokenizer is not None else None,
        "data": text.describe(),
        "nats_per_token": nats_per_token, "bits_per_byte": bpb, "perplexity": math.exp(min(nats_per_token, 700.0)),
        "sum_nats": totals.nats, "tokens": totals.tokens, "bytes": tokens.num_bytes,
        "seq_len": L, "windows": totals.windows, "batch_size": batch_size, "batch_dependent": coupling,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "device": str(device),
        "seconds": round(seconds, 3), "tokens_per_s": totals.tokens / seconds if seconds > 0 else None,
        "routing": {f"layer{layer}": s for layer, s in totals.routing.items()},
        "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _run_dir_of(checkpoint: Path) -> Optional[str]:
    """RUN_DIR of a checkpoint at RUN_DIR/checkpoints/step_N, else None."""
    p = checkpoint.resolve()
    if p.parent.name == "checkpoints" and p.name.startswith("step_"):
        return str(p.parent.parent)
    return None


def run_data_config(loaded: LoadedModel) -> DataConfig:
    """The data settings of the run that wrote a Switchyard checkpoint (its config.json records them)."""
    from moe.config import config_from_dict

    data = ((loaded.metadata.get("run") or {}).get("data"))
    if not isinstance(data, dict):
        raise ValueError(f"{loaded.path} does not record the data it was trained on (a {loaded.kind} checkpoint, or "
                         f"not written by experiments.train); pass the text with data=shakespeare, "
                         f"data=text data.path=FILE or data=tokens data.path=FILE.bin data.vocab_size=V")
    return config_from_dict(DataConfig, data, f"the data settings in {loaded.path / CONFIG_FILE}")


def _same_corpus(a: DataConfig, b: DataConfig) -> bool:
    keep = lambda c: {k: v for k, v in dataclasses.asdict(c).items() if k not in ("cache_dir", "vocab_size", "tokenizer")}
    return keep(a) == keep(b)


def resolve_device(name: str) -> torch.device:
    """The `device` setting (auto: cuda when available)."""
    return ranks.resolve_device(name, "device")


def evaluate(cfg: EvalConfig, log=print) -> list[dict[str, Any]]:
    """Evaluates every checkpoint of cfg on one text; returns the eval.json records (in cfg's order)."""
    device = resolve_device(cfg.device)
    dtype = DTYPES[cfg.dtype]
    records: list[dict[str, Any]] = []
    text: Optional[EvalText] = None
    data = cfg.data
    tokenized: dict[Optional[str], TokenizedText] = {}  # tokenizer fingerprint -> the text under it
    for spec in cfg.checkpoints:
        loaded = load_checkpoint(spec, device, dtype)
        if text is None:
            from_run = data is None
            if from_run:
                data = run_data_config(loaded)
            text = load_text(data, cfg.split or default_split(data, from_run))
        elif cfg.data is None and not _same_corpus(run_data_config(loaded), data):
            raise ValueError(f"{loaded.path} was trained on other data than {cfg.checkpoints[0]}; pass data=... to "
                             f"evaluate every checkpoint on one text")
        key = tokenizer_fingerprint(loaded.tokenizer) if loaded.tokenizer is not None else None
        if key not in tokenized:
            tokenized[key] = tokenize(text, loaded.tokenizer)
        coupling = batch_coupling(loaded.model)
        if coupling and cfg.batch_size > 1:
            log(f"note: {loaded.path}: {coupling}, so a token's routing depends on the other tokens of its batch and "
                f"the loss on batch_size={cfg.batch_size}")
        records.append(evaluate_checkpoint(loaded, text, tokenized[key], cfg.seq_len, cfg.batch_size, device,
                                           cfg.progress, spec))
        del loaded
    return records


def main_with(cfg: EvalConfig) -> tuple[list[dict[str, Any]], Path]:
    records = evaluate(cfg)
    out = write_eval_file(cfg.out if cfg.out is not None else default_out(records), records)
    d = records[0]["data"]
    print(f"text: {d['source']} {d['path'] or ''} split={d['split']} "
          f"({records[0]['bytes'] if records[0]['bytes'] is not None else '?'} bytes), windows of up to "
          f"{records[0]['seq_len']} predicted tokens\n")
    print(table(records))
    for r in records:
        if r["routing"]:
            print(f"\nrouting of {r['given_as']}:")
            print("\n".join(routing_lines(r)))
    print(f"\n{EVAL_FILE}: {out}")
    return records, out


@hydra.main(config_path=CONFIG_DIR, config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from experiments.app_options import resolved

    try:
        main_with(eval_config_from_dict(resolved(cfg, "python -m experiments.evaluate checkpoint=DIR")))
    except (ValueError, FileNotFoundError) as e:
        print(f"evaluate: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
