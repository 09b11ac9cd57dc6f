"""Config mistakes that used to pass silently (or fail later without naming the field) are refused when the config is
composed, as a user composes it on the command line, with a ValueError naming the field; token files are checked
against the dtype they were written with before any batch is drawn."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from experiments.config import run_config_from_dict
from experiments.data import DataConfig, prepare
from experiments.hydra_conf import CONFIG_MODULE, register_configs

register_configs()


def make_run(*overrides: str, run_dir: str = "."):
    """A RunConfig composed by Hydra with the user's overrides, as experiments.train builds it (no data is read)."""
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    return run_config_from_dict(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True), run_dir)


REFUSED = [
    # accepted silently before
    (["trainer.eval_interval=-1"], r"trainer\.eval_interval=-1 must be non-negative"),
    (["trainer.ckpt_interval=-5"], r"trainer\.ckpt_interval=-5 must be non-negative"),
    (["trainer.grad_clip=-1.0"], r"trainer\.grad_clip=-1\.0 must be non-negative"),
    (["optim.weight_decay=-0.1"], r"optim\.weight_decay=-0\.1 must be non-negative"),
    (["model.moe.router.aux_loss_coef=-0.01"], r"model\.moe\.router\.aux_loss_coef=-0\.01 must be non-negative"),
    (["model.moe.router.z_loss_coef=-0.001"], r"model\.moe\.router\.z_loss_coef=-0\.001 must be non-negative"),
    (["model.moe.router.scale=0"], r"model\.moe\.router\.scale=0\.0 must be positive"),
    (["optim.eps=0"], r"optim\.eps=0\.0 must be positive"),  # typed: Hydra turns the 0 into a float
    (["optim.eps=-1e-8"], r"optim\.eps=-1e-08 must be positive"),
    (["optim.warmup_steps=400", "trainer.max_steps=300"], r"optim\.warmup_steps=400 is longer than the run"),
    # Switch (top-1) with capacity factor 0.02: 2% of the tokens reach an expert at most
    (["routing=switch", "model.moe.router.capacity_factor=0.02"],
     r"model\.moe\.router\.capacity_factor=0\.02 .* at least 98% skip the layer"),
    (["model.moe.router.capacity_factor=-0.1"], r"model\.moe\.router\.capacity_factor=-0\.1 .* at most 20%"),
    (["routing=switch", "model.moe.router.eval_capacity_factor=0.1"], r"model\.moe\.router\.eval_capacity_factor=0\.1"),
    (["routing=expert_choice", "model.moe.router.capacity_factor=0.1"], r"model\.moe\.router\.capacity_factor=0\.1"),
    # failed only at the first forward
    (["model.moe.router.capacity_factor=nan"], r"model\.moe\.router\.capacity_factor=nan must be a finite number"),
    # caught by torch without the field's name
    (["optim.beta1=1.0"], r"optim\.beta1=1\.0 must be in \[0, 1\)"),
    (["optim.beta2=-0.5"], r"optim\.beta2=-0\.5 must be in \[0, 1\)"),
    (["model.init_std=-0.02"], r"model\.init_std=-0\.02 must be positive"),
    (["optim.lr=nan"], r"optim\.lr=nan must be a finite number"),
    # nan and inf elsewhere
    (["trainer.grad_clip=inf"], r"trainer\.grad_clip=inf must be a finite number"),
    (["model.dropout=nan"], r"model\.dropout=nan must be a finite number"),
    (["model.init_std=0"], r"model\.init_std=0\.0 must be positive"),
    (["model.moe.router.jitter=nan"], r"model\.moe\.router\.jitter=nan must be a finite number"),
    (["data.val_fraction=inf"], r"data\.val_fraction=inf must be a finite number"),
]


@pytest.mark.parametrize("overrides, match", REFUSED, ids=[" ".join(o) for o, _ in REFUSED])
def test_refused_with_the_field_named(overrides, match):
    with pytest.raises(ValueError, match=match):
        make_run(*overrides)


