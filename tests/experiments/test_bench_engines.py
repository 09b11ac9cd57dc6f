"""experiments.bench_engines measures what the engines hold from the real objects: under torchrun, trainer=fsdp
on 2 processes holds half of trainer=single's parameter bytes on each rank (its shards partition the model's
parameters exactly), and after one AdamW step every rank's optimizer state is twice its parameter bytes
(exp_avg and exp_avg_sq, plus a scalar step per tensor)."""
from __future__ import annotations

import pytest

from experiments.bench_engines import corpus, measure_memory, memory_table, model_overrides, run_overrides

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

TINY = ["model.d_model=64", "model.n_head=2", "model.d_ff=128", "model.max_seq_len=32"]


def test_fsdp_halves_the_parameters_and_adamw_doubles_them(tmp_path):
    overrides = [*model_overrides("tiny_moe", n_layer=2, experts=4, expert_hidden=64), *TINY,
                 *run_overrides(corpus(tmp_path), batch=4, seq=16, steps=1)]
    one = measure_memory(1, "single", 1, overrides, tmp_path / "one")
    two = measure_memory(2, "fsdp", 1, overrides, tmp_path / "two")
    total = one["params_total"]

    (single,) = one["ranks"]
    assert single["param_elements"] == total and single["param_bytes"] == 4 * total  # fp32, tied head counted once
    assert sum(r["param_elements"] for r in two["ranks"]) == total, "the FSDP shards partition the parameters"
    for r in two["ranks"]:
        assert r["world"] == 2 and r["kind"] == "fsdp"
        assert abs(r["param_bytes"] / single["param_bytes"] - 0.5) <= 0.05, r
        assert r["param_storage_bytes"] >= r["param_bytes"]  # padding to equal chunks, never less
    for r in [single, *two["ranks"]]:
        # AdamW after a step: exp_avg and exp_avg_sq of every parameter shard, plus one fp32 scalar step each
        assert r["optimizer_state_tensors"] == 3 * r["param_tensors"]
        assert r["optimizer_state_bytes"] == 2 * r["param_bytes"] + 4 * r["param_tensors"], r
        assert min(r["peak_rss_bytes"], r["rss_bytes"]) > r["param_bytes"] + r["optimizer_state_bytes"]

    table = memory_table([one, two]).splitlines()
    assert len(table) == 4 and table[2].startswith("| 1 | single | 1 |") and table[3].startswith("| 2 | fsdp | 1 |")
