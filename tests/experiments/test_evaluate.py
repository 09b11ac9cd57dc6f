"""experiments.evaluate: the loss over a whole text equals a hand computation, bits per byte follow from it, every
token of a split is counted, routing statistics add up, several checkpoints make one table and one eval.json, and
experiments.compare picks eval.json up. Checkpoints come from short Trainer runs (tests/experiments/test_train.py)."""
from __future__ import annotations

import dataclasses
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from experiments.compare import build_report, write_report
from experiments.config import run_config_from_dict
from experiments.data import DataConfig
from experiments.evaluate import (EVAL_FILE, EvalConfig, RoutingTotals, default_out, eval_config_from_dict, evaluate,
                                  read_eval_file, windows, write_eval_file)
from experiments.hydra_conf import CONFIG_MODULE, register_configs
from experiments.tokenizer import load_tokenizer
from experiments.trainer import Trainer
from moe.checkpoint import load_model, save_checkpoint
from tests.experiments.test_train import TINY

REPO_ROOT = Path(__file__).resolve().parents[2]
MAX_SEQ = 32  # the tiny models' max_seq_len (TINY): the evaluation windows
# Multi-byte characters, so a byte count differs from a character count, and BPE tokens differ from bytes.
SMALL_TEXT = ("Über den Wolken – the quick brown fox jumps over the lazy dog. " * 3) + "naïve café ☕\n"

register_configs()


def train_run(run_dir: Path, corpus: Path, model: str) -> Trainer:
    """Two training steps of `model` on `corpus` with a 320-token BPE tokenizer (tokens are not bytes)."""
    overrides = [f"model={model}", "data=text", f"data.path={corpus}", "data.tokenizer=bpe", "data.vocab_size=320",
                 "model.vocab_size=320", *TINY, "trainer.max_steps=2"]
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    t = Trainer(run_config_from_dict(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True), str(run_dir)))
    t.fit()
    return t


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, text_corpus) -> dict:
    """A sweep directory with a dense and an MoE run on one corpus."""
    root = tmp_path_factory.mktemp("sweep")
    dense = train_run(root / "dense", text_corpus, "tiny_dense")
    moe = train_run(root / "moe", text_corpus, "tiny_moe")
    return {"root": root, "dense": root / "dense", "moe": root / "moe", "moe_trainer": moe, "dense_trainer": dense}


@pytest.fixture
def small_text(tmp_path) -> Path:
    path = tmp_path / "small.txt"
    path.write_text(SMALL_TEXT, encoding="utf-8")
    return path


