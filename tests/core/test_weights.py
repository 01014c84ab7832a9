"""The safetensors reader against the `safetensors` library, zero copy, and laziness."""

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from gpt2np import GPT2Config, GPT2Error
from gpt2np.weights import SafetensorsFile, load_gpt2_weights


def test_reads_what_the_safetensors_library_writes(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "f32": rng.standard_normal((3, 5)).astype(np.float32),
        "f64": rng.standard_normal(7),
        "f16": rng.standard_normal((2, 2, 2)).astype(np.float16),
        "i64": rng.integers(-10**12, 10**12, (4,)),
        "i8": rng.integers(-128, 127, (9,), dtype=np.int8),
        "u8": rng.integers(0, 255, (1, 3), dtype=np.uint8),
        "bool": rng.random(5) > 0.5,
        "scalar": np.array(2.5, np.float32),
        "empty": np.zeros((0, 4), np.float32),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "note": "x"})
    st = SafetensorsFile(path)
    expected = load_file(str(path))
    assert st.tensors.keys() == expected.keys()
    for name, arr in expected.items():
        assert st.tensors[name].dtype == arr.dtype and st.tensors[name].shape == arr.shape, name
        np.testing.assert_array_equal(st.tensors[name], arr)
    assert st.metadata == {"format": "pt", "note": "x"}


def test_tensors_are_read_only_views_of_one_mapping(small_model_dir):
    st = SafetensorsFile(small_model_dir / "model.safetensors")
    arrays = list(st.tensors.values())
    assert all(not a.flags.owndata and not a.flags.writeable for a in arrays)
    assert all(np.shares_memory(a, np.frombuffer(st._mmap, np.uint8)) for a in arrays if a.size)
    with pytest.raises(ValueError):
        arrays[0][...] = 0


