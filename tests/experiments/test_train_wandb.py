"""A training run logged to an offline wandb run: its history rows equal metrics.jsonl's records."""
from __future__ import annotations

import glob
import json
import time
from pathlib import Path

import pytest

from experiments.metrics import _wandb_id, read_metrics
from tests.experiments.test_train import train
from tests.wandb_log import wandb_records


def _wandb_history(path: Path) -> list[dict]:
    """History rows of an offline .wandb file."""
    return [{it.key or "/".join(it.nested_key): json.loads(it.value_json) for it in rec.history.item}
            for rec in wandb_records(path) if rec.WhichOneof("record_type") == "history"]


def test_wandb_offline(tmp_path, text_corpus):
    pytest.importorskip("wandb")
    train(tmp_path, text_corpus, "trainer.max_steps=2", "logger=wandb", "logger.mode=offline")
    run_id = _wandb_id(tmp_path)
    files = glob.glob(str(tmp_path / "wandb" / f"offline-run-*-{run_id}" / f"run-{run_id}.wandb"))
    assert len(files) == 1, sorted(glob.glob(str(tmp_path / "wandb" / "*")))
    try:
        from wandb.proto import wandb_internal_pb2  # noqa: F401
    except ImportError:
        pytest.skip("this wandb has no protobuf module to read the run back")
    # wandb.finish() can return before wandb's service has flushed the offline file: wait for both rows.
    rows, deadline = [], time.monotonic() + 30
    while True:
        try:
            rows = _wandb_history(Path(files[0]))
        except Exception:  # a half-written record
            rows = []
        if len(rows) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    records = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    for row, rec in zip(rows, records):
        assert row["train_loss"] == rec["train_loss"] and row["lr"] == rec["lr"] and row["tokens"] == rec["tokens"]
        assert row["moe/layer0/dropped_fraction"] == rec["moe/layer0/dropped_fraction"]
    assert rows[-1]["val_loss"] == records[-1]["val_loss"]