def ckpt(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "step_2"


def run_eval(*checkpoints: Path, data: DataConfig | None = None, **kw) -> list[dict]:
    return evaluate(EvalConfig([str(c) for c in checkpoints], data=data, device="cpu", progress=False, **kw),
                    log=lambda *_: None)


@torch.no_grad()
def hand_mean_loss(checkpoint: Path, text: str) -> tuple[float, int]:
    """Mean -ln p over the text's tokens, each predicted once from the tokens before it in its window of 32,
    written out without experiments.evaluate: (mean nats, predicted tokens)."""
    tok = load_tokenizer(checkpoint)
    model = load_model(checkpoint).eval()
    ids = [tok.eos_id] + tok.encode(text)
    total, n = 0.0, 0
    for start in range(0, len(ids) - 1, MAX_SEQ):
        x = torch.tensor(ids[start:start + MAX_SEQ])
        y = torch.tensor(ids[start + 1:start + MAX_SEQ + 1])
        logp = torch.log_softmax(model(x[None, :len(y)]).logits[0].double(), dim=-1)
        total -= float(logp[torch.arange(len(y)), y].sum())
        n += len(y)
    return total / n, n


# ------------------------------------------------------------------------------------------ the numbers


@pytest.mark.parametrize("which", ["dense", "moe"])
def test_loss_equals_hand_computation_and_bits_per_byte(sweep, small_text, which):
    (rec,) = run_eval(ckpt(sweep[which]), data=DataConfig(source="text", path=str(small_text)))
    expected, n = hand_mean_loss(ckpt(sweep[which]), SMALL_TEXT)
    n_bytes = len(SMALL_TEXT.encode("utf-8"))
    assert rec["nats_per_token"] == pytest.approx(expected, rel=1e-6)
    assert rec["tokens"] == n and n < n_bytes  # BPE: fewer tokens than bytes
    assert rec["bytes"] == n_bytes and n_bytes > len(SMALL_TEXT)  # UTF-8 bytes, not characters
    assert rec["bits_per_byte"] == pytest.approx(rec["nats_per_token"] * rec["tokens"] / (rec["bytes"] * math.log(2)),
                                                 rel=1e-12)
    assert rec["windows"] == math.ceil(n / MAX_SEQ) > 1 and rec["seq_len"] == MAX_SEQ
    assert rec["data"]["split"] == "all"  # a text file named with data=text is read whole
    assert rec["sum_nats"] == pytest.approx(expected * n, rel=1e-6)


def test_batch_size_and_window_length(sweep, small_text):
    """Dropless top-k routing routes each token alone, so batching does not change the loss; shorter windows give
    each token less context, so the loss changes but the token count does not."""
    data = DataConfig(source="text", path=str(small_text))
    one, eight = (run_eval(ckpt(sweep["moe"]), data=data, batch_size=b)[0] for b in (1, 8))
    assert eight["nats_per_token"] == pytest.approx(one["nats_per_token"], rel=1e-6)
    assert eight["routing"]["layer0"]["tokens_per_expert"] == one["routing"]["layer0"]["tokens_per_expert"]
    short = run_eval(ckpt(sweep["moe"]), data=data, seq_len=8)[0]
    assert short["tokens"] == one["tokens"] and short["windows"] == math.ceil(one["tokens"] / 8)
    assert short["nats_per_token"] != pytest.approx(one["nats_per_token"], rel=1e-6)
    assert windows(10, 4) == [(0, 4), (4, 4), (8, 1)]  # 9 predictions: [1,5), [5,9), [9,10)


def test_whole_validation_split_by_default(sweep):
    """Without data=, the run's own corpus: its validation split, every token of it (training's val.bin)."""
    t = sweep["moe_trainer"]
    (rec,) = run_eval(ckpt(sweep["moe"]))
    assert rec["data"]["split"] == "val" and rec["data"]["source"] == "text"
    assert rec["tokens"] == len(t.data.val)  # the validation tokens, all of them (one document: no separator)
    assert rec["bytes"] == len(t.data.tokenizer.decode(np.asarray(t.data.val).tolist()).encode("utf-8"))
    train = run_eval(ckpt(sweep["moe"]), split="train")[0]
    assert train["tokens"] == len(t.data.train)
    assert train["data"]["text_fingerprint"] != rec["data"]["text_fingerprint"]


def test_token_file(sweep, tmp_path):
    """data=tokens: the file's ids as they are, the bytes those of its decoded text."""
    t = sweep["moe_trainer"]
    val = np.asarray(t.data.val, dtype=np.uint16)
    path = tmp_path / "val.bin"
    val.tofile(path)
    data = DataConfig(source="tokens", path=str(path), vocab_size=320)
    (rec,) = run_eval(ckpt(sweep["moe"]), data=data)
    (ref,) = run_eval(ckpt(sweep["moe"]))  # the same tokens, from the text
    assert rec["data"]["split"] == "all" and rec["tokens"] == len(val)
    assert rec["nats_per_token"] == pytest.approx(ref["nats_per_token"], rel=1e-6) and rec["bytes"] == ref["bytes"]


# ------------------------------------------------------------------------------------------ routing statistics


def test_routing_statistics_of_an_moe_checkpoint(sweep, small_text):
    moe, dense = run_eval(ckpt(sweep["moe"]), ckpt(sweep["dense"]), data=DataConfig(source="text", path=str(small_text)))
    assert dense["routing"] == {} and dense["sparse_layers"] == []
    assert set(moe["routing"]) == {"layer0", "layer1"}  # tiny_moe: every layer sparse
    for s in moe["routing"].values():
        assert s["num_experts"] == 8 and s["tokens"] == moe["tokens"]  # one routed token per predicted token
        assert sum(s["tokens_per_expert"]) == 2 * moe["tokens"]  # top-2, dropless: nothing dropped
        assert s["dropped_fraction"] == 0.0
        assert sum(s["load"]) == pytest.approx(1.0) and s["max_load"] == pytest.approx(max(s["load"]) * 8)
        assert s["dead_experts"] == [e for e, c in enumerate(s["tokens_per_expert"]) if c == 0]
        assert 0.0 < s["router_entropy"] <= math.log(8) + 1e-6 and 1 / 8 <= s["top1_prob"] <= 1.0


def test_routing_totals_over_batches():
    """Counts add up over batches; a dead expert is one that no batch sent a token to; means weigh by tokens."""
    totals = RoutingTotals()
    totals.add({"tokens_per_expert": torch.tensor([3.0, 0.0, 5.0, 0.0]), "router_entropy": torch.tensor(1.0),
                "dropped_fraction": torch.tensor(0.5), "top1_prob": torch.tensor(0.4)}, num_tokens=4)
    totals.add({"tokens_per_expert": torch.tensor([0.0, 2.0, 2.0, 0.0]), "router_entropy": torch.tensor(0.25),
                "dropped_fraction": torch.tensor(0.0), "top1_prob": torch.tensor(0.7)}, num_tokens=2)
    s = totals.summary()
    assert s["tokens_per_expert"] == [3, 2, 7, 0] and s["tokens"] == 6
    assert s["load"] == pytest.approx([3 / 12, 2 / 12, 7 / 12, 0.0]) and s["max_load"] == pytest.approx(7 / 12 * 4)
    assert s["dead_experts"] == [3] and s["num_dead_experts"] == 1
    assert s["router_entropy"] == pytest.approx((4 * 1.0 + 2 * 0.25) / 6)
    assert s["dropped_fraction"] == pytest.approx(2 / 6) and s["top1_prob"] == pytest.approx((1.6 + 1.4) / 6)


# ------------------------------------------------------------------------------------------ eval.json, the CLI, compare


def test_eval_json_replaces_same_text_and_keeps_others(sweep, small_text, tmp_path):
    out = tmp_path / EVAL_FILE
    data = DataConfig(source="text", path=str(small_text))
    first = run_eval(ckpt(sweep["moe"]), data=data)
    write_eval_file(out, first)
    write_eval_file(out, run_eval(ckpt(sweep["moe"]), data=data, batch_size=2))  # same checkpoint, same text
    write_eval_file(tmp_path, run_eval(ckpt(sweep["moe"])))  # a directory: its eval.json; another text
    recs = read_eval_file(out)
    assert [(r["batch_size"], r["data"]["split"]) for r in recs] == [(2, "all"), (8, "val")]
    r = recs[0]
    assert r["checkpoint"] == str(ckpt(sweep["moe"]).resolve()) and r["step"] == 2 and r["kind"] == "switchyard"
    assert r["run_dir"] == str(sweep["moe"].resolve()) and r["nats_per_token"] == pytest.approx(first[0]["nats_per_token"])
    assert r["params_total"] > r["params_active"] > 0 and r["vocab_size"] == 320
    assert set(r) >= {"bits_per_byte", "tokens", "bytes", "perplexity", "routing", "data", "seconds", "windows"}
    assert r["perplexity"] == pytest.approx(math.exp(r["nats_per_token"]))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="bad.json is not an eval.json"):
        read_eval_file(tmp_path / "bad.json")


