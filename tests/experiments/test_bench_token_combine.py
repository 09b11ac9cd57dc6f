"""experiments.bench_token_combine: both combines it times compute the same thing (fp32: bitwise, the same
per-token order), and its one line reports positive times and their ratio."""
from __future__ import annotations

import re

import torch

from experiments import bench_token_combine as b


def test_old_and_new_agree_and_the_line_parses(capsys):
    tensors = b.make(64, 16, 3, 8, torch.float32, "cpu")
    grads = [b.step(kind, *tensors)() for kind in ("index_add_", "token_rows")]
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])  # x, out
    torch.testing.assert_close(grads[0][2], grads[1][2], rtol=1e-6, atol=1e-6)  # weight: a d-long dot each
    b.main(["--shape", "64:16:3", "--reps", "1"])
    line = capsys.readouterr().out
    ms = [float(v) for v in re.findall(r"([\d.]+) ms", line)]
    ratio = float(re.search(r"ratio ([\d.]+)", line).group(1))
    assert len(ms) == 2 and all(v > 0 for v in ms) and ratio > 0
