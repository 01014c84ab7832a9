"""Hostile input never gets past the project's own error: fuzzing with hypothesis.

Budget: GPT2NP_FUZZ_EXAMPLES examples per test (default 200, which keeps CI fast; `make fuzz` runs
20,000). Every example must end in a clean result or a GPT2Error: never another exception, a hang
(hypothesis' deadline) or an allocation out of proportion to the file (tracemalloc).
"""

import json
import os
import struct
import tracemalloc
from itertools import count

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from gpt2np import GPT2Config, GPT2Error, Tokenizer
from gpt2np.tokenizer import bytes_to_unicode
from gpt2np.weights import DTYPES, SafetensorsFile, load_gpt2_weights
from conftest import BPE_DIR

EXAMPLES = int(os.environ.get("GPT2NP_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                              HealthCheck.too_slow])
TINY = GPT2Config(vocab_size=16, n_positions=8, n_embd=8, n_head=2, n_layer=1, bos_token_id=0, eos_token_id=0)
_names = count()


def tiny_file() -> bytes:
    """A valid model file for TINY, written by hand in safetensors layout."""
    rng = np.random.default_rng(0)
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, shape in TINY.tensor_shapes().items():
        a = rng.standard_normal(shape).astype("<f4")
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + a.nbytes]}
        blobs.append(a.tobytes())
        offset += a.nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + b"".join(blobs)


VALID = tiny_file()
HEADER_END = 8 + struct.unpack("<Q", VALID[:8])[0]


def load_guarded(path, size):
    """Load; return the weights or None on GPT2Error; check the memory it took."""
    tracemalloc.start()
    try:
        return load_gpt2_weights(path, TINY)[0]
    except GPT2Error as e:
        assert str(path) in str(e) and "\n" not in str(e)
        return None
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < 2_000_000 + 20 * size, f"loading a {size}-byte file allocated {peak} bytes"


@pytest.fixture(scope="module")
def reference():
    return {k: np.array(v) for k, v in load_gpt2_weights(write(VALID, "valid"), TINY)[0].items()}


FUZZ_DIR = None


def write(data: bytes, tag: str = "f"):
    global FUZZ_DIR
    if FUZZ_DIR is None:
        import tempfile
        FUZZ_DIR = tempfile.mkdtemp(prefix="gpt2np-fuzz-")
    path = os.path.join(FUZZ_DIR, f"{tag}-{next(_names)}.safetensors")  # never rewrite a mapped file
    with open(path, "wb") as f:
        f.write(data)
    return path


mutation = st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255))
in_header = st.tuples(st.integers(0, HEADER_END - 1), st.integers(0, 255))


@FUZZ
@given(st.lists(st.one_of(in_header, in_header, mutation), min_size=1, max_size=6),
       st.one_of(st.none(), st.integers(0, len(VALID) + 64)), st.binary(max_size=32))
def test_mutated_and_truncated_model_files(reference, edits, cut, tail):
    data = bytearray(VALID)
    for pos, byte in edits:
        data[pos] = byte
    if cut is not None:
        data = data[:cut] + (tail if cut >= len(VALID) else b"")
    data = bytes(data)
    weights = load_guarded(write(data), len(data))
    if weights is None:
        return
    # It loaded: then the header said exactly what it said before, and only data bytes changed.
    assert weights.keys() == reference.keys()
    changed = {pos for pos, byte in edits if VALID[pos] != byte}
    for name, a in weights.items():
        assert a.shape == reference[name].shape and a.dtype == np.float32
    if not any(HEADER_END <= p for p in changed):
        assert all(np.array_equal(weights[n], reference[n], equal_nan=True) for n in weights)


json_scalar = st.one_of(st.integers(-2**70, 2**70), st.floats(allow_nan=True), st.text(max_size=4), st.booleans(),
                        st.none())
json_value = st.recursive(json_scalar, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=6), inner, max_size=4), max_leaves=12)
entry = st.fixed_dictionaries({
    "dtype": st.one_of(st.sampled_from(list(DTYPES) + ["F8", "f32", ""]), json_scalar),
    "shape": st.one_of(st.lists(st.integers(-3, 2**40), max_size=6), st.lists(st.integers(0, 4), max_size=300),
                       json_value),
    "data_offsets": st.one_of(st.lists(st.integers(-10, 2**66), min_size=2, max_size=2), json_value),
}) | json_value


