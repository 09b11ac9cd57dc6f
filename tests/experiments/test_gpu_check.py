"""The prepared GPU check (experiments.gpu_check): its budget table, its runner's statuses and time boxes, its
targets, and a dry run of real steps on CPU (docs/gpu_check.md).

The runner is tested with stand-in steps (tiny modules written to a temporary folder) so that a failure, a
timeout, a self-reported skip and a cut total budget each show in results.json and the log within seconds; the
real steps run in dry-run form (tiny shapes, the kernels under the Triton interpreter).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from experiments.gpu_check.budget import STEPS, TOTAL_BUDGET_S, WHEELS_BUDGET_S, Step
from experiments.gpu_check.runner import LOG_FILE, RESULTS_FILE, SCHEMA, run_check
from experiments.gpu_check.targets import evaluate

REPO = Path(__file__).resolve().parents[2]

FAKE = textwrap.dedent('''
    import json, sys, time
    path = sys.argv[sys.argv.index("--json") + 1]
    def put(d):
        open(path, "w").write(json.dumps(d))
    kind = "{kind}"
    print(f"{{kind}} step says hello", flush=True)
    if kind == "device":
        put({{"cuda": {cuda}, "device": "stand-in"}})
    elif kind == "ok":
        put({{"x": 1.5}})
    elif kind == "fail":
        put({{"partial": 1}})
        print("boom", flush=True)
        sys.exit(1)
    elif kind == "sleep":
        put({{"before": 1}})
        print("started, now sleeping", flush=True)
        time.sleep(60)
    elif kind == "skip":
        put({{"status": "skipped", "why": "needs a stand-in package"}})
''')


def fake_steps(tmp_path: Path, cuda: bool, monkeypatch) -> Path:
    pkg = tmp_path / "fake_steps"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for kind in ("device", "ok", "fail", "sleep", "skip"):
        (pkg / f"{kind}.py").write_text(FAKE.format(kind=kind, cuda=cuda))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # the runner keeps it after its own entries
    return pkg


def results(out: Path) -> dict:
    return json.loads((out / RESULTS_FILE).read_text())


def test_budget_table_fits_the_window_and_names_real_modules():
    names = [s.name for s in STEPS]
    assert names[0] == "device" and names[-1] == "g_large_shape" and len(set(names)) == len(names)
    assert [n[0] for n in names[1:]] == ["a", "b", "c", "d", "d", "d", "e", "f", "g"]  # issue 18 / 20's order
    assert WHEELS_BUDGET_S + sum(s.budget_s for s in STEPS) <= TOTAL_BUDGET_S == 510  # 8.5 minutes
    for s in STEPS:
        assert s.dry in ("run", "skip") and s.budget_s >= 20, s.name
        if s.module.startswith("experiments.gpu_check"):
            assert importlib.util.find_spec(s.module) is not None, s.module


def test_the_sweeps_time_the_new_variants_at_the_probes_skew():
    """The forward sweep's candidates include the persistent grid and TMA; the weight gradients' sweep runs at the
    probe's layer with one expert at 30% (--hot 0.3), where the candidates include TMA and split-K chunks."""
    import torch

    from experiments.gpu_check.probe import FULL, HEAVY_SHARE
    from moe.kernels.tile_configs import KERNELS, candidates, split_rows

    by = {s.name: s for s in STEPS}

    def arg(step, flag):
        return step.args[step.args.index(flag) + 1]

    fwd, wgrad = by["d_tile_sweep"], by["d_wgrad_sweep"]
    assert fwd.exports == "SWITCHYARD_TUNED_CONFIGS" and not wgrad.exports  # a skewed load's choice stays apart
    assert arg(fwd, "--table") != arg(wgrad, "--table")
    T, d, f, E, k = (int(v) for v in arg(wgrad, "--shape").split(":"))
    assert (T, d, f, E) == (FULL["T"], FULL["d"], FULL["f"], FULL["E"]) and k == 2
    assert float(arg(wgrad, "--hot")) == HEAVY_SHARE == float(wgrad.dry_args[wgrad.dry_args.index("--hot") + 1])
    for name in arg(fwd, "--kernels").split(","):
        tiles = candidates(name, torch.bfloat16)
        assert name in KERNELS and any(b.persistent for b in tiles) and any(b.tma for b in tiles), name
    N = T * k  # the autotuner's plan at --hot 0.3: one expert with 30% of the rows, the others about even
    heavy = round(HEAVY_SHARE * N)
    loads = [heavy] + [(N - heavy) // (E - 1)] * (E - 1)
    for name in arg(wgrad, "--kernels").split(","):
        tiles = candidates(name, torch.bfloat16, expert_rows=loads)
        splits = sorted(split_rows(b) for b in tiles if split_rows(b))
        assert name in KERNELS and any(b.tma for b in tiles) and splits == [256, 1024], (name, splits)


def test_runner_reports_each_status_and_keeps_a_timed_out_steps_output(tmp_path, monkeypatch):
    fake_steps(tmp_path, cuda=False, monkeypatch=monkeypatch)
    steps = [Step("device", "stand-in device", 20, "fake_steps.device"),
             Step("a_ok", "fine", 20, "fake_steps.ok"),
             Step("b_fail", "fails", 20, "fake_steps.fail"),
             Step("c_sleep", "sleeps past its box", 20, "fake_steps.sleep", dry_budget_s=2),
             Step("d_skip", "skips itself", 20, "fake_steps.skip"),
             Step("e_cuda_only", "only CUDA makes sense", 20, "fake_steps.absent", dry="skip")]
    out = tmp_path / "out"
    rc = run_check(out, dry_run=True, wheel_dir=tmp_path / "no_wheels", steps=steps)
    assert rc == 1  # a failure and a timeout
    r = results(out)
    assert r["schema"] == SCHEMA and r["dry_run"] is True and r["device"] == {"cuda": False, "device": "stand-in"}
    by = {s["name"]: s for s in r["steps"]}
    assert [s["name"] for s in r["steps"]] == ["wheels"] + [s.name for s in steps]
    assert {n: s["status"] for n, s in by.items()} == {
        "wheels": "skipped", "device": "ok", "a_ok": "ok", "b_fail": "failed", "c_sleep": "timeout",
        "d_skip": "skipped", "e_cuda_only": "skipped"}
    assert by["a_ok"]["numbers"] == {"x": 1.5} and by["b_fail"]["numbers"] == {"partial": 1}
    assert by["b_fail"]["rc"] == 1 and "boom" in by["b_fail"]["why"]
    assert by["c_sleep"]["numbers"] == {"before": 1}  # what it wrote before the box ended it
    assert 2.0 <= by["c_sleep"]["seconds"] < 12 and by["c_sleep"]["budget_s"] == 2
    assert "started, now sleeping" in by["c_sleep"]["output_tail"]
    assert by["d_skip"]["why"] == "needs a stand-in package"
    assert by["e_cuda_only"]["why"].startswith("no CUDA") and by["e_cuda_only"]["seconds"] == 0.0
    assert r["summary"] == {"ok": 2, "failed": 1, "timeout": 1, "skipped": 3}
    assert all(t["status"] == "unmeasured" for t in r["targets"]) and len(r["targets"]) >= 10
    log = (out / LOG_FILE).read_text()
    assert "[c_sleep] started, now sleeping" in log and "[b_fail] boom" in log and "=== summary" in log


def test_runner_cuts_the_boxes_to_the_total_budget(tmp_path, monkeypatch):
    fake_steps(tmp_path, cuda=True, monkeypatch=monkeypatch)
    steps = [Step("device", "stand-in device", 20, "fake_steps.device"),
             Step("a_sleep", "would sleep 60 s", 100, "fake_steps.sleep"),
             Step("b_ok", "no time left for it", 20, "fake_steps.ok")]
    out = tmp_path / "out"
    rc = run_check(out, dry_run=False, wheel_dir=tmp_path / "no_wheels", steps=steps, total_budget_s=7)
    by = {s["name"]: s for s in results(out)["steps"]}
    assert rc == 1 and by["a_sleep"]["status"] == "timeout" and by["a_sleep"]["budget_s"] <= 7
    assert by["a_sleep"]["seconds"] < 12
    assert by["b_ok"]["status"] == "skipped" and by["b_ok"]["why"] == "no time left in the 7 s budget"


def test_targets_take_the_worst_big_shape_and_ignore_small_ones():
    def shape(T, triton, gemm, permute, combine, ds=None, mixtral=None):
        s = {"T": T, "rows": {"triton": {"ratio_median_pairs": triton}}, "grouped_gemm_vs_dense": gemm,
             "permute_vs_peak": permute, "combine_vs_peak": combine, "triton_over_mixtral": mixtral}
        return {**s, "triton_over_deepspeed": ds} if ds is not None else s

    layer = {"shapes": {"a": shape(16384, 1.10, 0.90, 0.80, 0.75, ds=0.5, mixtral=0.3),
                        "b": shape(16384, 1.20, 0.86, 0.60, 0.71, mixtral=0.4),
                        "small": shape(4096, 9.0, 0.1, 0.1, 0.1, ds=2.0, mixtral=2.0)}}
    steps = {"e_layer_bench": {"status": "ok", "numbers": layer},
             "f_train_twins": {"status": "ok", "numbers": {"moe_vs_dense_tokens_per_s": 0.9,
                                                           "checks": {"no_host_sync": {"ok": False, "detail": "x"}}}},
             "d_kernel_bench": {"status": "ok", "numbers": {"table": {"interpreted": False, "rows": [
                 {"kernel": "up", "pct_dense": 91.0}, {"kernel": "down", "pct_dense": 78.0},
                 {"kernel": "segment sum", "pct_dense": None}]}}},
             "a_probe": {"status": "failed", "numbers": {"checks": {"k2_accuracy": {"ok": True, "detail": "y"}}}},
             "g_large_shape": {"status": "skipped", "numbers": {"checks": {"int32_overflow": {"ok": True}}}}}
    t = {x["name"]: x for x in evaluate(steps)}
    assert (t["triton_vs_dense"]["value"], t["triton_vs_dense"]["status"]) == (1.20, "missed")
    assert (t["grouped_gemm_vs_dense"]["value"], t["grouped_gemm_vs_dense"]["status"]) == (0.86, "met")
    assert (t["kernel_gemms_vs_dense"]["value"], t["kernel_gemms_vs_dense"]["status"]) == (0.78, "missed")
    assert (t["permute_bandwidth"]["value"], t["permute_bandwidth"]["status"]) == (0.60, "missed")
    assert (t["combine_bandwidth"]["value"], t["combine_bandwidth"]["status"]) == (0.71, "met")
    assert (t["triton_vs_deepspeed"]["value"], t["triton_vs_deepspeed"]["status"]) == (0.5, "met")
    assert (t["triton_vs_mixtral"]["value"], t["triton_vs_mixtral"]["status"]) == (0.4, "met")
    assert (t["twin_tokens_per_s"]["value"], t["twin_tokens_per_s"]["status"]) == (0.9, "met")
    assert t["dropless_step_no_sync"]["status"] == "missed" and t["probe_k2_accuracy"]["status"] == "met"
    assert t["probe_k8_bitwise"]["status"] == "unmeasured"  # never reached
    assert t["int32_overflow"]["status"] == "unmeasured"  # its step was skipped: nothing is trusted from it
    assert t["probe_split_k"]["status"] == "unmeasured" and t["tma_variants_use_tma"]["status"] == "unmeasured"
    checks = {f"k{k}_{v}_{c}": {"ok": (k, v, c) != (8, "tma", "bitwise"), "detail": ""}
              for k in (2, 8) for v in ("split_k", "persistent", "tma") for c in ("accuracy", "bitwise")}
    t = {x["name"]: x for x in evaluate({"a_probe": {"status": "failed", "numbers": {"checks": checks}}})}
    assert [(t[f"probe_{v}"]["status"], t[f"probe_{v}"]["value"]) for v in ("split_k", "persistent", "tma")] == [
        ("met", 1.0), ("met", 1.0), ("missed", 0.75)]
    assert t["probe_tma"]["how"] == "missed: k8_tma_bitwise"
    dry = {"a_probe": {"status": "ok", "numbers": {"dry_run": True, "checks": checks}}}
    assert {x["status"] for x in evaluate(dry) if x["from"] == "a_probe"} == {"unmeasured"}  # plumbing only


def run_dry(tmp_path: Path, only: str) -> tuple[int, dict, str]:
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the runner sets it per step
    done = subprocess.run([sys.executable, "-m", "experiments.gpu_check", "--dry-run", "--out", str(out),
                           "--wheels", str(tmp_path / "no_wheels"), "--only", only],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    return done.returncode, results(out), done.stdout[-4000:] + done.stderr[-4000:]


def test_dry_run_of_real_steps_on_cpu(tmp_path):
    """The cheap real steps: the device report, the gpu-marked tests (skipped without CUDA), the compiled-kernel
    reading (a control kernel compiled for sm_90 without a GPU) and the layer benchmark at a tiny shape."""
    rc, r, tail = run_dry(tmp_path, "b_gpu_tests,c_kernel_info,d_wgrad_sweep,e_layer_bench")
    assert rc == 0, tail
    by = {s["name"]: s for s in r["steps"]}
    assert list(by) == ["wheels"] + [s.name for s in STEPS]
    assert by["device"]["status"] == "ok" and r["device"]["cuda"] is False and r["device"]["torch"]
    assert by["b_gpu_tests"]["status"] == "ok"
    assert by["b_gpu_tests"]["numbers"]["outcomes"]["skipped"] >= 7  # every real-size test skips cleanly
    assert by["c_kernel_info"]["status"] in ("ok", "skipped")  # skipped: a triton build without its NVIDIA backend
    if by["c_kernel_info"]["status"] == "ok":
        control = by["c_kernel_info"]["numbers"]["control_dot_128x128x64_8warps"]
        assert control["wgmma"] is True and control["dot"] is True and control["num_warps"] == 8
        assert (control["descriptors"], control["tile_table"], control["split_rows"]) == ([], False, 0)
    layer = by["e_layer_bench"]["numbers"]
    assert by["e_layer_bench"]["status"] == "ok" and layer["dry_run"] is True
    (shape,) = layer["shapes"].values()
    assert shape["T"] == 64 and "triton" not in shape["rows"] and shape["rows"]["dense FFN (hidden k*f)"]["ratio_min"] == 1
    wgrad = by["d_wgrad_sweep"]
    assert wgrad["status"] == "ok" and Path(wgrad["numbers"]["table_file"]) == tmp_path / "out" / "tuned_wgrad_hot.json"
    assert "--hot 0.3" in wgrad["numbers"]["command"]
    assert sorted(e["kernel"] for e in wgrad["numbers"]["table"]["entries"]) == ["wgrad_down", "wgrad_up_glu"]
    assert by["a_probe"]["status"] == "skipped" and by["a_probe"]["why"].startswith("not selected")
    names = {t["name"] for t in r["targets"]}
    assert {"probe_split_k", "probe_persistent", "probe_tma", "tma_variants_use_tma"} <= names
    assert {t["status"] for t in r["targets"]} == {"unmeasured"}  # a dry run measures no target
    assert r["summary"]["failed"] == r["summary"]["timeout"] == 0


@pytest.mark.slow
def test_dry_run_of_the_kernel_steps_under_the_interpreter(tmp_path):
    """The probe (both k, twice, bitwise), the twins' training loop and the large-shape / overflow plumbing."""
    rc, r, tail = run_dry(tmp_path, "a_probe,f_train_twins,g_large_shape")
    assert rc == 0, tail
    by = {s["name"]: s for s in r["steps"]}
    assert [by[n]["status"] for n in ("a_probe", "f_train_twins", "g_large_shape")] == ["ok"] * 3, tail
    probe = by["a_probe"]["numbers"]
    assert probe["k2_plan"]["empty_experts"] == 2 and abs(probe["k8_plan"]["heavy_share"] - 0.3) < 0.01
    assert all(c["ok"] for c in probe["checks"].values()) and len(probe["checks"]) == 4 * (1 + 3)
    assert {t["status"] for t in r["targets"]} == {"unmeasured"}  # a dry run measures no target
    assert max(probe["k8_rel_err_triton"].values()) < 2e-2
    assert probe["variants"] == ["split_k", "persistent", "tma"]
    for k in (2, 8):
        v = probe[f"k{k}_variants"]
        assert set(v) == set(probe["variants"]) and all(x["accuracy_ok"] and x["bitwise_ok"] for x in v.values())
        assert all(x["max_rel_err"] == max(x["rel_err"].values()) < 2e-2 for x in v.values())
        assert v["split_k"]["busiest_expert_chunks"] >= 2  # the split cuts the heavy expert
        assert v["persistent"]["programs"] == 3 and v["tma"]["uses_tma"] is True  # the interpreter's
    train = by["f_train_twins"]["numbers"]
    assert train["dense_steps"] == train["moe_e8_k2_steps"] == 2 and train["tokens_per_step"] == 64
    flops = train["moe_e8_k2_training_flops_per_token"] / train["dense_training_flops_per_token"]
    assert abs(flops - 1) < 0.01  # the FLOP-matched twin
    assert by["g_large_shape"]["numbers"]["overflow_size"]["overflow_reached"] is False


def test_kernel_info_finds_each_compiled_kernel_once_and_reads_its_resources(monkeypatch):
    """The walk over moe.kernels' modules and the reading of one compiled kernel, with stand-ins for triton's
    JITFunction (device_caches), an autotuner around it (.fn) and a CompiledKernel (metadata, asm, n_regs)."""
    import types

    from experiments.gpu_check.kernel_info import compiled_kernels, describe

    def gemm_kernel():  # the Python function a JITFunction wraps; its module names the kernel's home
        pass

    gemm_kernel.__module__ = "moe.kernels.fake_gemm"
    md = types.SimpleNamespace(name="gemm_kernel", num_warps=8, num_stages=4, shared=98304, arch="sm90")
    compiled = types.SimpleNamespace(
        metadata=md, src=types.SimpleNamespace(signature={"a_ptr": "*bf16", "n": "i32"}), n_regs=168, n_spills=0,
        asm={"ptx": "wgmma.mma_async.sync.aligned ... cp.async.cg.shared.global ...", "ttgir": "ttng.warp_group_dot"})

    class FakeJIT:
        __name__ = "gemm_kernel"
        fn = gemm_kernel
        device_caches = {0: ({"key": compiled}, {}, "target", "backend", "binder")}  # triton 3.x's layout

        def run(self):
            pass

    jit = FakeJIT()
    home = types.ModuleType("moe.kernels.fake_gemm")
    home.gemm_kernel, home.tuned = jit, types.SimpleNamespace(fn=jit)  # an autotuner wraps it
    user = types.ModuleType("moe.kernels.fake_user")
    user.gemm_kernel = jit  # imported from its home: the same kernel
    monkeypatch.setitem(sys.modules, "moe.kernels.fake_gemm", home)
    monkeypatch.setitem(sys.modules, "moe.kernels.fake_user", user)
    found = {n: ks for n, ks in compiled_kernels().items() if "fake" in n}
    assert found == {"fake_gemm.gemm_kernel": [compiled]}
    info = describe(compiled)
    assert (info["registers"], info["spills"], info["shared_bytes"], info["num_warps"]) == (168, 0, 98304, 8)
    assert info["operands"] == "bf16" and info["dot"] and info["wgmma"] and info["cp_async"] and not info["tma"]
    assert info["from"] == "driver (loaded binary)"
    assert (info["descriptors"], info["tile_table"], info["split_rows"]) == ([], False, 0)


def test_kernel_info_labels_the_variants_from_their_arguments():
    """TMA descriptor arguments, a tile-table pointer and the split-K constexpr, as triton 3.x records them
    (signature types by name; constexprs keyed by argument-index paths)."""
    import types

    from experiments.gpu_check.kernel_info import _constexprs, variant_of

    fn = types.SimpleNamespace(arg_names=["a_ptr", "b1_ptr", "tiles_ptr", "SPLIT_ROWS", "BLOCK_R"])
    src = types.SimpleNamespace(fn=fn, constants={(3,): 256, (4,): 64})
    sig = {"a_ptr": "*bf16", "b1_ptr": "tensordesc<bf16[64, 128]>", "tiles_ptr": "*i64", "SPLIT_ROWS": "constexpr",
           "BLOCK_R": "constexpr"}
    assert _constexprs(src) == {"SPLIT_ROWS": 256, "BLOCK_R": 64}
    assert variant_of(sig, _constexprs(src)) == {"descriptors": ["b1_ptr"], "tile_table": True, "split_rows": 256}
    plain = {**sig, "b1_ptr": "*bf16", "tiles_ptr": "constexpr"}  # tiles_ptr None: specialised away
    assert variant_of(plain, {"SPLIT_ROWS": 0}) == {"descriptors": [], "tile_table": False, "split_rows": 0}
