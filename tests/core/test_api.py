"""The Python API: load once, then encode, decode, logits, generate (streaming)."""

import numpy as np
import pytest

import gpt2np
from gpt2np import GPT2Error


def test_generate_streams_pieces_that_join_to_the_decoded_ids(small_model_dir):
    model = gpt2np.load(small_model_dir)
    ids = list(model.generate_ids("Streaming ☃ text", 30, stop_at_eos=False))
    pieces = list(model.generate("Streaming ☃ text", 30, stop_at_eos=False))
    assert len(ids) == 30
    assert "".join(pieces) == model.decode(ids)
    assert len(pieces) > 1


def test_generation_stops_at_end_of_text(small_model_dir):
    model = gpt2np.load(small_model_dir)
    eos = model.config.eos_token_id
    # Force <|endoftext|>: a final layer norm with zero gain outputs its bias b at every position,
    # so the logits are wte @ b, and a wte row of 100·b makes <|endoftext|> win.
    b = np.ones(model.config.n_embd, np.float32)
    wte = np.array(model.params.wte)
    wte[eos] = 100 * b
    params = model.params._replace(wte=wte, ln_f=gpt2np.model.LayerNorm(0 * b, b), lm_head=None)
    forced = gpt2np.GPT2(model.config, params, model.tokenizer)
    assert list(forced.generate_ids("x", 5)) == [eos]
    assert list(forced.generate("x", 5)) == []
    assert list(forced.generate_ids("x", 5, stop_at_eos=False)) == [eos] * 5


def test_empty_prompt_starts_from_end_of_text(small_model_dir):
    model = gpt2np.load(small_model_dir)
    assert list(model.generate_ids("", 4, stop_at_eos=False)) == \
        list(model.generate_ids([model.config.eos_token_id], 4, stop_at_eos=False))


def test_context_limit_stops_or_slides(small_model_dir):
    model = gpt2np.load(small_model_dir)
    full = model.complete([1] * 60, 10, stop_at_eos=False)
    assert (len(full.ids), full.stop_reason) == (5, "context")  # the 5th comes from position 63, the last
    slid = model.complete([1] * 60, 10, stop_at_eos=False, sliding_window=True)
    assert (len(slid.ids), slid.stop_reason) == (10, "length")
    assert slid.ids[:5] == full.ids
    with pytest.raises(GPT2Error, match="context is 64"):
        model.complete([1] * 65, 1)
    assert len(model.complete([1] * 65, 3, sliding_window=True, stop_at_eos=False).ids) == 3


def test_bad_ids_are_clear_errors(small_model_dir):
    model = gpt2np.load(small_model_dir)
    with pytest.raises(GPT2Error, match="outside the vocabulary"):
        model.logits([1, 50257])
    with pytest.raises(GPT2Error):
        model.logits([])
    with pytest.raises(GPT2Error, match="outside the vocabulary"):
        model.generate([-1], 3)
    with pytest.raises(GPT2Error, match="integers"):
        model.complete(["a"], 3)


def test_loading_errors_name_the_problem(tmp_path, small_model_dir):
    with pytest.raises(GPT2Error, match="no such directory"):
        gpt2np.load(tmp_path / "nope")
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(GPT2Error, match="missing config.json, model.safetensors.*pickle"):
        gpt2np.load(tmp_path / "partial")
    (tmp_path / "partial" / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(GPT2Error, match="sharded checkpoints are not supported"):
        gpt2np.load(tmp_path / "partial")
