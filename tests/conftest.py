"""Shared test fixtures: model folders built from random weights, named and shaped as OpenAI's.

Weights are made in OpenAI's checkpoint naming (`model/h0/attn/c_attn/w`, [1, E, 3E]) so the TF
reference can run on exactly what a checkpoint holds; `write_model_dir` maps them to the model
folder format with its own small table, written independently of the converter under test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest


from helpers.make_checkpoint import random_openai_weights, save_checkpoint  # noqa: E402

DATA = Path(__file__).parent / "data"
BPE_DIR = DATA / "gpt2-bpe"
ROOT = Path(__file__).parent.parent
BIN = Path(sys.executable).parent


def ctrl_c_reaches():
    """`preexec_fn` for a child that a test sends Ctrl-C (SIGINT): a shell without job control
    starts its background commands (a CI job among them) with SIGINT ignored, which children
    inherit and Python keeps; at a terminal, Ctrl-C has its default action."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)

# hparams.json as OpenAI publishes it, for a small model with the real vocabulary.
SMALL_HPARAMS = {"n_vocab": 50257, "n_ctx": 64, "n_embd": 64, "n_head": 4, "n_layer": 2}
HPARAMS_124M = {"n_vocab": 50257, "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12}


def hf_name(openai_name: str) -> str:
    """`model/h3/attn/c_attn/w` -> `h.3.attn.c_attn.weight`; `model/wte` -> `wte.weight`."""
    parts = openai_name.removeprefix("model/").split("/")
    if parts[0].startswith("h") and parts[0][1:].isdigit():
        parts[0] = "h." + parts[0][1:]
    last = {"w": "weight", "g": "weight", "b": "bias"}
    if parts[-1] in last and len(parts) > 1:
        parts[-1] = last[parts[-1]]
    else:
        parts.append("weight")
    return ".".join(parts)


def hf_config(hp: dict) -> dict:
    return {
        "model_type": "gpt2", "vocab_size": hp["n_vocab"], "n_positions": hp["n_ctx"], "n_ctx": hp["n_ctx"],
        "n_embd": hp["n_embd"], "n_layer": hp["n_layer"], "n_head": hp["n_head"],
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "bos_token_id": 50256, "eos_token_id": 50256,
    }


def write_model_dir(path: Path, hp: dict, weights: dict[str, np.ndarray], hf_style: bool = False) -> Path:
    """A model folder written with the `safetensors` library (not our code).

    `hf_style` imitates Hugging Face's save_pretrained of GPT2LMHeadModel: `transformer.` prefix,
    the attention mask buffers of older versions, and an explicit `lm_head.weight`.
    """
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    prefix = "transformer." if hf_style else ""
    tensors = {prefix + hf_name(k): np.ascontiguousarray(v.reshape(v.shape[1:]) if v.ndim == 3 else v)
               for k, v in weights.items()}
    if hf_style:
        C = hp["n_ctx"]
        for i in range(hp["n_layer"]):
            tensors[f"transformer.h.{i}.attn.bias"] = np.tril(np.ones((1, 1, C, C), np.float32))
            tensors[f"transformer.h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
        tensors["lm_head.weight"] = weights["model/wte"]
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(hf_config(hp), indent=2))
    shutil.copyfile(BPE_DIR / "encoder.json", path / "vocab.json")
    shutil.copyfile(BPE_DIR / "vocab.bpe", path / "merges.txt")
    return path


@pytest.fixture(scope="session")
def small_weights() -> dict[str, np.ndarray]:
    return random_openai_weights(SMALL_HPARAMS, seed=1)


@pytest.fixture(scope="session")
def small_model_dir(tmp_path_factory, small_weights) -> Path:
    return write_model_dir(tmp_path_factory.mktemp("small") / "model", SMALL_HPARAMS, small_weights)


@pytest.fixture(scope="module")
def model(small_model_dir):
    """The small model, loaded once per test module."""
    import gpt2np

    return gpt2np.load(small_model_dir)


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory, small_weights) -> Path:
    """OpenAI's seven files for the small model, in a `124M/` folder as on OpenAI's storage."""
    return save_checkpoint(tmp_path_factory.mktemp("blob") / "124M", SMALL_HPARAMS, small_weights)


@pytest.fixture(scope="session")
def weights_124M() -> dict[str, np.ndarray]:
    return random_openai_weights(HPARAMS_124M, seed=7)


@pytest.fixture(scope="session")
def model_124M_dir(tmp_path_factory, weights_124M) -> Path:
    """A model folder at GPT-2 small's real shapes (random weights, 498 MB)."""
    return write_model_dir(tmp_path_factory.mktemp("m124") / "model", HPARAMS_124M, weights_124M)


@pytest.fixture(scope="session")
def checkpoint_124M(tmp_path_factory, weights_124M) -> Path:
    """OpenAI's seven files at GPT-2 small's real shapes (random weights, 498 MB of data)."""
    return save_checkpoint(tmp_path_factory.mktemp("ckpt124") / "124M", HPARAMS_124M, weights_124M)


@pytest.fixture(scope="session")
def tokenizer():
    from gpt2np import Tokenizer
    return Tokenizer.from_files(BPE_DIR / "encoder.json", BPE_DIR / "vocab.bpe")


def run_cli(name: str, *args: str, input: bytes | None = None, timeout: float = 300, env=None):
    """Run an installed console script of this project as a user would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([str(BIN / name), *args], input=input, capture_output=True,
                          timeout=timeout, env=full_env)