def test_cli_several_checkpoints_one_table(sweep, small_text, tmp_path):
    """The command as a user types it: two checkpoints (one as its run directory) -> one table, one eval.json."""
    out = tmp_path / "both.json"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.evaluate", f"checkpoint=[{sweep['dense']},{ckpt(sweep['moe'])}]",
         "data=text", f"data.path={small_text}", "progress=false", f"out={out}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    recs = read_eval_file(out)
    assert [r["checkpoint"] for r in recs] == [str(ckpt(sweep[k]).resolve()) for k in ("dense", "moe")]
    assert recs[0]["data"]["text_fingerprint"] == recs[1]["data"]["text_fingerprint"]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "switchyard" in line]
    assert len(rows) == 2
    for row, rec in zip(rows, recs):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[6]) == pytest.approx(rec["nats_per_token"], abs=5e-5)
        assert float(cells[7]) == pytest.approx(rec["bits_per_byte"], abs=5e-5)
    assert "routing of" in proc.stdout and "layer1: max_load" in proc.stdout
    assert not (tmp_path / "outputs").exists() and not list(tmp_path.glob("*.log"))  # hydra writes nothing else


def test_compare_reads_eval_json(sweep, tmp_path):
    """evaluate writes RUN_DIR/eval.json for a run's checkpoint; compare's table and CSV carry its numbers."""
    root = tmp_path / "sweep"
    shutil.copytree(sweep["root"], root)
    recs = {}
    for name in ("dense", "moe"):
        records = run_eval(root / name)  # the run directory: its newest checkpoint, its validation split
        assert default_out(records) == root / name / EVAL_FILE
        write_eval_file(default_out(records), records)
        recs[name] = records[0]
    report = build_report(root)
    rows = {r["run"]: r for r in report.rows}
    for name in ("dense", "moe"):
        assert rows[name]["eval_nats_per_token"] == recs[name]["nats_per_token"]
        assert rows[name]["eval_bits_per_byte"] == recs[name]["bits_per_byte"]
        assert rows[name]["eval_tokens"] == recs[name]["tokens"] and rows[name]["eval_step"] == 2
    paths = write_report(report, plots=False)
    md = paths["comparison.md"].read_text()
    assert "eval bits/byte ⁴" in md and f"{recs['moe']['bits_per_byte']:.4f}" in md and "split=val" in md
    assert "eval_bits_per_byte" in paths["comparison.csv"].read_text().splitlines()[0]
    (root / "dense" / EVAL_FILE).write_text("not json")  # a broken file is named, not fatal
    report = build_report(root)
    assert {r["run"]: r for r in report.rows}["dense"]["eval_nats_per_token"] is None
    assert any("dense/eval.json: not read" in n for n in report.notes)


