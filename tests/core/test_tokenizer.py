"""GPT-2's byte-level BPE: golden vectors, equality with tiktoken's gpt2 encoding, round trips."""

import os
import random

import pytest
from hypothesis import given, settings, strategies as st

from gpt2np import GPT2Error
from gpt2np.tokenizer import ENDOFTEXT, bytes_to_unicode
from conftest import BPE_DIR

tiktoken = pytest.importorskip("tiktoken")
from tiktoken.load import data_gym_to_mergeable_bpe_ranks  # noqa: E402

CORPUS = [
    "Hello world", "hello world", "HELLO WORLD", "  leading spaces", "trailing spaces   ",
    "I'm sure you'll say they've done it, he'd've", "I'M SURE YOU'LL SAY THEY'VE DONE IT", "don't DON'T Don'T",
    "'s 's' ''s '''", "def f(x):\n    return x ** 2  # square\n\n\tif x != 0: pass\r\n",
    "for (int i = 0; i < n; ++i) { a[i] = b[i] * 3.14159; }", "<div class=\"x\">&nbsp;</div>",
    "The year 2024, the number 1234567890123, and 3.14 and 1e-10.", "Prices: $1,000.50 €20 £3 ¥4",
    "日本語のテキストです。中文文本。한국어 텍스트.", "Ελληνικά, Русский текст, עברית, العربية, हिन्दी",
    "emoji 🙂😀👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵", "combining: e\u0301 a\u0308 n\u0303 Z\u0351\u0352\u0353",
    "\r\n\r\n", "\n\n\n", " \n \n ", "a" * 300, " " * 100 + "x", "1" * 100, "12 345 6789 000",
    "tab\tseparated\tvalues\t\t", "mixed\u00a0nbsp\u2003em-space\u3000ideographic", "zero\u200bwidth\u200djoiner",
    "<|endoftext|>", "text<|endoftext|>more", "   \t\n  \u000b\u000c", "ÀÉÎÕÜ àéîõü ßæøå", "😀" * 20,
    "https://example.com/path?q=1&r=two#frag", "C:\\Windows\\System32", "λx.x ∀∃∈∉ ≤≥≠ ∑∏∫", "",
    "\x00\x01\x02 control \x7f\x1b[31mred\x1b[0m", "mañana 'S'T'RE'VE'M'LL'D", "  'll  've",
]


@pytest.fixture(scope="module")
def reference():
    os.environ["TIKTOKEN_CACHE_DIR"] = ""  # read the local files directly, cache nothing
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(BPE_DIR / "vocab.bpe"),
                                            encoder_json_file=str(BPE_DIR / "encoder.json"))
    return tiktoken.Encoding(
        name="gpt2-local",
        pat_str=r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
        mergeable_ranks=ranks, special_tokens={ENDOFTEXT: 50256},
    )


def test_golden_vectors(tokenizer):
    assert tokenizer.encode("Hello world") == [15496, 995]
    assert tokenizer.encode("hello world") == [31373, 995]
    assert tokenizer.encode(" Hello") == [18435]
    assert tokenizer.encode("") == []
    assert tokenizer.decode([15496, 995]) == "Hello world"
    assert tokenizer.n_vocab == 50257


def test_byte_table_is_a_bijection_onto_printable_characters():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in table.values())
    assert table[ord("A")] == "A" and table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ"


@pytest.mark.parametrize("text", CORPUS)
def test_equals_tiktoken_on_corpus(tokenizer, reference, text):
    assert tokenizer.encode(text) == reference.encode_ordinary(text)
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_equals_tiktoken_on_a_large_mixed_text(tokenizer, reference):
    rng = random.Random(0)
    words = " ".join(CORPUS).split(" ")
    text = "".join(rng.choice(words) + rng.choice([" ", "  ", "\n", "", "\t", ". ", ",\r\n"]) for _ in range(20000))
    ids = tokenizer.encode(text)
    assert ids == reference.encode_ordinary(text)
    assert tokenizer.decode(ids) == text


