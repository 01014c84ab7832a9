"""config.json: Hugging Face's GPT2Config fields, checked; the one definition of tensor shapes."""

import json
import math

import pytest

from gpt2np import GPT2Config, GPT2Error


def test_defaults_are_gpt2_small_and_round_trip():
    c = GPT2Config()
    assert (c.vocab_size, c.n_positions, c.n_embd, c.n_layer, c.n_head) == (50257, 1024, 768, 12, 12)
    assert GPT2Config.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    shapes = c.tensor_shapes()
    assert len(shapes) == 2 + 12 * 12 + 2
    assert sum(math.prod(s) for s in shapes.values()) == 124_439_808
    assert shapes["h.11.mlp.c_proj.weight"] == (3072, 768)
    assert list(shapes)[:3] == ["wte.weight", "wpe.weight", "h.0.ln_1.weight"]


def test_reads_a_hugging_face_config():
    hf = {"activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
          "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
          "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 1024, "n_embd": 1024, "n_head": 16,
          "n_layer": 24, "n_positions": 1024, "resid_pdrop": 0.1, "summary_activation": None,
          "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}},
          "vocab_size": 50257, "reorder_and_upcast_attn": False, "n_inner": None}
    c = GPT2Config.from_dict(hf)
    assert (c.n_embd, c.n_layer, c.n_head, c.d_mlp, c.head_dim) == (1024, 24, 16, 4096, 64)


@pytest.mark.parametrize("change, message", [
    ({"n_head": 5}, "not divisible"),
    ({"n_embd": -768}, "n_embd must be an integer"),
    ({"n_layer": 0}, "n_layer"),
    ({"n_layer": True}, "n_layer"),
    ({"vocab_size": 10**12}, "vocab_size"),
    ({"n_positions": "1024", "n_ctx": "1024"}, "n_positions"),
    ({"layer_norm_epsilon": 0}, "layer_norm_epsilon"),
    ({"activation_function": "relu"}, "relu"),
    ({"eos_token_id": 50257}, "eos_token_id"),
    ({"model_type": "gpt_neo"}, "gpt_neo"),
    ({"scale_attn_by_inverse_layer_idx": True}, "not supported"),
    ({"n_ctx": 512}, "differs"),
])
def test_bad_values_are_clear_errors(change, message):
    d = {**GPT2Config().to_dict(), **change}
    with pytest.raises(GPT2Error, match=message):
        GPT2Config.from_dict(d)


def test_missing_fields_and_bad_files(tmp_path):
    with pytest.raises(GPT2Error, match="missing n_embd"):
        GPT2Config.from_dict({"vocab_size": 5, "n_positions": 4, "n_layer": 1, "n_head": 1})
    (tmp_path / "c.json").write_text("{not json")
    with pytest.raises(GPT2Error, match="not a valid JSON"):
        GPT2Config.from_file(tmp_path / "c.json")
    (tmp_path / "c.json").write_text("[1, 2]")
    with pytest.raises(GPT2Error, match="not a JSON object"):
        GPT2Config.from_file(tmp_path / "c.json")