@FUZZ
@given(st.dictionaries(st.text(max_size=12), entry, max_size=6),
       st.one_of(st.none(), json_value), st.integers(0, 256))
def test_hostile_headers(header, metadata, data_size):
    if metadata is not None:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    data = struct.pack("<Q", len(raw)) + raw + bytes(data_size)
    path = write(data, "h")
    tracemalloc.start()
    try:
        st_file = SafetensorsFile(path)
    except GPT2Error as e:
        assert path in str(e) and "\n" not in str(e)
        return
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < 2_000_000 + 20 * len(data)
    # Accepted: every tensor lies inside the data, and together they cover it exactly.
    total = sum(a.nbytes for a in st_file.tensors.values())
    assert total == data_size
    assert all(isinstance(v, str) for v in st_file.metadata.values())


@FUZZ
@given(st.integers(0, 2**64 - 1), st.binary(max_size=64))
def test_header_length_field(n, rest):
    data = struct.pack("<Q", n) + rest
    assert load_guarded(write(data, "n"), len(data)) is None


@FUZZ
@given(st.dictionaries(st.sampled_from(["vocab_size", "n_positions", "n_ctx", "n_embd", "n_layer", "n_head",
                                        "n_inner", "layer_norm_epsilon", "activation_function", "bos_token_id",
                                        "eos_token_id", "model_type", "scale_attn_weights"]), json_value, max_size=13)
       | json_value)
def test_hostile_config(d):
    try:
        c = GPT2Config.from_dict(d)
    except GPT2Error as e:
        assert "\n" not in str(e)
        return
    assert c.n_embd % c.n_head == 0 and 0 <= c.eos_token_id < c.vocab_size


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_files(BPE_DIR / "encoder.json", BPE_DIR / "vocab.bpe")


@pytest.fixture(scope="module")
def tiktoken_gpt2():
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    os.environ["TIKTOKEN_CACHE_DIR"] = ""
    ranks = data_gym_to_mergeable_bpe_ranks(str(BPE_DIR / "vocab.bpe"), str(BPE_DIR / "encoder.json"))
    return tiktoken.Encoding("gpt2-local", pat_str=r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
                             mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256})


@FUZZ
@given(st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF), max_size=200))
def test_tokenizer_on_any_string_including_lone_surrogates(tokenizer, tiktoken_gpt2, text):
    ids = tokenizer.encode(text)
    assert ids == tiktoken_gpt2.encode_ordinary(text)  # the reference, surrogates included
    clean = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    assert tokenizer.decode(ids) == clean  # surrogates become U+FFFD; everything else round-trips


@FUZZ
@given(st.lists(st.one_of(st.integers(-2**70, 2**70), st.integers(0, 50300)), max_size=50))
def test_decode_any_id_list(tokenizer, ids):
    if all(0 <= i < 50257 for i in ids):
        assert isinstance(tokenizer.decode(ids), str)
    else:
        with pytest.raises(GPT2Error, match="not in the vocabulary"):
            tokenizer.decode(ids)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 300), st.integers(0, 255)), min_size=1, max_size=4), st.booleans())
def test_malformed_vocabulary_files(tmp_path_factory, edits, in_merges):
    folder = tmp_path_factory.mktemp("voc")
    # A small byte-level vocabulary (OpenAI's files are trusted by their hash, so mutate this one).
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab["ĠĠ"], vocab["ab"] = 256, 257
    vocab_bytes = bytearray(json.dumps(vocab).encode())
    merges_bytes = bytearray("#version: 0.2\nĠ Ġ\na b\n".encode())
    target = merges_bytes if in_merges else vocab_bytes
    for pos, byte in edits:
        target[pos % len(target)] = byte
    (folder / "v.json").write_bytes(vocab_bytes)
    (folder / "m.txt").write_bytes(merges_bytes)
    try:
        tok = Tokenizer.from_files(folder / "v.json", folder / "m.txt")
    except GPT2Error as e:
        assert "\n" not in str(e)
        return
    assert tok.decode(tok.encode("ab  ab")) == "ab  ab"
