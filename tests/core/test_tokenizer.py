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


# ---------------------------------------------------------------------------------- long pieces
# GPT-2's regex makes one piece of each run of letters, digits or CJK characters, however long;
# pieces from 320 bytes on are merged in NumPy rounds (`gpt2np.bpe_long`).

def _long_pieces():
    rng = random.Random(7)
    latin = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    mixed = latin + "éüßøαβγδεζηθλμπσωабвгдежзийклмнопрстуфхцчшщыэюя日本語中文한국어ひらがなカタカナ"
    yield "one letter", "a" * 100_000
    yield "two letters", "ab" * 50_000
    yield "letters", "".join(rng.choices(latin[:26], k=1 << 20))
    yield "digits", "".join(rng.choices("0123456789", k=300_000))
    yield "cjk", "".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(200_000))
    yield "mixed scripts", "".join(rng.choices(mixed, k=300_000))
    yield "words run together", "".join(rng.choice(["the", "tokenizer", "Hello", "world", "ation", "ing", "aaa"])
                                        for _ in range(100_000))
    yield "a long word, spaced", " " + "Pneumonoultramicroscopicsilicovolcanoconiosis" * 2000


@pytest.mark.parametrize("name,text", list(_long_pieces()), ids=[name for name, _ in _long_pieces()])
def test_long_pieces_equal_tiktoken(tokenizer, reference, name, text):
    assert len(tokenizer.split(text)) == 1  # one piece
    ids = tokenizer.encode(text)
    assert ids == reference.encode_ordinary(text)
    assert tokenizer.decode(ids) == text


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", "aa", "ab", "e", "r", "t", "th", "in", "1", "0", "日", "é", "ß"]),
                min_size=1, max_size=400))
def test_rounds_equal_both_merge_loops(tokenizer, reference_loop, parts):
    """Small alphabets make the ties and chains that the rounds must order as the loop does."""
    from gpt2np.bpe_long import merge
    data = "".join(parts).encode("utf-8")
    word = tokenizer._byte_chars(data.decode("utf-8"))
    got = merge(tokenizer._pair_table, data).tolist()
    assert got == list(tokenizer._ids(tokenizer._merge_fast(word)))
    assert got == list(reference_loop._ids(reference_loop._merge_reference(word)))


def _toy_tokenizer(merges):
    """A byte-level vocabulary with the given merges (on letters), in which merged tokens need
    not come before the pairs that contain them: the rounds must fall back to one merge at a time."""
    from gpt2np import Tokenizer
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [a + b for a, b in merges]
    encoder = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    return Tokenizer(encoder, merges, gpt2_vocab=False)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="abc", min_size=1, max_size=600))
def test_rounds_equal_the_loop_for_any_merge_order(text):
    # ("bb", "bb") ranks below ("b", "b"), which makes "bb"; ("cc", "cc") below ("c", "c")
    tok = _toy_tokenizer([("b", "c"), ("bb", "bb"), ("a", "bc"), ("cc", "cc"), ("a", "b"), ("ab", "c"), ("a", "a"),
                          ("c", "c"), ("aa", "a"), ("b", "b"), ("bbbb", "a"), ("ab", "ab"), ("c", "abc"),
                          ("aaa", "bc")])
    from gpt2np.bpe_long import merge
    expected = list(tok._ids(tok._merge_reference(text)))
    assert merge(tok._pair_table, text.encode()).tolist() == expected
    assert tok.encode(text * 4) == list(tok._ids(tok._merge_reference(text * 4)))


def test_limit_refuses_a_huge_text_without_encoding_it(tokenizer, monkeypatch):
    from gpt2np.tokenizer import TokenLimitError
    assert tokenizer.longest_token == max(len(tokenizer.decode_bytes([i])) for i in range(50257))
    text = "x" * (1024 * tokenizer.longest_token + 1)
    monkeypatch.setattr(tokenizer, "_encode", lambda *a: pytest.fail("a text too long by its length was encoded"))
    with pytest.raises(TokenLimitError) as e:
        tokenizer.encode(text, limit=1024)
    assert e.value.limit == 1024 and e.value.at_least == 1025 and e.value.field == "prompt"


def test_limit_counts_exactly_below_the_length_bound(tokenizer):
    from gpt2np.tokenizer import TokenLimitError
    text = "Hello world" * 100
    n = len(tokenizer.encode(text))
    assert tokenizer.encode(text, limit=n) == tokenizer.encode(text)
    with pytest.raises(TokenLimitError) as e:
        tokenizer.encode(text, limit=n - 1)
    assert e.value.at_least == n
    with pytest.raises(TokenLimitError):
        tokenizer.encode("<|endoftext|>" * 3, allowed_special=True, limit=2)
    assert tokenizer.encode("<|endoftext|>" * 3, allowed_special=True, limit=3) == [50256] * 3
