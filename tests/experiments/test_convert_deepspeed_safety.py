"""experiments.convert_deepspeed never unpickles code: a DeepSpeed-style checkpoint whose files carry a pickle
payload is refused, naming the file and the globals it needs, before the payload runs; expert shard files are read as
safetensors only; the few DeepSpeed objects of real checkpoints come back as plain values. (Converting real engine
checkpoints: tests/distributed/test_deepspeed.py.)"""
from __future__ import annotations

import pathlib
import pickle

import pytest
import torch
from safetensors.torch import save_file

from experiments.convert_deepspeed import MODEL_STATES, convert, load_deepspeed_file, main
from experiments.engines.deepspeed import EXPERT_SHARD_FILE, EXPERT_SHARD_META
from moe.config import ModelConfig

REFUSED = r"needs arbitrary unpickling \(globals? .+\), which Switchyard refuses because unpickling it can run code"


class Payload:
    """Unpickling this touches `marker`: what a malicious checkpoint would do with os.system instead."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def model_states(dtype=torch.float32, **extra) -> dict:
    """What DeepSpeed's save_checkpoint writes for trainer=deepspeed, reduced to what the converter reads."""
    cfg = ModelConfig(vocab_size=32, n_layer=1, d_model=16, n_head=2, d_ff=32, max_seq_len=16)
    return {"module": {"model.embed.weight": torch.zeros(32, 16, dtype=dtype)}, "param_shapes": [],
            "ds_config": {"train_batch_size": 4}, "ds_version": "0.19.8",
            "switchyard": {"model": cfg.to_dict(), "expert_parallel": 1, "step": 1}, **extra}


@pytest.fixture
def marker(tmp_path):
    return tmp_path / "payload_ran"


def test_the_payload_is_live(tmp_path, marker):
    """The payload below does run when unpickled: the refusals test something."""
    pickle.loads(pickle.dumps({"x": Payload(marker)}))
    assert marker.exists()


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy_format"])
def test_payload_in_model_states_is_refused(tmp_path, marker, zipfile):
    tag = tmp_path / "ds" / "step_1"
    tag.mkdir(parents=True)
    torch.save(model_states(ds_config=Payload(marker)), tag / MODEL_STATES, _use_new_zipfile_serialization=zipfile)
    with pytest.raises(ValueError, match=rf"{MODEL_STATES} {REFUSED}") as e:
        convert(tag, tmp_path / "out")
    assert "getattr" in str(e.value)  # the global the payload needs is named (pathlib.Path.touch pickles through it)
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_command_line_refuses_the_payload(tmp_path, marker, capsys):
    (tmp_path / "ds" / "step_1").mkdir(parents=True)
    (tmp_path / "ds" / "latest").write_text("step_1")
    torch.save(model_states(evil=Payload(marker)), tmp_path / "ds" / "step_1" / MODEL_STATES)
    assert main([str(tmp_path / "ds"), str(tmp_path / "out")]) == 2
    assert "needs arbitrary unpickling" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_payload_in_zero_optimizer_file_is_refused(tmp_path, marker):
    """bf16 module weights make the converter read the ZeRO files for the fp32 masters: they are refused too."""
    torch.save(model_states(torch.bfloat16), tmp_path / MODEL_STATES)
    zero = "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": {"zero_stage": 2, "partition_count": [1], "loss_scaler": Payload(marker)}},
               tmp_path / zero)
    with pytest.raises(ValueError, match=rf"{zero} {REFUSED}"):
        convert(tmp_path, tmp_path / "out")
    assert not marker.exists()


def test_expert_shards_are_read_as_safetensors_only(tmp_path, marker):
    """A pickle under the shard file's name is not unpickled; an older Switchyard's pickled shard is refused."""
    torch.save(model_states(), tmp_path / MODEL_STATES)
    shard = tmp_path / EXPERT_SHARD_FILE.format(ep_rank=0)
    torch.save({"module": {}, "expert_parallel": Payload(marker)}, shard)
    with pytest.raises(ValueError, match=rf"cannot read .*{shard.name}.*not an expert shard file"):
        convert(tmp_path, tmp_path / "out")
    save_file({"x": torch.zeros(1)}, str(shard))  # safetensors, but without the expert-parallel metadata
    with pytest.raises(ValueError, match=rf"{shard.name} lacks its expert-parallel metadata \({EXPERT_SHARD_META!r}"):
        convert(tmp_path, tmp_path / "out")
    shard.unlink()
    torch.save({"module": {}, "expert_parallel": Payload(marker)}, tmp_path / "switchyard_experts_ep_rank_00.pt")
    with pytest.raises(ValueError, match=r"switchyard_experts_ep_rank_00.pt is an expert shard file of an older "
                                         r"Switchyard \(a pickle\); use the run's own checkpoint"):
        convert(tmp_path, tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_deepspeed_objects_load_as_plain_values(tmp_path):
    """The DeepSpeed objects of a real ZeRO file come back as plain values, without DeepSpeed's classes."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    torch.save({"zero_stage": ZeroStageEnum.gradients, "address": fragment_address(numel=6, start=2),
                "loss_scaler": LossScaler(1.0)}, tmp_path / "optim_states.pt")
    state = load_deepspeed_file(tmp_path / "optim_states.pt")
    assert type(state["zero_stage"]) is int and state["zero_stage"] == 2
    assert (state["address"].numel, state["address"].start) == (6, 2)
    assert vars(state["loss_scaler"]) == {"cur_scale": 1.0, "dynamic": False}