def test_every_vocabulary_entry_round_trips(tokenizer, reference):
    """Each token's own bytes, where valid UTF-8, encode as tiktoken encodes them."""
    for i in range(50256):
        raw = tokenizer.decode_bytes([i])
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        assert tokenizer.encode(text) == reference.encode_ordinary(text), (i, text)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_round_trip_and_tiktoken_equality_on_any_text(tokenizer, reference, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert ids == reference.encode_ordinary(text)


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8", min_codepoint=0x80)))
def test_streaming_decode_never_breaks_a_character(tokenizer, text):
    decoder = tokenizer.stream_decoder()
    pieces = [decoder.feed(i) for i in tokenizer.encode(text)] + [decoder.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_streaming_holds_back_split_emoji(tokenizer):
    ids = tokenizer.encode("🙂")
    assert len(ids) > 1  # the emoji's four bytes span several tokens
    decoder = tokenizer.stream_decoder()
    assert [decoder.feed(i) for i in ids] == [""] * (len(ids) - 1) + ["🙂"]


def test_special_tokens_are_text_unless_allowed(tokenizer, reference):
    text = "a<|endoftext|>b"
    assert tokenizer.encode(text) == reference.encode_ordinary(text)
    assert 50256 not in tokenizer.encode(text)
    assert tokenizer.encode(text, allowed_special=True) == reference.encode(text, allowed_special="all")
    assert tokenizer.encode(text, allowed_special={ENDOFTEXT}) == [64, 50256, 65]
    assert tokenizer.decode([50256]) == ENDOFTEXT
    with pytest.raises(GPT2Error):
        tokenizer.encode(text, allowed_special={"<|nope|>"})


def test_lone_surrogates_are_replaced_like_tiktoken(tokenizer, reference):
    text = "a\ud800b\udfffc"
    assert tokenizer.encode(text) == reference.encode_ordinary(text)


def test_decode_rejects_unknown_ids(tokenizer):
    with pytest.raises(GPT2Error, match="50257"):
        tokenizer.decode([1, 50257])
    with pytest.raises(GPT2Error):
        tokenizer.decode([-1])
    assert tokenizer.decode([447]) == "\ufffd"  # half a character decodes to U+FFFD, like GPT-2


@pytest.fixture(scope="module")
def reference_loop(tokenizer):
    """The same vocabulary with the fast path switched off: encoder.py's merge loop only."""
    from gpt2np import Tokenizer
    slow = Tokenizer(tokenizer.encoder, list(tokenizer.ranks), gpt2_vocab=False)
    assert tokenizer._gpt2_vocab and not slow._gpt2_vocab
    return slow


def test_gpt2_merges_build_every_token_before_using_it(tokenizer):
    """The fact that makes `_merge_fast` exact: a pair's parts exist before the pair is merged,
    and every token string merges back to itself."""
    built = {c: -1 for c in bytes_to_unicode().values()}
    for rank, (first, second) in enumerate(tokenizer.ranks):
        assert built[first] < rank and built[second] < rank, (first, second)
        built.setdefault(first + second, rank)
    for token in tokenizer.encoder:
        if token != ENDOFTEXT:
            assert tokenizer._merge_reference(token) == [token]


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), min_size=1))
def test_fast_merges_equal_encoder_py_loop(tokenizer, reference_loop, text):
    assert tokenizer.encode(text) == reference_loop.encode(text)


def test_fast_merges_equal_encoder_py_loop_on_corpus(tokenizer, reference_loop):
    text = "".join(CORPUS) * 3 + " antidisestablishmentarianism Pneumonoultramicroscopic aaaaaaaabbbbbbbb"
    assert tokenizer.encode(text) == reference_loop.encode(text)


def test_ascii_classes_equal_the_unicode_ones_on_ascii():
    import regex
    for pattern, ascii_class in ((r"\p{L}", "[A-Za-z]"), (r"\p{N}", "[0-9]"), (r"\s", r"[\t\n\v\f\r ]")):
        for c in map(chr, range(128)):
            assert bool(regex.match(pattern, c)) == bool(regex.match(ascii_class, c)), (pattern, c)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(["a", "Z", "7", " ", "  ", "\n", "\t", "'s", "'", "-", "é", "日", "²", "\u00a0",
                                 "\u3000", "🙂", "\x85", "\x1c", "e\u0301", "ß"]), max_size=40))
def test_split_equals_the_plain_unicode_pattern(tokenizer, parts):
    text = "".join(parts)
    assert tokenizer.split(text) == tokenizer._pattern.findall(text)


def test_explain_shows_the_merges_that_encode_applies(tokenizer):
    tok = tokenizer
    text = "Hello world, ünïcödé 🙂 tokenization!!\n\n  x"
    pieces = tok.explain(text)
    assert [p.text for p in pieces] == tok.split(text)
    assert [i for p in pieces for i in p.ids] == tok.encode(text)
    for p in pieces:
        assert p.byte_chars == "".join(tok.id_to_token[i] for i in p.ids)  # the tokens spell the bytes
        assert [tok.encoder[t] for t in p.tokens] == p.ids
        ranks = [r for _, _, r in p.merges]
        assert ranks == sorted(ranks)  # lowest rank first, each rule once
        assert all(tok.ranks[(a, b)] == r for a, b, r in p.merges)
    world = next(p for p in pieces if p.text == " world")
    assert world.byte_chars == "Ġworld" and world.tokens == ["Ġworld"] and len(world.merges) == 5
