"""moe.checkpoint and the writer under it (moe.atomic): atomic commits that leave nothing behind, the manifest
catching a changed byte, both weight layouts read back exactly, and pickles refused without running them."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moe import sharded_checkpoint
from moe.atomic import write_atomically, write_text
from moe.checkpoint import WEIGHTS_FILE, load_model, model_state, read_weights, save_checkpoint, write_folder
from moe.config import ModelConfig, MoEConfig
from moe.manifest import DamagedCheckpoint, write_manifest
from moe.model import Transformer


def _model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=32, n_layer=2, d_model=8, n_head=2, d_ff=16, max_seq_len=8,
                                   moe=MoEConfig(layers="all", num_experts=4)))


def _siblings(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_save_replaces_atomically_and_leaves_nothing_behind(tmp_path):
    path = tmp_path / "ckpt"
    save_checkpoint(path, _model(0))
    second = _model(1)
    save_checkpoint(path, second)  # over an existing checkpoint: moved aside, swapped, the old one removed
    assert _siblings(tmp_path) == ["ckpt"]
    assert _siblings(path) == ["config.json", "manifest.json", WEIGHTS_FILE]
    state = load_file(str(path / WEIGHTS_FILE))
    assert all(torch.equal(state[k], v) for k, v in model_state(second).items())
    mode = stat.S_IMODE((path / WEIGHTS_FILE).stat().st_mode)  # safetensors writes 0600; the commit evens it out
    assert mode == 0o666 & ~_umask() and stat.S_IMODE(path.stat().st_mode) == 0o777 & ~_umask()


def test_a_failed_write_keeps_the_old_checkpoint_byte_for_byte(tmp_path):
    path = tmp_path / "ckpt"
    save_checkpoint(path, _model(0))
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def broken(target: Path) -> None:
        target.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, _model(1), extra={"trainer_state.json": broken})
    assert _siblings(tmp_path) == ["ckpt"]  # the temporary folder is gone
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before


def test_cache_entries_keep_the_first_finished_copy(tmp_path):
    entry = tmp_path / "data" / "entry"
    with write_atomically(entry, replace_existing=False) as tmp:
        (tmp / "meta.json").write_text("first")
    with write_atomically(entry, replace_existing=False) as tmp:  # another process finished first: discarded
        (tmp / "meta.json").write_text("second")
    assert (entry / "meta.json").read_text() == "first" and _siblings(entry.parent) == ["entry"]


def test_write_text_replaces_whole_files_with_plain_permissions(tmp_path):
    path = tmp_path / "sub" / "run.json"
    write_text(path, "a" * 1000)
    write_text(path, "b")
    assert path.read_text() == "b" and _siblings(path.parent) == ["run.json"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask()


def test_manifest_catches_one_flipped_byte(tmp_path):
    model = _model(0)
    save_checkpoint(tmp_path / "ckpt", model)
    weights = tmp_path / "ckpt" / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # the last byte: inside the last tensor's data, so safetensors itself reads it fine
    weights.write_bytes(bytes(data))
    with pytest.raises(DamagedCheckpoint, match=rf"{WEIGHTS_FILE}: its SHA-256 differs from the one in manifest.json"):
        read_weights(model, tmp_path / "ckpt")
    # verified=True (the caller hashed the folder already) skips the hash: exactly one value differs.
    state, want = read_weights(model, tmp_path / "ckpt", verified=True), model_state(model)
    changed = sum(int((state[k] != v).sum()) for k, v in want.items())
    assert changed == 1


def test_manifest_catches_a_truncated_file(tmp_path):
    model = _model(0)
    save_checkpoint(tmp_path / "ckpt", model)
    weights = tmp_path / "ckpt" / WEIGHTS_FILE
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[:-4])
    with pytest.raises(DamagedCheckpoint, match=rf"{size - 4} bytes, but manifest.json records {size}"):
        read_weights(model, tmp_path / "ckpt")


def test_read_weights_reads_both_layouts_exactly(tmp_path):
    model = _model(0)
    want = model_state(model)
    save_checkpoint(tmp_path / "plain", model)
    with write_atomically(tmp_path / "sharded") as tmp:  # as experiments.convert_checkpoint writes one
        sharded_checkpoint.write(tmp / sharded_checkpoint.SHARDED_DIR, sharded_checkpoint.flat(want, {}),
                                 single_writer=True)
        write_folder(tmp, model.cfg, None)
    assert not (tmp_path / "sharded" / WEIGHTS_FILE).exists()
    for layout in ("plain", "sharded"):
        got = read_weights(model, tmp_path / layout)
        assert sorted(got) == sorted(want) and all(torch.equal(got[k], v) for k, v in want.items()), layout
        loaded = load_model(tmp_path / layout)
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_read_weights_names_what_does_not_fit(tmp_path):
    save_checkpoint(tmp_path / "ckpt", _model(0))
    other = Transformer(_model(0).cfg.replace(d_ff=24))  # every expert width differs
    with pytest.raises(ValueError, match=r"does not fit this model config: missing \[\], unexpected \[\], shape "
                                         r"mismatches \['blocks.0.ffn.experts.w_up: checkpoint \(4, 8, 16\) vs model "
                                         r"\(4, 8, 24\)'"):
        read_weights(other, tmp_path / "ckpt")


class _Payload:
    """Unpickling this runs os.mkdir(marker): the proof that a loader executed code from the file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_a_pickle_in_place_of_the_weights_is_refused_unrun(tmp_path):
    model = _model(0)
    save_checkpoint(tmp_path / "ckpt", model)
    marker = tmp_path / "ran"
    weights = tmp_path / "ckpt" / WEIGHTS_FILE
    torch.save({"state": _Payload(str(marker))}, weights)
    (tmp_path / "ckpt" / "manifest.json").unlink()
    write_manifest(tmp_path / "ckpt")  # the manifest agrees: only the reader stands between the file and the code
    with pytest.raises(ValueError, match=rf"cannot read {weights}"):
        read_weights(model, tmp_path / "ckpt")
    assert not marker.exists()