ACCEPTED = [
    ["trainer.eval_interval=0", "trainer.ckpt_interval=0", "trainer.grad_clip=0", "optim.weight_decay=0"],
    ["model.moe.router.aux_loss_coef=0", "model.moe.router.z_loss_coef=0", "optim.beta1=0"],
    ["optim.warmup_steps=300", "trainer.max_steps=300"],  # warmup over the whole run: peak lr at the last step
    ["trainer.max_steps=1"],  # the default warmup outlasts a one-step check; that is no user's mistake
    ["routing=switch", "model.moe.router.capacity_factor=0.5"],  # half the tokens at most: a legitimate setting
    ["model.moe.router.capacity_factor=0.25"],  # top-2: 0.5 slots per token
    ["model.moe.router.capacity_factor=-1.0", "model.moe.router.eval_capacity_factor=0"],
    ["routing=base", "model.moe.router.capacity_factor=0.01"],  # base ignores the capacity factor
]


@pytest.mark.parametrize("overrides", ACCEPTED, ids=[" ".join(o) for o in ACCEPTED])
def test_sane_values_accepted(overrides):
    make_run(*overrides)


# ------------------------------------------------------------------------------------------ token files

IDS = [7, 1, 300, 42, 5, 0, 256, 9] * 16  # 128 small ids: a uint32 file's every second 16-bit word is zero


def tokens_run(path: Path, *overrides: str, vocab: int = 301):
    return make_run("data=tokens", f"data.path={path}", f"data.vocab_size={vocab}", *overrides).data


def write_tokens(path: Path, dtype: str, sidecar: dict | None = None, ids=IDS) -> Path:
    np.asarray(ids, dtype=dtype).tofile(path)
    if sidecar is not None:
        path.with_name(path.name + ".json").write_text(json.dumps(sidecar), encoding="utf-8")
    return path


def test_sidecar_dtype_disagrees(tmp_path):
    path = write_tokens(tmp_path / "train.bin", "uint32", {"dtype": "uint32", "vocab_size": 301})
    with pytest.raises(ValueError, match=r"holds uint32 tokens \(so says .*train\.bin\.json\) but "
                                         r"data\.token_dtype=uint16; set data\.token_dtype=uint32"):
        prepare(tokens_run(path))
    assert int(prepare(tokens_run(path, "data.token_dtype=uint32")).train.max()) == 300


def test_sidecar_vocab_larger_than_data_vocab(tmp_path):
    path = write_tokens(tmp_path / "train.bin", "uint16", {"dtype": "uint16", "vocab_size": 50000})
    with pytest.raises(ValueError, match=r"data\.vocab_size=301 is smaller .* set data\.vocab_size=50000"):
        prepare(tokens_run(path))


def test_uint32_without_sidecar_read_as_uint16(tmp_path):
    path = write_tokens(tmp_path / "train.bin", "uint32")
    with pytest.raises(ValueError, match=r"looks like uint32 tokens read as uint16 .* set data\.token_dtype=uint32"):
        prepare(tokens_run(path))
    data = prepare(tokens_run(path, "data.token_dtype=uint32"))
    assert data.train.tolist() + data.val.tolist() == IDS


def test_correct_uint16_file_passes(tmp_path):
    path = write_tokens(tmp_path / "train.bin", "uint16")
    data = prepare(tokens_run(path))
    assert data.train.dtype == np.uint16 and int(max(data.train.max(), data.val.max())) <= 300
    # A sidecar that agrees changes nothing.
    write_tokens(path, "uint16", {"dtype": "uint16", "vocab_size": 301})
    assert prepare(tokens_run(path)).fingerprint == data.fingerprint


def test_prepared_cache_meta_is_checked(tmp_path, text_corpus):
    """The train.bin of a prepared cache entry, reused as data=tokens: its meta.json names the dtype."""
    cached = prepare(DataConfig(source="text", path=str(text_corpus), tokenizer="byte", cache_dir=str(tmp_path)))
    train = Path(cached.meta["cache_path"]) / "train.bin"
    assert cached.meta["dtype"] == "uint16"
    with pytest.raises(ValueError, match=r"holds uint16 tokens \(so says .*meta\.json\) .* set data\.token_dtype=uint16"):
        prepare(tokens_run(train, "data.token_dtype=uint32", vocab=257))
    with pytest.raises(ValueError, match=r"data\.vocab_size=200 is smaller .* set data\.vocab_size=257"):
        prepare(tokens_run(train, vocab=200))
    data = prepare(tokens_run(train, vocab=257))
    assert data.train.tolist() + data.val.tolist() == cached.train.tolist()


def test_uint16_cannot_hold_large_vocab():
    with pytest.raises(ValueError, match=r"data\.vocab_size=100000 .* set data\.token_dtype=uint32"):
        make_run("data=tokens", "data.path=x.bin", "data.vocab_size=100000")
