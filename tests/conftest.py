"""Shared fixtures: an isolated environment for every test, and a small text corpus for training runs."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tiny shapes run faster and far more steadily on one thread than on the 2 cores CI has (with two threads,
# small ops sometimes stall for milliseconds), and one thread keeps floating-point results independent of load.
torch.set_num_threads(1)

# Without CUDA the Triton kernels run in Triton's interpreter. Triton must be imported after the variable is set, and
# any test module may import it first, so it is set here, before every test module (auto never picks the
# interpreter: only tests that ask for `triton` run it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def isolated_env(tmp_path_factory):
    """Caches, wandb files and wandb settings go to a session tmp folder, never to the home directory,
    and wandb never reaches the network. Session-scoped (plain os.environ) so that module-scoped fixtures
    that train see it too; tests may still override a variable with monkeypatch."""
    root = tmp_path_factory.mktemp("env")
    env = {
        "SWITCHYARD_CACHE": str(root / "switchyard-cache"),
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DIR": str(root / "wandb"),
        "WANDB_CONFIG_DIR": str(root / "wandb-config"),
        "WANDB_CACHE_DIR": str(root / "wandb-cache"),
        "WANDB_DATA_DIR": str(root / "wandb-data"),
        "WANDB_CONSOLE": "off",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory) -> Path:
    """A small deterministic UTF-8 text file (~20 kB): with the byte tokenizer it prepares in milliseconds."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    lines = [f"line {i}: the quick brown fox jumps over the lazy dog, {'and runs ' * (i % 5)}home {i % 7}."
             for i in range(300)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