def test_bf16_and_f16_weights_become_float32(tmp_path):
    """Half-precision folders (as `save_pretrained` can write them) load as float32 copies."""
    config = GPT2Config(n_positions=64, n_embd=64, n_head=4, n_layer=2)
    rng = np.random.default_rng(1)
    f32 = {n: rng.standard_normal(s).astype(np.float32) for n, s in config.tensor_shapes().items()}
    f16 = {n: a.astype(np.float16) for n, a in f32.items()}
    save_file(f16, str(tmp_path / "h.safetensors"))
    loaded, _ = load_gpt2_weights(tmp_path / "h.safetensors", config)
    for name, a in f16.items():
        assert loaded[name].dtype == np.float32
        np.testing.assert_array_equal(loaded[name], a.astype(np.float32))
    # bfloat16 written by hand: the high 16 bits of each float32.
    bf16_bits = {n: (a.view(np.uint32) >> 16).astype(np.uint16) for n, a in f32.items()}
    header, offset = {}, 0
    for n, a in bf16_bits.items():
        header[n] = {"dtype": "BF16", "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    raw = json.dumps(header).encode()
    with open(tmp_path / "b.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + b"".join(a.tobytes() for a in bf16_bits.values()))
    loaded, _ = load_gpt2_weights(tmp_path / "b.safetensors", config)
    for name, bits in bf16_bits.items():
        np.testing.assert_array_equal(loaded[name].view(np.uint32), bits.astype(np.uint32) << 16)


def test_missing_unexpected_and_misshapen_tensors_are_named(tmp_path):
    config = GPT2Config(n_positions=8, n_embd=8, n_head=2, n_layer=1, vocab_size=16,
                        bos_token_id=0, eos_token_id=0)
    good = {n: np.zeros(s, np.float32) for n, s in config.tensor_shapes().items()}
    cases = {
        "missing tensor 'h.0.ln_2.bias'": {k: v for k, v in good.items() if k != "h.0.ln_2.bias"},
        "unexpected tensor 'h.1.ln_1.weight'": {**good, "h.1.ln_1.weight": np.zeros(8, np.float32)},
        "'wpe.weight' has shape [9, 8]": {**good, "wpe.weight": np.zeros((9, 8), np.float32)},
        "dtype I32": {**good, "ln_f.bias": np.zeros(8, np.int32)},
    }
    for message, tensors in cases.items():
        save_file(tensors, str(tmp_path / "m.safetensors"))
        with pytest.raises(GPT2Error, match=message.replace("[", r"\[")):
            load_gpt2_weights(tmp_path / "m.safetensors", config)


LOAD_AND_MEASURE = """
import sys, time
def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
import gpt2np
before = rss_mb()
t = time.perf_counter()
model = gpt2np.load(sys.argv[1])
load_s = time.perf_counter() - t
after_load = rss_mb()
model.logits([15496, 995])
after_use = rss_mb()
print(after_load - before, after_use - before, load_s)
"""


def test_loading_maps_but_does_not_read_the_weights(model_124M_dir):
    """Opening the real 124M shape must not make the weights resident; using them does."""
    size_mb = (model_124M_dir / "model.safetensors").stat().st_size / 2**20
    out = subprocess.run([sys.executable, "-c", LOAD_AND_MEASURE, str(model_124M_dir)],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "GPT2NP_MATMUL": "numpy"})  # oneDNN's packing reads them (test_matmul.py)
    grew_on_load, grew_on_use, load_s = map(float, out.stdout.split())
    print(f"file {size_mb:.0f} MB; RSS +{grew_on_load:.0f} MB after load, +{grew_on_use:.0f} MB after use; "
          f"load {load_s * 1000:.0f} ms")
    assert grew_on_load < 100, "loading read the weights into memory"
    assert grew_on_use > 0.8 * size_mb, "the measurement cannot see the weights being paged in"


def _file(header, data=b"", raw_header=None):
    raw = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize("content, problem", [
    (b"\x01\x02", "shorter than the 8-byte header length"),
    (struct.pack("<Q", 200 * 2**20) + b"{}", "exceeds the limit"),
    (struct.pack("<Q", 100) + b"{}", "runs past the end"),
    (_file(None, raw_header=b"[1, 2]"), "not a JSON object"),
    (_file(None, raw_header=b"{not json"), "not valid JSON"),
    (_file(None, raw_header=b'{"a": 1, "a": 2}'), "duplicate name 'a'"),
    (_file({"t": {**F32, "dtype": "F8"}}, bytes(8)), "unknown dtype 'F8'"),
    (_file({"t": {**F32, "shape": [3]}}, bytes(8)), "is 12 bytes but data_offsets span 8"),
    (_file({"t": {**F32, "shape": [2**62, 2**62, 2**62]}}, bytes(8)), "data_offsets span 8"),
    (_file({"t": {**F32, "shape": [-2]}}, bytes(8)), "non-negative integers"),
    (_file({"t": {**F32, "data_offsets": [0, 16]}}, bytes(8)), "outside the 8 data bytes"),
    (_file({"t": F32, "u": {**F32, "data_offsets": [4, 12]}}, bytes(12)), "overlaps"),
    (_file({"t": F32, "u": {**F32, "data_offsets": [12, 20]}}, bytes(20)), "gap"),
    (_file({"t": F32}, bytes(12)), "4 bytes after the last tensor"),
    (_file({"__metadata__": {"format": 1}, "t": F32}, bytes(8)), "__metadata__ must map strings to strings"),
    (_file({"t": {"dtype": "F32", "shape": [2]}}, bytes(8)), "exactly dtype, shape, data_offsets"),
])
def test_each_hostile_file_gets_a_one_line_error_naming_file_and_problem(tmp_path, content, problem):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(GPT2Error) as e:
        SafetensorsFile(path)
    assert str(path) in str(e.value) and problem in str(e.value) and "\n" not in str(e.value)


def test_vocabulary_inconsistent_with_the_config(tmp_path, small_model_dir):
    import shutil
    import gpt2np
    folder = tmp_path / "m"
    shutil.copytree(small_model_dir, folder)
    vocab = json.loads((folder / "vocab.json").read_text())
    del vocab["<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(GPT2Error, match="vocab.json has 50256 tokens but config.json says vocab_size 50257"):
        gpt2np.load(folder)
    (folder / "merges.txt").write_text("#version: 0.2\nĠ nosuchtoken\n")
    (folder / "vocab.json").write_text(json.dumps({**vocab, "<|endoftext|>": 50256}))
    with pytest.raises(GPT2Error, match=r"merges.txt:2: merge Ġ nosuchtoken needs 'nosuchtoken'"):
        gpt2np.load(folder)
