"""experiments.bench_trainer_overhead: the tree's bookkeeping and routing statistics against a base revision's, the
statistics checked equal before they are timed."""
from __future__ import annotations

import re

from experiments import bench_trainer_overhead as bench


def test_the_table_has_both_rows_with_ratios(capsys):
    bench.main(["--rounds", "2", "--steps", "2", "--log-interval", "2", "--batch", "2", "--seq", "16"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0].startswith("| tiny_moe, base c428fef |")
    assert rows[1].startswith("| bookkeeping per step (4 sparse layers) |")
    assert rows[2].startswith("| routing_stats, T=32 E=8 k=2 (values equal) |")
    for line in rows[1:]:
        base, this, ratio = (float(v.replace(",", "")) for v in line.split("|")[2:5])
        assert base > 0 and this > 0 and abs(ratio - this / base) < 0.01 + 0.01 * ratio
        assert len(re.findall(r"\d\.\d\d", line.split("|")[5])) == 2  # one ratio per round
