"""What a person reads while a run trains (experiments.run_log) and what a step costs the host: one plain line per
record on the console and in train.log, no progress bar off a terminal, throughput in the records, dependency
chatter quiet on ranks other than 0, and no host read in a training step outside the steps that are recorded."""
from __future__ import annotations

import logging
import math
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch

from experiments.engines import ranks as ranks_mod
from experiments.metrics import flatten_stats, read_metrics
from experiments.peak_flops import peak_flops, peak_for_name
from experiments.run_log import LOG_FILE, RunLog, clock, record_line, si
from experiments.trainer import Trainer
from routing.stats import routing_stats
from tests.experiments.test_train import make_run

REPO = Path(__file__).resolve().parents[2]
STEP_LINE = re.compile(r"^step (\d+)/(\d+) \| loss ")


def _step_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if STEP_LINE.match(line)]


# ------------------------------------------------------------------------------------------ formatting


def test_record_line_reads_every_field():
    record = {"step": 20, "train_loss": 3.14159, "val_loss": 3.0, "lr": 3e-4, "tokens_per_s": 12345.6,
              "grad_norm": 0.8123, "moe/layer0/max_load": 1.2, "moe/layer1/max_load": 1.75,
              "flops_per_s": 2.34e10, "mfu": 0.123, "skipped_steps": 0}
    assert record_line(record, 40, 41.4, 40.6) == (
        "step 20/40 | loss 3.1416 | val loss 3.0000 | lr 3.00e-04 | 12,346 tok/s | grad norm 0.812 | max load 1.75 | "
        "23.4 GFLOP/s | MFU 12.3% | elapsed 0:00:41, eta 0:00:41")


def test_record_line_of_a_skipped_step_and_of_the_step_0_evaluation():
    record = {"step": 3, "train_loss": math.nan, "lr": 1e-3, "tokens_per_s": 10.0, "grad_norm": math.inf,
              "flops_per_s": 5.0, "skipped_steps": 2}
    assert record_line(record, 9, 3725, None) == (
        "step 3/9 | loss nan | lr 1.00e-03 | 10 tok/s | grad norm inf | 5 FLOP/s | skipped 2 | elapsed 1:02:05")
    assert record_line({"step": 0, "val_loss": 5.5}, 9, 0.0, None) == "step 0/9 | val loss 5.5000 | elapsed 0:00:00"
    assert si(1.234e15) == "1.23 P" and si(999.0) == "999 " and clock(59.6) == "0:01:00"


# ------------------------------------------------------------------------------------------ the handlers


def test_train_log_is_written_once_beside_a_root_handler_on_the_same_file(tmp_path, capsys):
    """Hydra's job logging puts a FileHandler for RUN_DIR/train.log on the root logger: RunLog's lines must not go
    through it as well (a private logger that does not propagate)."""
    root_handler = logging.FileHandler(tmp_path / LOG_FILE, mode="a")
    root = logging.getLogger()
    root.addHandler(root_handler)
    old_level = root.level
    root.setLevel(logging.INFO)
    try:
        log = RunLog(tmp_path, enabled=True)
        log.info("a line for both")
        log.file_only("a line for the file")
        log.close()
        log.info("after close the file opens again")
        log.close()
    finally:
        root.removeHandler(root_handler)
        root_handler.close()
        root.setLevel(old_level)
    assert (tmp_path / LOG_FILE).read_text().splitlines() == [
        "a line for both", "a line for the file", "after close the file opens again"]
    assert capsys.readouterr().out.splitlines() == ["a line for both", "after close the file opens again"]


def test_other_ranks_write_nothing(tmp_path, capsys):
    log = RunLog(tmp_path, enabled=False)
    log.info("rank 1 says")
    log.file_only("rank 1 files")
    log.close()
    assert not (tmp_path / LOG_FILE).exists() and capsys.readouterr().out == ""


@pytest.mark.parametrize("tty", [False, True])
def test_the_bar_only_on_a_terminal(tmp_path, monkeypatch, tty):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: tty, raising=False)
    log = RunLog(tmp_path, enabled=True)
    log.start_bar(True, 10, 0)
    assert (log.bar is not None) == tty
    log.close()
    log.start_bar(False, 10, 0)
    assert log.bar is None


def test_no_bar_in_a_sweep_even_on_a_terminal(tmp_path, monkeypatch):
    from experiments import run_log

    assert not run_log.in_sweep()  # no Hydra job here
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    monkeypatch.setattr(run_log, "in_sweep", lambda: True)
    log = RunLog(tmp_path, enabled=True)
    log.start_bar(True, 10, 0)
    assert log.bar is None


# ------------------------------------------------------------------------------------------ a run


