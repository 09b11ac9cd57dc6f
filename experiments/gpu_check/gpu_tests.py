"""Step b_gpu_tests: the gpu-marked tests (pytest -m gpu), with the count of each outcome and the slowest tests.

On the GPU every gpu-marked test under tests/moe runs (where all of them live). A module that fails to collect
(one needing a package the machine lacks) fails the step only when it holds gpu-marked tests; a dry run collects
only tests/moe/kernels/test_gpu_sizes.py, whose tests skip without CUDA. Nothing here needs Hydra.
"""
from __future__ import annotations

import collections
import time
from pathlib import Path

from experiments.gpu_check.step_io import StepRecord, parse_args

GPU_PATHS = ("tests/moe",)
DRY_PATHS = ("tests/moe/kernels/test_gpu_sizes.py",)


class Outcomes:
    """A pytest plugin counting outcomes (setup errors and skips count once per test) and keeping durations."""

    def __init__(self, rec: StepRecord):
        self.rec = rec
        self.counts: collections.Counter = collections.Counter()
        self.durations: dict[str, float] = {}
        self.failed: list[str] = []
        self.collection_errors: list[str] = []  # modules without gpu-marked tests that failed to import

    def pytest_runtest_logreport(self, report) -> None:
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            outcome = "error" if report.when == "setup" and report.outcome == "failed" else report.outcome
            self.counts[outcome] += 1
            self.durations[report.nodeid] = round(report.duration, 3)
            if outcome in ("failed", "error"):
                self.failed.append(report.nodeid)
            self.rec.put("outcomes", dict(self.counts))  # kept current: the box may end the run

    def pytest_collectreport(self, report) -> None:
        if report.failed:
            self.counts["collection_error"] += 1
            path = Path(str(report.fspath))
            holds_gpu_tests = not path.is_file() or "mark.gpu" in path.read_text(errors="replace")
            (self.failed if holds_gpu_tests else self.collection_errors).append(report.nodeid or str(path))


def main(argv=None) -> None:
    a = parse_args(__doc__.splitlines()[0], argv)
    rec = StepRecord(a.json)
    import pytest

    paths = list(DRY_PATHS if a.dry_run else GPU_PATHS)
    plugin = Outcomes(rec)
    t0 = time.perf_counter()
    # no:hydra_pytest: hydra-core (a carried wheel) registers a pytest plugin that imports Hydra into every run
    args = ["-q", "-m", "gpu", "-rfEs", "-p", "no:cacheprovider", "-p", "no:hydra_pytest",
            "--continue-on-collection-errors", *paths]
    print(f"pytest {' '.join(args)}", flush=True)
    rc = pytest.main(args, plugins=[plugin])
    rec.put("paths", paths)
    rec.put("pytest_exit_code", int(rc))
    rec.put("seconds", time.perf_counter() - t0)
    rec.put("outcomes", dict(plugin.counts))
    rec.put("failed", plugin.failed)
    rec.put("collection_errors_without_gpu_tests", plugin.collection_errors)
    rec.put("slowest", dict(sorted(plugin.durations.items(), key=lambda kv: -kv[1])[:10]))
    ran = plugin.counts["passed"] + plugin.counts["failed"] + plugin.counts["error"]
    if a.dry_run or ran:
        rec.check("gpu_tests_pass", not plugin.failed and (int(rc) in (0, 5) or plugin.collection_errors),
                  f"{dict(plugin.counts)}; pytest exit code {int(rc)}")
    else:
        rec.skip(f"no gpu-marked test ran ({dict(plugin.counts)}): no CUDA")
    rec.finish()


if __name__ == "__main__":
    main()
