"""experiments.bench_generate on a few tokens: the three implementations generate the same tokens (the bench checks
that before timing), every number is positive, and --append writes the command, the machine and the table."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from experiments import bench_generate  # noqa: E402


def test_prompts_left_padded():
    idx, mask = bench_generate.prompts(4, 8, True, 50, seed=0)
    assert idx.shape == (4, 8) and mask.sum(1).tolist() == [2, 4, 6, 8]
    idx, mask = bench_generate.prompts(2, 5, False, 50, seed=0)
    assert bool(mask.all()) and idx.shape == (2, 5)


def test_quick_run_appends_a_section(tmp_path, capsys):
    threads = torch.get_num_threads()
    doc = tmp_path / "bench.md"
    doc.write_text("# Benchmarks\n")
    bench_generate.main(["--batches", "1,2", "--prompt", "4", "--new", "3", "--reps", "1", "--append", str(doc)])
    assert torch.get_num_threads() == threads  # restored
    printed = capsys.readouterr().out
    assert "load average" in printed and "transformers" in printed
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n")
    assert "python -m experiments.bench_generate --batches 1,2 --prompt 4 --new 3 --reps 1" in text
    assert "CPU(s):" in text or "logical cores" in text
    rows = [ln for ln in text.splitlines() if ln.startswith("| 1 |") or ln.startswith("| 2")]
    assert [r.split(" | ")[0] for r in rows] == ["| 1", "| 2", "| 2 (lengths differ, left-padded)"]
    for r in rows:
        cells = [c.strip().rstrip("×") for c in r.strip("|").split("|")[1:]]
        assert len(cells) == 5 and all(float(c) > 0 for c in cells)


def test_refuses_a_run_past_max_seq_len():
    with pytest.raises(ValueError, match="max_seq_len=128"):
        bench_generate.run([1], length=100, new=40, reps=1, log=lambda s: None)
