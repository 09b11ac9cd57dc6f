"""run.json's provenance (experiments/provenance.py) and the sweep folder names (experiments/run_names.py): every
field present and typed, nothing fails outside git, the start's record kept at the end; names from the swept keys
only, path-safe, bounded in length."""
from __future__ import annotations

import datetime as dt
import json
import os
import socket

from experiments import provenance
from experiments.provenance import PROVENANCE_KEY, run_provenance, snapshot
from experiments.run_names import MAX_NAME, name_from, run_name, swept_values


def test_snapshot_fields_are_present_and_typed():
    p = snapshot()
    assert set(p) == {"started_at", "ended_at", "launcher", "host", "cpu", "gpus", "load_at_start", "load_at_end",
                      "git", "versions", "overrides", "pid"}
    assert dt.datetime.fromisoformat(p["started_at"]).tzinfo is not None and p["ended_at"] is None
    assert p["host"] == socket.gethostname() and p["pid"] == os.getpid()
    assert p["launcher"]["kind"] == "plain" and p["launcher"]["hydra_launcher"] is None  # pytest is no launcher
    assert isinstance(p["launcher"]["world_size"], int)
    cpu = p["cpu"]
    assert isinstance(cpu["model"], str) and cpu["count"] == os.cpu_count() and 1 <= cpu["usable"] <= cpu["count"]
    assert isinstance(p["gpus"], list) and all(isinstance(g, str) for g in p["gpus"])
    assert len(p["load_at_start"]) == 3 and all(isinstance(x, float) for x in p["load_at_start"])
    assert set(p["versions"]) == {"python", "torch", "triton", "deepspeed", "transformers", "numpy", "hydra-core"}
    import torch

    assert p["versions"]["torch"] == torch.__version__ and p["versions"]["python"].count(".") == 2
    assert len(p["git"]["commit"]) == 40 and isinstance(p["git"]["dirty"], bool)  # the tests run in the checkout
    assert isinstance(p["overrides"], list)
    json.dumps(p)  # plain JSON


def test_outside_git_records_none(tmp_path, monkeypatch):
    monkeypatch.setattr(provenance, "REPO_ROOT", tmp_path)  # not a checkout
    assert provenance.git_state() == {"commit": None, "dirty": None}
    monkeypatch.setenv("PATH", str(tmp_path))  # no git at all
    assert provenance.git_state() == {"commit": None, "dirty": None}


def test_torchrun_is_named(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    launcher = provenance.launcher()
    assert launcher["kind"] == "torchrun" and launcher["world_size"] == 4 and launcher["slurm_job_id"] == "77"


def test_the_end_keeps_the_start(tmp_path):
    start = run_provenance(tmp_path, "running")
    (tmp_path / "run.json").write_text(json.dumps({"status": "running", PROVENANCE_KEY: start}))
    end = run_provenance(tmp_path, "finished")
    assert end["started_at"] == start["started_at"] and end["load_at_start"] == start["load_at_start"]
    assert end["ended_at"] >= start["started_at"] and len(end["load_at_end"]) == 3
    (tmp_path / "run.json").write_text(json.dumps({PROVENANCE_KEY: {**start, "pid": -1}}))  # another process's
    other = run_provenance(tmp_path, "failed")
    assert other["started_at"] is None and other["ended_at"] is not None  # a rank that never wrote the start


# ------------------------------------------------------------------------------------------ folder names


def test_names_come_from_the_swept_keys_only():
    job = ["routing=switch", "model=tiny_moe", "trainer.max_steps=6", "data.path=/data/x.txt", "+extra=1"]
    swept = {"routing": ["topk", "switch"], "trainer.max_steps": ["6", "12"]}
    assert name_from(job, swept, "whatever", 3) == "routing=switch,trainer.max_steps=6"  # command-line order
    assert name_from(job, {}, "whatever", 3) == "3"  # nothing swept: the job number
    assert name_from(job, None, "data.path=/x,routing=switch", 3) == "data.path=_x,routing=switch"  # fallback
    assert run_name() == "(per job: run_name)"  # outside a Hydra job (`--cfg hydra --resolve`) it does not fail


def test_path_values_are_made_path_safe():
    job = ["init_from=/runs/a/init/upcycled"]
    assert name_from(job, {"init_from": ["/runs/a/init/dense", "/runs/a/init/upcycled"]}, "", 0) == "init_from=upcycled"
    same = {"init_from": ["/runs/a/step_6", "/runs/b/step_6"]}  # last components collide: keep the whole path
    assert name_from(["init_from=/runs/b/step_6"], same, "", 0) == "init_from=runs_b_step_6"


def test_long_names_are_cut_with_a_hash():
    job = [f"model.n_layer={'9' * 200}"]
    name = name_from(job, {"model.n_layer": None}, "", 0)
    other = name_from([f"model.n_layer={'9' * 199}8"], {"model.n_layer": None}, "", 0)
    assert len(name.encode()) <= MAX_NAME and name.startswith("model.n_layer=999") and name != other


def test_swept_values_read_multirun_yaml_and_sweeper_params(tmp_path):
    assert swept_values(tmp_path, None) is None
    (tmp_path / "multirun.yaml").write_text("hydra:\n  overrides:\n    task:\n    - routing=topk,switch\n"
                                            "    - trainer.max_steps=6\n")
    assert swept_values(tmp_path, {"twin": "dense,moe_e8_k2", "optim.lr": "tag(log, interval(3e-4, 3e-2))"}) == \
        {"routing": ["topk", "switch"], "twin": ["dense", "moe_e8_k2"], "optim.lr": None}


def test_no_load_average_is_none(monkeypatch):
    def fail():
        raise OSError("no load average here")

    monkeypatch.setattr(os, "getloadavg", fail)
    assert provenance.load_average() is None
