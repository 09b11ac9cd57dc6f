"""`python -m moe.kernels.autotune` (issue 20, item 1): without a GPU, --quick checks the plumbing under the
interpreter; the table it writes is the one the kernels look up, bucket for bucket."""
from __future__ import annotations

import json

import pytest
import torch

# First: test_grouped_gemm sets TRITON_INTERPRET before triton's first import, and skips this module too
# where triton is missing or CPU tensors cannot run.
from tests.moe.kernels.test_grouped_gemm import CUDA, INTERPRETED

import moe.kernels.down_combine as down
import moe.kernels.tile_configs as tc
import moe.kernels.up_projection as upk
import moe.kernels.weight_grad as wg
from moe.kernels.autotune import QUICK_INTERPRETER_SHAPE, Shape, main
from moe.kernels.expert_mlp import grouped_expert_mlp

if CUDA or not INTERPRETED:
    pytest.skip("the plumbing check runs without a GPU, under TRITON_INTERPRET=1", allow_module_level=True)


def keys(doc):
    return {(e["kernel"], e["rows"], e["k"], e["n"]) for e in doc["entries"]}


def test_quick_writes_a_table_the_launchers_look_up(tmp_path, monkeypatch, capsys):
    out = tmp_path / "tuned.json"
    assert main(["--out", str(out), "--quick"]) == 0
    doc = json.loads(out.read_text())
    assert doc["format"] == 1 and {e["device"] for e in doc["entries"]} == {"interpreter"}
    assert {e["kernel"] for e in doc["entries"]} == {"up_glu", "down", "grad_h", "grad_h_act", "grad_x_glu",
                                                      "wgrad_up_glu", "wgrad_down"}
    assert all(e["tried"] == 2 and e["ms"] > 0 for e in doc["entries"])  # defaults + one candidate, both agreed
    assert "wrote 7 entries" in capsys.readouterr().out
    tc.load_table.cache_clear()
    assert len(tc.load_table(out)) == 7

    # The public functions at the quick shape ask for exactly the buckets that were written (the pair of functions
    # runs grad_h, the merged one grad_h_act).
    asked = []
    real = tc.tiles_for

    def spy(kernel, blocks, like, rows, k, n):
        asked.append((kernel, tc.rows_bucket(rows), k, n))
        return real(kernel, blocks, like, rows, k, n)

    for module in (upk, down, wg):
        monkeypatch.setattr(module, "tiles_for", spy)
    s = Shape.parse(QUICK_INTERPRETER_SHAPE)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(s.tokens, s.d, generator=g, requires_grad=True)
    w_up, w_gate = (torch.randn(s.experts, s.d, s.f, generator=g, requires_grad=True) for _ in range(2))
    w_down = torch.randn(s.experts, s.f, s.d, generator=g, requires_grad=True)
    row_token = torch.arange(s.tokens * s.k) % s.tokens
    offsets = torch.linspace(0, s.tokens * s.k, s.experts + 1).long()
    rw = torch.rand(s.tokens * s.k, requires_grad=True)
    h = upk.gather_grouped_up(x, row_token, offsets, w_up, w_gate, None, None, "silu")
    down.grouped_down_combine(h, w_down, None, offsets, rw, row_token, s.tokens).sum().backward()
    grouped_expert_mlp(x, row_token, offsets, rw, w_up, w_gate, None, None, w_down, None, "silu").sum().backward()
    assert set(asked) == keys(doc)


def test_merge_keeps_other_entries_and_bad_arguments_exit_2(tmp_path, capsys):
    out = tmp_path / "tuned.json"
    assert main(["--out", str(out), "--quick", "--kernels", "down"]) == 0
    assert main(["--out", str(out), "--quick", "--kernels", "grad_h,down"]) == 0
    doc = json.loads(out.read_text())
    assert sorted(e["kernel"] for e in doc["entries"]) == ["down", "grad_h"]  # down replaced, not doubled
    assert main(["--out", str(out), "--quick", "--kernels", "up"]) == 2  # GLU is the default: up_glu applies
    assert "do not apply here" in capsys.readouterr().err
    assert main(["--out", str(out)]) == 2  # no GPU and no --quick: nothing to time
    assert "--quick" in capsys.readouterr().err
    with pytest.raises(ValueError, match="T:d:f:E:k"):
        Shape.parse("16:32:48")
    with pytest.raises(ValueError, match="k <= E"):
        Shape.parse("16:32:48:2:4")


def test_quick_tries_a_split_k_candidate_for_skewed_loads():
    """At a skewed shape (expert loads 34, 122, 246, 622: mean 256, so S = 256 and the busiest expert spans three
    chunks) the weight gradients' candidates include split-K, and --quick's plumbing run tries it: it agrees with
    the defaults (else it would say so), and its entry records which blocks won, split or not."""
    from moe.kernels.autotune import tune
    from moe.kernels.tile_configs import split_rows

    lines = []
    entries = tune(Shape.parse("1024:16:16:4:1"), torch.float32, False, "silu", ["wgrad_down"], True, log=lines.append)
    assert [e["kernel"] for e in entries] == ["wgrad_down"] and entries[0]["tried"] == 3
    assert not any("disagrees" in line or "failed" in line for line in lines)
    blocks = tc._blocks_from(entries[0], "entry")  # the table reads back what was written
    assert split_rows(blocks) in (0, 256) and ("split256" in lines[-1]) == (split_rows(blocks) == 256)


def test_hot_expert_takes_its_share_and_bad_hot_exits_2(tmp_path, capsys):
    """--hot F: the last expert gets at least round(F T k) rows (here 30% of 400 = 120), the plan stays a valid
    top-k plan (k rows per token); hot = 0 keeps the old plan and operands; F > 1/k exits 2."""
    from moe.kernels.autotune import make_inputs

    shape = Shape.parse("200:16:16:8:2")
    hot = make_inputs(shape, torch.float32, torch.device("cpu"), False, hot=0.3)
    counts = hot["offsets"].diff()
    assert counts.sum() == 400 and counts[-1] >= 120 and counts[-1] <= 200
    cold = make_inputs(shape, torch.float32, torch.device("cpu"), False)
    assert cold["offsets"].diff()[-1] < 120
    again = make_inputs(shape, torch.float32, torch.device("cpu"), False, hot=0.0)
    assert torch.equal(again["offsets"], cold["offsets"]) and torch.equal(again["x"], cold["x"])
    rows_per_token = torch.bincount(hot["row_token"], minlength=200)
    assert (rows_per_token == 2).all()
    with pytest.raises(ValueError, match="--hot 0.6"):
        make_inputs(shape, torch.float32, torch.device("cpu"), False, hot=0.6)
    assert main(["--out", str(tmp_path / "t.json"), "--quick", "--hot", "0.9"]) == 2
    assert "between 0 and 1/k" in capsys.readouterr().err
