"""trainer.compile in the engines: trainer=single compiles every block when wrapping and says so; deepspeed refuses."""
from types import SimpleNamespace

import pytest

from experiments.config import OptimConfig
from experiments.engines.deepspeed import check_deepspeed
from experiments.engines.single import SingleEngine
from moe.model import Transformer
from moe.presets import get_preset


def _cfg(compile: bool):
    return SimpleNamespace(trainer=SimpleNamespace(device="cpu", precision="fp32", compile=compile))


@pytest.mark.parametrize("compile", [False, True])
def test_single_engine_compiles_blocks_when_asked_and_logs_it(compile, capsys):
    model = Transformer(get_preset("tiny_moe").replace(n_layer=2, d_model=32, n_head=2, d_ff=48))
    SingleEngine(_cfg(compile)).wrap(model, OptimConfig())  # compilation itself is lazy: nothing runs here
    out = capsys.readouterr().out
    compiled = [b._compiled_call_impl is not None for b in model.blocks]
    assert compiled == [compile, compile]
    assert ("torch.compile: 2 blocks (2 sparse, 0 dense)" in out) == compile


def test_deepspeed_refuses_compile_naming_the_setting():
    with pytest.raises(ValueError, match="trainer.compile=true is not supported with trainer=deepspeed"):
        check_deepspeed(_cfg(True))
