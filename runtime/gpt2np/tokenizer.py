"""GPT-2's byte-level BPE, exactly as OpenAI's `encoder.py` defines it.

Text is split by GPT-2's regex into pieces; each piece's UTF-8 bytes are mapped to printable
characters (`bytes_to_unicode`) and merged pair by pair, lowest merge rank first, as listed in
`merges.txt` (OpenAI's `vocab.bpe`). `vocab.json` (OpenAI's `encoder.json`) maps the result to ids.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import re
from functools import cached_property
from itertools import chain, repeat
from pathlib import Path
from typing import Iterable, NamedTuple

import regex

from .bpe_long import PairTable, merge as merge_long
from .errors import GPT2Error

# OpenAI's pattern from gpt-2/src/encoder.py, unchanged: case-sensitive contractions, letters,
# numbers, other symbols each with an optional leading space, then whitespace runs.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# The same split for ASCII text, twice as fast in `re`: on ASCII characters \p{L}, \p{N} and \s are
# exactly [A-Za-z], [0-9] and [\t\n\v\f\r ] (a test checks all 128).
_ASCII_PATTERN = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+""", re.ASCII)
_NON_ASCII = re.compile(r"[^\x00-\x7f]+")
# A space with non-space on both sides always starts a new piece, whatever comes before it:
# text may be cut there and each part split on its own.
_CUT = regex.compile(r"(?<=\S) (?=\S)")
_LAST_CUT = regex.compile(r"(?r)(?<=\S) (?=\S)")
ENDOFTEXT = "<|endoftext|>"
_CACHE_LIMIT = 200_000  # pieces; bounds memory on adversarial text
_LONG_PIECE = 320  # bytes: from here on a piece is merged in NumPy rounds (`bpe_long`), where the
# pair-at-a-time loop's cost grows with the square of the length (both ~0.75 ms at 256 bytes); such
# pieces are not cached either (a cache of long pieces would hold the text itself)
_NO_MERGE = float("inf")
# SHA-256 of OpenAI's GPT-2 vocab.json/encoder.json and merges.txt/vocab.bpe: the files for which
# `Tokenizer._merge_fast` is proven exact. Other vocabularies take encoder.py's loop.
_GPT2_SHA256 = ("196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
                "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of the 256 byte values to printable Unicode characters."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class TokenLimitError(GPT2Error):
    """`Tokenizer.encode(text, limit=N)`: the text needs more than N tokens. `at_least` is a lower
    bound of how many (the exact count when the whole text was encoded)."""

    def __init__(self, limit: int, at_least: int):
        super().__init__(f"the text needs at least {at_least} tokens, more than the limit of {limit}", "prompt")
        self.limit, self.at_least = limit, at_least


class Tokenizer:
    """GPT-2's tokenizer. Build it with `Tokenizer.from_files`, then `encode` and `decode`."""

    def __init__(self, encoder: dict[str, int], merges: list[tuple[str, str]],
                 special_tokens: dict[str, int] | None = None, gpt2_vocab: bool = False):
        """`gpt2_vocab` enables a faster BPE that is exact for OpenAI's GPT-2 files only;
        `from_files` sets it when the files' SHA-256 are those of GPT-2's."""
        self.encoder = encoder
        self._gpt2_vocab = gpt2_vocab
        self.id_to_token = {i: s for s, i in encoder.items()}  # the vocabulary string of each id
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.special_tokens = dict(special_tokens or {})
        if ENDOFTEXT in encoder and not special_tokens:
            self.special_tokens[ENDOFTEXT] = encoder[ENDOFTEXT]
        byte_encoder = bytes_to_unicode()
        # bytes.decode("latin-1") maps byte b to chr(b); this table then maps chr(b) to GPT-2's char.
        self._byte_table = str.maketrans({chr(b): c for b, c in byte_encoder.items()})
        # The way back: GPT-2's chars to chr(byte), then latin-1 gives the byte. Any other char up to
        # U+017F becomes U+0100, and every char past U+00FF fails latin-1: such a token has no bytes.
        to_bytes = {cp: 0x100 for cp in range(0x180)}
        to_bytes.update({ord(c): b for b, c in byte_encoder.items()})
        self._token_bytes = {}
        for s, i in encoder.items():
            try:
                self._token_bytes[i] = s.translate(to_bytes).encode("latin-1")
            except UnicodeEncodeError:
                pass  # not a byte-level token; decoding it is an error
        for s, i in self.special_tokens.items():
            self._token_bytes[i] = s.encode("utf-8")
        self._byte_tokens = [encoder[byte_encoder[b]] for b in range(256)] if all(
            c in encoder for c in byte_encoder.values()) else None  # byte-level vocabularies have all 256
        # No token is longer than this many bytes, so a text of n bytes needs n / this tokens at least.
        self.longest_token = max(map(len, self._token_bytes.values()), default=1)
        self._pattern = regex.compile(GPT2_PATTERN)
        self._cache: dict[str, tuple[int, ...]] = {}
        self._special_pattern = (regex.compile("|".join(regex.escape(s) for s in self.special_tokens))
                                 if self.special_tokens else None)

    @classmethod
    def from_files(cls, vocab_path: str | Path, merges_path: str | Path) -> "Tokenizer":
        """Load `vocab.json` (OpenAI's `encoder.json`) and `merges.txt` (OpenAI's `vocab.bpe`)."""
        try:
            vocab_bytes = Path(vocab_path).read_bytes()
            encoder = json.loads(vocab_bytes.decode("utf-8"))
        except FileNotFoundError:
            raise GPT2Error(f"{vocab_path}: not found") from None
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise GPT2Error(f"{vocab_path}: not a valid JSON file ({e})") from None
        if not isinstance(encoder, dict) or not all(type(v) is int for v in encoder.values()):
            raise GPT2Error(f"{vocab_path}: must map token strings to integer ids")
        try:
            merges_bytes = Path(merges_path).read_bytes()
            lines = merges_bytes.decode("utf-8").split("\n")
        except FileNotFoundError:
            raise GPT2Error(f"{merges_path}: not found") from None
        except (OSError, UnicodeDecodeError) as e:
            raise GPT2Error(f"{merges_path}: cannot read ({e})") from None
        first = 2 if lines and lines[0].startswith("#version") else 1
        merges = [tuple(line.split(" ")) for line in lines[first - 1:] if line]
        if any(len(m) != 2 or not m[0] or not m[1] for m in merges):
            n = next(n for n, line in enumerate(lines[first - 1:], first)
                     if line and (len(line.split(" ")) != 2 or not all(line.split(" "))))
            raise GPT2Error(f"{merges_path}:{n}: a merge must be two tokens separated by one space")
        digests = (hashlib.sha256(vocab_bytes).hexdigest(), hashlib.sha256(merges_bytes).hexdigest())
        if digests != _GPT2_SHA256:  # OpenAI's own files are known good; check anything else
            _check_vocabulary(encoder, merges, vocab_path, merges_path)
        return cls(encoder, merges, gpt2_vocab=digests == _GPT2_SHA256)

    @property
    def n_vocab(self) -> int:
        return len(self.encoder)

    def encode(self, text: str, *, allowed_special: bool | Iterable[str] = False,
               limit: int | None = None) -> list[int]:
        """Encode `text` to token ids, exactly as GPT-2's reference BPE does.

        Special tokens such as `<|endoftext|>` are encoded as ordinary text unless allowed:
        `allowed_special=True` turns every occurrence of every special token into its id, or
        pass a set of the special token strings to allow. Lone surrogates (not valid Unicode)
        are replaced by U+FFFD first, as tiktoken does.

        `limit`: the most tokens the caller can use. A text that needs more raises
        `TokenLimitError`, without encoding it when its length alone shows it (a text of n
        characters needs at least n / `longest_token` tokens), so refusing a huge text is cheap.
        """
        if limit is not None and len(text) > limit * self.longest_token:
            raise TokenLimitError(limit, -(-len(text) // self.longest_token))
        ids = self._encode(text, allowed_special)
        if limit is not None and len(ids) > limit:
            raise TokenLimitError(limit, len(ids))
        return ids

    def _encode(self, text: str, allowed_special: bool | Iterable[str]) -> list[int]:
        if allowed_special is True:
            allowed = set(self.special_tokens)
        elif allowed_special is False:
            allowed = set()
        else:
            allowed = set(allowed_special)
            unknown = allowed - set(self.special_tokens)
            if unknown:
                raise GPT2Error(f"unknown special tokens: {sorted(unknown)}")
        text = _valid_unicode(text)
        if not allowed:
            return self._encode_ordinary(text)
        ids: list[int] = []
        start = 0
        for m in self._special_pattern.finditer(text):
            if m.group() in allowed:
                ids += self._encode_ordinary(text[start:m.start()])
                ids.append(self.special_tokens[m.group()])
                start = m.end()
        ids += self._encode_ordinary(text[start:])
        return ids

    def split(self, text: str) -> list[str]:
        """GPT-2's pre-tokenization: the pieces that BPE encodes one by one.

        Runs of ASCII text go through the faster `re` pattern; each stretch around non-ASCII
        characters, up to the nearest cuts, through the full Unicode pattern.
        """
        if text.isascii():
            return _ASCII_PATTERN.findall(text)
        pieces: list[str] = []
        done = 0
        for m in _NON_ASCII.finditer(text):
            if m.start() < done:
                continue
            before = _LAST_CUT.search(text, done, m.start() + 1)
            start = before.start() if before else done
            after = _CUT.search(text, m.end())
            end = after.start() if after else len(text)
            pieces += _ASCII_PATTERN.findall(text, done, start)
            pieces += self._pattern.findall(text, start, end)
            done = end
        pieces += _ASCII_PATTERN.findall(text, done)
        return pieces

    def explain(self, text: str) -> list["Piece"]:
        """How `encode` (without special tokens) cuts `text`, step by step: for each regex piece,
        its bytes as GPT-2's printable characters, the merges applied in rank order (encoder.py's
        loop, one rule at a time) and the resulting tokens. Their ids, joined, are `encode(text)`."""
        out = []
        for piece in self.split(_valid_unicode(text)):
            chars, merges = self._byte_chars(piece), []
            parts = self._merge_reference(chars, merges)
            out.append(Piece(piece, chars, merges, parts, list(self._ids(parts))))
        return out

    def _encode_ordinary(self, text: str) -> list[int]:
        pieces = self.split(text)
        cache = self._cache
        try:  # the common case: every piece seen before
            return list(chain.from_iterable(map(cache.__getitem__, pieces)))
        except KeyError:
            pass
        missing = [piece for piece in set(pieces) if piece not in cache]
        if len(cache) + len(missing) > _CACHE_LIMIT:
            cache.clear()
            missing = set(pieces)
        long = {}
        for piece in missing:
            (long if len(piece) >= _LONG_PIECE else cache)[piece] = self._bpe_piece(piece)
        if long:
            return list(chain.from_iterable(long[p] if p in long else cache[p] for p in pieces))
        return list(chain.from_iterable(map(cache.__getitem__, pieces)))

    def _bpe_piece(self, piece: str) -> tuple[int, ...]:
        """Token ids of one piece: from `_LONG_PIECE` bytes on in NumPy rounds (`bpe_long`)."""
        if len(piece) * 4 >= _LONG_PIECE and self._byte_tokens is not None:  # it may be that long in UTF-8
            data = piece.encode("utf-8")
            if len(data) >= _LONG_PIECE:
                return tuple(merge_long(self._pair_table, data).tolist())
        return self._bpe(self._byte_chars(piece))

    @cached_property
    def _pair_table(self) -> PairTable:
        """The merges as arrays for `bpe_long`, built the first time a long piece comes (~50 ms)."""
        return PairTable(self.ranks, self.encoder, self._byte_tokens)

    def _byte_chars(self, piece: str) -> str:
        """The piece's UTF-8 bytes as GPT-2's printable characters (what BPE merges)."""
        return piece.encode("utf-8").decode("latin-1").translate(self._byte_table)

    def _bpe(self, word: str) -> tuple[int, ...]:
        """Token ids of one piece (already mapped to GPT-2's byte characters)."""
        return self._ids(self._merge_fast(word) if self._gpt2_vocab else self._merge_reference(word))

    def _ids(self, parts: list[str]) -> tuple[int, ...]:
        try:
            return tuple(map(self.encoder.__getitem__, parts))
        except KeyError as e:
            raise GPT2Error(f"tokenizer: BPE produced {e.args[0]!r}, which is not in vocab.json") from None

    def _merge_reference(self, word: str, record: list | None = None) -> list[str]:
        """encoder.py's loop: merge every occurrence of the lowest-ranked pair, left to right; repeat.
        `record` (a list) receives each merge applied, as (left, right, rank), in order."""
        get = self.ranks.get
        parts = list(word)
        while len(parts) > 1:
            ranks = list(map(get, zip(parts, parts[1:]), repeat(_NO_MERGE)))
            best = min(ranks)
            if best == _NO_MERGE:
                break
            i = ranks.index(best)
            if record is not None:
                record.append((parts[i], parts[i + 1], best))
            parts = _merge_all(parts, parts[i], parts[i + 1], i)
        return parts

    def _merge_fast(self, word: str) -> list[str]:
        """The same result for GPT-2's vocabulary, about twice as fast.

        A whole-token piece is its own result, and merging one occurrence at a time while updating
        only the two neighbouring pair ranks equals encoder.py's loop. Both hold because in GPT-2's
        merges every token is built before any pair that contains it (tests check both facts).
        """
        if word in self.encoder:
            return [word]
        get = self.ranks.get
        parts = list(word)
        ranks = list(map(get, zip(parts, parts[1:]), repeat(_NO_MERGE)))
        while ranks:
            best = min(ranks)
            if best == _NO_MERGE:
                break
            i = ranks.index(best)
            merged = parts[i] + parts[i + 1]
            parts[i:i + 2] = [merged]
            if i + 1 < len(parts):
                ranks[i:i + 2] = [get((merged, parts[i + 1]), _NO_MERGE)]
            else:
                del ranks[i]
            if i:
                ranks[i - 1] = get((parts[i - 1], merged), _NO_MERGE)
        return parts

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The exact bytes the tokens stand for (may end inside a UTF-8 character)."""
        try:
            return b"".join(self._token_bytes[i] for i in ids)
        except (KeyError, TypeError):
            bad = next(i for i in ids if i not in self._token_bytes)
            raise GPT2Error(f"token id {bad!r} is not in the vocabulary (0..{self.n_vocab - 1})") from None

    def token_bytes(self) -> dict[int, bytes]:
        """Every token id's bytes (a special token's: its text in UTF-8), as `decode_bytes` gives them."""
        return dict(self._token_bytes)

    def decode(self, ids: Iterable[int]) -> str:
        """Decode token ids to text. Bytes that are not valid UTF-8 become U+FFFD, as in GPT-2."""
        return self.decode_bytes(list(ids)).decode("utf-8", errors="replace")

    def stream_decoder(self) -> "StreamDecoder":
        """A decoder for one token at a time that never emits half of a UTF-8 character."""
        return StreamDecoder(self)

    def decode_pieces(self, ids: Iterable[int]) -> list[str]:
        """Each token's text, as a stream decodes them: a character split across tokens comes with
        the token that completes it (and an unfinished one, as U+FFFD, with the last). They join
        to `decode(ids)`."""
        decoder = self.stream_decoder()
        pieces = [decoder.feed(i) for i in ids]
        if pieces:
            pieces[-1] += decoder.flush()
        return pieces


def _valid_unicode(text: str) -> str:
    """`text` with lone surrogates (not valid Unicode, e.g. from undecodable bytes in argv)
    replaced by U+FFFD, as tiktoken does."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _check_vocabulary(encoder: dict[str, int], merges: list[tuple[str, str]], vocab_path, merges_path) -> None:
    """A byte-level BPE vocabulary the tokenizer can use without surprises, or a clear error."""
    if sorted(encoder.values()) != list(range(len(encoder))):
        raise GPT2Error(f"{vocab_path}: token ids must be 0..{len(encoder) - 1}, each used once")
    byte_chars = set(bytes_to_unicode().values())
    missing = [c for c in byte_chars if c not in encoder]
    if missing:
        raise GPT2Error(f"{vocab_path}: {len(missing)} of the 256 byte tokens are missing (e.g. {missing[0]!r})")
    for token in encoder:
        if token != ENDOFTEXT and not set(token) <= byte_chars:
            raise GPT2Error(f"{vocab_path}: token {token[:50]!r} is not made of GPT-2's byte characters")
    for n, (first, second) in enumerate(merges, start=2):
        for part in (first, second, first + second):
            if part not in encoder:
                raise GPT2Error(f"{merges_path}:{n}: merge {first} {second} needs {part[:50]!r}, "
                                "which is not in vocab.json")


def _merge_all(parts: list[str], first: str, second: str, i: int) -> list[str]:
    """`parts` with every occurrence of the pair (first, second), from index i on, merged left to right."""
    merged, n = parts[:i], len(parts)
    while True:
        merged.append(first + second)
        i += 2
        k = i
        while True:  # the next occurrence of the pair: list.index does the scanning in C
            try:
                k = parts.index(first, k)
            except ValueError:
                return merged + parts[i:]
            if k + 1 < n and parts[k + 1] == second:
                break
            k += 1
        merged += parts[i:k]
        i = k


class Piece(NamedTuple):
    """One regex piece of a text and how BPE turned it into tokens (see `Tokenizer.explain`)."""
    text: str
    byte_chars: str  # the piece's UTF-8 bytes as GPT-2's printable characters
    merges: list[tuple[str, str, int]]  # (left, right, rank in merges.txt), in the order applied
    tokens: list[str]
    ids: list[int]


class StreamDecoder:
    """Turns a stream of token ids into text pieces, holding back incomplete UTF-8 sequences.

    The concatenation of every `feed` result and the final `flush` equals `decode(all ids)`.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        return self._utf8.decode(self._tokenizer.decode_bytes([token_id]))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