def test_a_redirected_run_prints_one_plain_line_per_record_and_train_log_holds_them(tmp_path, text_corpus, capsys):
    """stdout is not a terminal under pytest's capture, as under Slurm or nohup: no bar, no carriage return."""
    run = make_run(tmp_path / "run", text_corpus, "trainer.max_steps=6", "trainer.log_interval=2",
                   "trainer.eval_interval=4", "trainer.eval_at_start=true", "trainer.progress=true")
    summary = Trainer(run).fit()
    captured = capsys.readouterr()
    assert "\r" not in captured.out and "\r" not in captured.err
    lines = _step_lines(captured.out)
    assert [int(STEP_LINE.match(line).group(1)) for line in lines] == [2, 4, 6]
    assert "val loss" in lines[1] and "val loss" in lines[2] and "val loss" not in lines[0]
    assert "max load" in lines[0] and "FLOP/s" in lines[0] and "eta" in lines[0]
    log = (tmp_path / "run" / LOG_FILE).read_text()
    log_lines = log.splitlines()
    for line in lines:
        assert log_lines.count(line) == 1  # written once
    assert "step 0/6 | val loss" in log
    assert f"final validation loss {summary['final_val_loss']:.4f} nats" in log
    assert "routing at step 6" in log and "layer 0: max/mean load" in log
    records = read_metrics(tmp_path / "run")
    assert f"val loss {records[-1]['val_loss']:.4f}" in lines[-1]


def test_flop_rate_is_flops_per_token_times_tokens_per_second(tmp_path, text_corpus):
    t = Trainer(make_run(tmp_path / "run", text_corpus, "trainer.max_steps=2"))
    assert t.peak_flops is None  # CPU: no peak to measure against, so no MFU
    t.fit()
    for record in read_metrics(tmp_path / "run"):
        assert record["flops_per_s"] == t.flops_per_token * record["tokens_per_s"] > 0
        assert "mfu" not in record
    t = Trainer(make_run(tmp_path / "gpu", text_corpus, "trainer.max_steps=2"))
    t.peak_flops = 1e9  # as peak_flops gives on a GPU of the table
    t.fit()
    log = (tmp_path / "gpu" / LOG_FILE).read_text()
    for record in read_metrics(tmp_path / "gpu"):
        assert record["mfu"] == record["flops_per_s"] / 1e9 and f"MFU {record['mfu']:.1%}" in log


def test_peak_table_matches_the_specific_part_first():
    assert peak_for_name("NVIDIA H100 80GB HBM3", bf16=True) == 989e12
    assert peak_for_name("NVIDIA H100 PCIe", bf16=True) == 756e12
    assert peak_for_name("NVIDIA H200", bf16=False) == 494e12
    assert peak_for_name("NVIDIA A100-SXM4-80GB", bf16=False) == 156e12
    assert peak_for_name("NVIDIA A10G", bf16=True) == 70e12 and peak_for_name("NVIDIA L40", bf16=True) == 181e12
    assert peak_for_name("Tesla T4", bf16=True) is None and peak_flops(torch.device("cpu"), True) is None


def test_flattened_statistics_read_in_one_transfer_equal_value_by_value():
    g = torch.Generator().manual_seed(0)
    stats = {}
    for layer, E in ((0, 8), (2, 1), (5, 16)):
        probs = torch.rand(50, E, generator=g).softmax(-1)
        stats[layer] = routing_stats(probs, torch.randint(0, 30, (E,), generator=g), torch.rand(50, 2, generator=g) > 0.2)
    flat = flatten_stats(stats)
    expected = {}
    for layer, values in stats.items():  # the per-value reads flatten_stats made before
        for name, value in values.items():
            v = value.detach().float().cpu()
            expected[f"moe/layer{layer}/{name}"] = v.tolist() if v.numel() > 1 else round(float(v), 6)
    assert flat == expected and list(flat) == list(expected) and flatten_stats({}) == {}


# ------------------------------------------------------------------------------------------ host reads


SYNCS = ("item", "tolist", "cpu", "numpy", "__int__", "__float__", "__bool__", "__index__")
# The host data pipeline draws its window starts with a CPU generator and numpy: host tensors by design, never
# the model's device.
HOST_SIDE = (str(REPO / "experiments" / "data.py"),)