# ------------------------------------------------------------------------------------------ errors


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="checkpoint is missing"):
        eval_config_from_dict({"split": None})
    with pytest.raises(ValueError, match="split='test'"):
        eval_config_from_dict({"checkpoint": "x", "split": "test"})
    with pytest.raises(ValueError, match="batch_size='abc' must be int"):
        eval_config_from_dict({"checkpoint": "x", "batch_size": "abc"})
    with pytest.raises(ValueError, match="unknown field"):
        eval_config_from_dict({"checkpoint": "x", "batchsize": 2})
    cfg = eval_config_from_dict({"checkpoint": ["a", "b"], "data": {"source": "text", "path": "f.txt"}})
    assert cfg.checkpoints == ["a", "b"] and cfg.data.path == "f.txt"
    with pytest.raises(FileNotFoundError, match="checkpoint='.*nowhere' does not exist"):
        run_eval(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a checkpoint directory"):
        run_eval(tmp_path / "empty")


def test_conf_keys_are_the_config_fields():
    """Every key of conf/evaluate.yaml is an EvalConfig field (checkpoint -> checkpoints) with the same default, and
    data=text composes the data group (conf/data/text.yaml) into a DataConfig."""
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        plain = OmegaConf.to_container(compose("evaluate", overrides=["checkpoint=x"]), resolve=True)
        text = OmegaConf.to_container(compose("evaluate", overrides=["checkpoint=[x,y]", "data=text", "data.path=f.txt"]),
                                      resolve=True)
    fields = {f.name for f in dataclasses.fields(EvalConfig)}
    assert set(plain) | {"checkpoints", "data"} == fields | {"checkpoint"} and "data" not in plain
    assert eval_config_from_dict(plain) == EvalConfig(["x"])
    cfg = eval_config_from_dict(text)
    assert cfg.checkpoints == ["x", "y"] and cfg.data == DataConfig(source="text", path="f.txt")


def test_checkpoint_without_recorded_data_needs_data(sweep, tmp_path):
    path = save_checkpoint(tmp_path / "bare", load_model(ckpt(sweep["moe"])))  # no run settings, no tokenizer
    with pytest.raises(ValueError, match="pass the text with data=shakespeare"):
        run_eval(path)
    with pytest.raises(ValueError, match="has no tokenizer, so it cannot read text"):
        run_eval(path, data=DataConfig(source="text", path=str(REPO_ROOT / "README.md")))
    shutil.rmtree(path)


@pytest.mark.parametrize("kind", ["hf", "gguf"])
def test_hf_directory_and_gguf_file_match_transformers(tmp_path, kind):
    """A Hugging Face directory and a GGUF file (read by experiments.convert.load_source) on a token file: the loss
    equals the one transformers computes with the same weights over the same windows."""
    from tests.upcycle.conftest import make_hf, write_gguf

    hf = make_hf("llama", tmp_path / "hf")
    source = tmp_path / "hf"
    if kind == "gguf":
        source = tmp_path / "model.gguf"
        write_gguf(source, hf, quantize=())  # unquantized: the weights are exactly the HF model's
    ids = np.random.default_rng(0).integers(0, 96, size=150).astype(np.uint16)
    ids.tofile(tmp_path / "ids.bin")
    data = DataConfig(source="tokens", path=str(tmp_path / "ids.bin"), vocab_size=96)
    (rec,) = run_eval(source, data=data, seq_len=32)
    total = 0.0
    with torch.no_grad():
        for start, n in windows(len(ids), 32):
            w = torch.from_numpy(ids[start:start + n + 1].astype(np.int64))[None]
            logp = torch.log_softmax(hf(input_ids=w[:, :-1]).logits[0].double(), -1)
            total -= float(logp[torch.arange(n), w[0, 1:]].sum())
    assert rec["kind"] == kind and rec["tokens"] == len(ids) - 1  # no tokenizer: no end-of-text in front
    assert rec["bytes"] is None and rec["bits_per_byte"] is None  # the bytes of a token file need its tokenizer
    assert rec["nats_per_token"] == pytest.approx(total / (len(ids) - 1), rel=1e-5)