def _trap_host_reads(monkeypatch, trainer: Trainer, only_from: tuple[str, ...] = ()):
    """Records every Tensor read on the host (SYNCS) made during a step that is not recorded, from the start of
    its _timed_step to the start of the next (the loop's own bookkeeping included), except inside engine.step:
    the gradient norm's one read per step decides whether to skip the update (Trainer.device_step). only_from:
    record only calls made from files under these folders. Returns (the calls, the steps trapped)."""
    calls: list[str] = []
    trapped: list[int] = []
    state = {"on": False}
    for name in SYNCS:
        original = getattr(torch.Tensor, name)

        def patched(self, *args, _name=name, _original=original, **kwargs):
            if state["on"]:
                frame = sys._getframe(1)
                where = frame.f_code.co_filename
                if where not in HOST_SIDE and (not only_from or where.startswith(only_from)):
                    calls.append(f"Tensor.{_name} from {where}:{frame.f_lineno}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, patched)
    timed, step = trainer._timed_step, trainer.engine.step

    def timed_step(reads_after: bool = True):
        state["on"] = not reads_after
        if state["on"]:
            trapped.append(trainer.state.step + 1)
        return timed(reads_after)

    def engine_step(*args, **kwargs):
        on, state["on"] = state["on"], False
        try:
            return step(*args, **kwargs)
        finally:
            state["on"] = on

    monkeypatch.setattr(trainer, "_timed_step", timed_step)
    monkeypatch.setattr(trainer.engine, "step", engine_step)
    return calls, trapped


def test_a_dense_step_reads_nothing_on_the_host_outside_recorded_steps(tmp_path, text_corpus, monkeypatch):
    t = Trainer(make_run(tmp_path / "run", text_corpus, "trainer.max_steps=6", "trainer.log_interval=3",
                         "trainer.grad_accum=2", model="tiny_dense"))
    calls, trapped = _trap_host_reads(monkeypatch, t)
    t.fit()
    assert trapped == [1, 2, 4, 5] and calls == []


def test_the_trainer_side_of_an_moe_step_reads_nothing_on_the_host(tmp_path, text_corpus, monkeypatch):
    """The loop, the losses, the routing statistics and the collapse monitor (experiments/, routing/stats.py);
    the MoE layer's own dispatch (moe/) is the model's business and not trapped here."""
    t = Trainer(make_run(tmp_path / "run", text_corpus, "trainer.max_steps=6", "trainer.log_interval=3",
                         "model.moe.router.aux_loss_coef=0.01", "model.moe.router.z_loss_coef=0.001"))
    calls, trapped = _trap_host_reads(monkeypatch, t, only_from=(str(REPO / "experiments"),
                                                                 str(REPO / "routing" / "stats.py")))
    t.fit()
    assert trapped == [1, 2, 4, 5] and calls == []


def test_records_equal_the_per_step_values_read_the_old_way(tmp_path, text_corpus, monkeypatch):
    """train_loss is the mean of the steps' losses summed as Python floats (what the trainer did when it read
    every micro-batch's loss with .item()), the aux losses the recorded step's; equal to the last bit."""
    t = Trainer(make_run(tmp_path / "run", text_corpus, "trainer.max_steps=6", "trainer.log_interval=3",
                         "trainer.grad_accum=2", "model.moe.router.z_loss_coef=0.001"))
    per_step: list[tuple[float, dict[str, float]]] = []
    micro: list[tuple[float, dict[str, float]]] = []  # each micro-batch's loss and aux losses, read with .item()
    forward = t.engine.train_micro

    def train_micro(*args, **kwargs):
        out = forward(*args, **kwargs)
        micro.append((out.loss.item(), {k: v.item() for k, v in out.aux_losses.items()}))
        return out

    device_step = t.device_step

    def recording_step():
        out = device_step()
        lm, aux = 0.0, {}
        for loss, aux_losses in micro[-2:]:  # the old train_step's arithmetic
            lm += loss / 2
            for k, v in aux_losses.items():
                aux[k] = aux.get(k, 0.0) + v / 2
        per_step.append((lm, aux))
        return out

    monkeypatch.setattr(t.engine, "train_micro", train_micro)
    monkeypatch.setattr(t, "device_step", recording_step)
    t.fit()
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [3, 6]
    for record, window in zip(records, (per_step[:3], per_step[3:])):
        total = 0.0
        for lm, _ in window:
            total += lm
        assert record["train_loss"] == total / 3
        assert {k: record[k] for k in window[-1][1]} == window[-1][1] and window[-1][1]


# ------------------------------------------------------------------------------------------ other ranks


@pytest.fixture
def restore_dependency_loggers():
    saved = {name: (logging.getLogger(name).level, list(logging.getLogger(name).filters))
             for name in ranks_mod.DEPENDENCY_LOGGERS}
    yield
    for name, (level, filters) in saved.items():
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.filters[:] = filters


def _passes(name: str, level: int) -> bool:
    logger = logging.getLogger(name)
    record = logger.makeRecord(name, level, __file__, 0, "m", (), None)
    return logger.isEnabledFor(level) and bool(logger.filter(record))


def test_rank_0_keeps_warnings_and_drops_deepspeed_info(restore_dependency_loggers):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ranks_mod.quiet_dependencies(0)
        warnings.warn("deprecated", FutureWarning)
    assert len(caught) == 1
    logging.getLogger("DeepSpeed").setLevel(logging.INFO)  # as DeepSpeed's logger factory does on import
    assert not _passes("DeepSpeed", logging.INFO) and _passes("DeepSpeed", logging.WARNING)
    ranks_mod.quiet_dependencies(0)  # idempotent: one filter, not two
    assert sum(isinstance(f, ranks_mod._AtLeast) for f in logging.getLogger("DeepSpeed").filters) == 1


def test_other_ranks_drop_warnings_and_dependency_chatter(restore_dependency_loggers, monkeypatch):
    monkeypatch.setenv("RANK", "3")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ranks_mod.quiet_dependencies()  # the launcher's RANK
        warnings.warn("deprecated", FutureWarning)
        warnings.warn("accelerator", UserWarning)
    assert caught == []
    logging.getLogger("DeepSpeed").setLevel(logging.INFO)
    assert not _passes("DeepSpeed", logging.WARNING) and _passes("DeepSpeed", logging.ERROR)
    assert not logging.getLogger("torch.distributed.elastic").isEnabledFor(logging.WARNING)
    assert not logging.getLogger("compilers.C.base").isEnabledFor(logging.WARNING)


def test_rank_0_drops_the_compiler_probes_info(restore_dependency_loggers):
    ranks_mod.quiet_dependencies(0)
    probe = logging.getLogger("compilers.C.base")  # DeepSpeed's op-compatibility probes log each gcc call here
    assert not probe.isEnabledFor(logging.INFO) and probe.isEnabledFor(logging.WARNING)


# ------------------------------------------------------------------------------------------ set-up lines


def test_deepspeed_says_it_will_compile_its_cpu_op_once(tmp_path, monkeypatch, capsys):
    from experiments.engines import deepspeed_ops

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("RANK", "0")
    cpu = torch.device("cpu")
    assert deepspeed_ops.ops_to_build(cpu) == ["deepspeed_shm_comm"]
    assert deepspeed_ops.announce_build("deepspeed", "cpu") and not deepspeed_ops.announce_build("ddp", "cpu")
    assert capsys.readouterr().out == (f"DeepSpeed compiles its deepspeed_shm_comm op on first use (can take minutes; "
                                       f"cached in {deepspeed_ops.extensions_dir()})\n")
    monkeypatch.setenv("RANK", "1")
    assert not deepspeed_ops.announce_build("deepspeed", "cpu")  # rank 0 says it
    built = deepspeed_ops.extensions_dir() / "deepspeed_shm_comm"
    built.mkdir(parents=True)
    (built / "deepspeed_shm_comm.so").write_bytes(b"")
    assert deepspeed_ops.ops_to_build(cpu) == [] and deepspeed_ops.build_notice(cpu) is None
    assert deepspeed_ops.ops_to_build(torch.device("cuda")) == []


def test_training_a_bpe_tokenizer_says_so_before_and_after(tmp_path, capsys):
    from experiments.tokenizer import build_tokenizer

    texts = ["the cat sat on the mat " * 20, "a dog ate the log " * 20]
    build_tokenizer("bpe", texts, 300, tmp_path)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("training a BPE tokenizer of vocabulary 300 on 2 documents (")
    assert "first use, cached in" in lines[0] and re.fullmatch(r"trained the BPE tokenizer in \d+\.\d s", lines[1])
    build_tokenizer("bpe", texts, 300, tmp_path)  # cached: silent
    assert capsys.readouterr().out == ""


def test_tokenizing_a_corpus_says_so_before_and_after(tmp_path, text_corpus, capsys):
    from experiments.data import prepare
    from experiments.data_config import DataConfig

    cfg = DataConfig(source="text", path=str(text_corpus), tokenizer="byte", cache_dir=str(tmp_path))
    data = prepare(cfg)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("tokenizing ") and "with the byte tokenizer into" in lines[0]
    assert lines[1].startswith(f"tokenized into {len(data.train):,} train / {len(data.val):,} val tokens in ")
    prepare(cfg)  # cached: silent
    assert capsys.readouterr().out == ""


def test_only_rank_0_prints_while_the_engine_is_built(capsys):
    with ranks_mod.rank_0_prints(1):
        print("DeepSpeed op built successfully")
    with ranks_mod.rank_0_prints(0):
        print("rank 0 says")
    assert capsys.readouterr().out == "rank 0 says\n"
