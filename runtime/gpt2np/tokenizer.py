"""GPT-2's byte-level BPE, exactly as OpenAI's `encoder.py` defines it.

Text is split by GPT-2's regex into pieces; each piece's UTF-8 bytes are mapped to printable
characters (`bytes_to_unicode`) and merged pair by pair, lowest merge rank first, as listed in
`merges.txt` (OpenAI's `vocab.bpe`). `vocab.json` (OpenAI's `encoder.json`) maps the result to ids.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Iterable

import regex

from .errors import GPT2Error

# OpenAI's pattern from gpt-2/src/encoder.py, unchanged: case-sensitive contractions, letters,
# numbers, other symbols each with an optional leading space, then whitespace runs.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
ENDOFTEXT = "<|endoftext|>"
_CACHE_LIMIT = 200_000  # pieces; bounds memory on adversarial text
_NO_MERGE = float("inf")


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


class Tokenizer:
    """GPT-2's tokenizer. Build it with `Tokenizer.from_files`, then `encode` and `decode`."""

    def __init__(self, encoder: dict[str, int], merges: list[tuple[str, str]],
                 special_tokens: dict[str, int] | None = None):
        self.encoder = encoder
        self.decoder = {i: s for s, i in encoder.items()}
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.special_tokens = dict(special_tokens or {})
        if ENDOFTEXT in encoder and not special_tokens:
            self.special_tokens[ENDOFTEXT] = encoder[ENDOFTEXT]
        self.special_ids = set(self.special_tokens.values())
        byte_encoder = bytes_to_unicode()
        # bytes.decode("latin-1") maps byte b to chr(b); this table then maps chr(b) to GPT-2's char.
        self._byte_table = str.maketrans({chr(b): c for b, c in byte_encoder.items()})
        self._byte_decoder = {c: b for b, c in byte_encoder.items()}
        self._token_bytes = {i: bytes(self._byte_decoder[c] for c in s) for s, i in encoder.items()
                             if all(c in self._byte_decoder for c in s)}
        for s, i in self.special_tokens.items():
            self._token_bytes[i] = s.encode("utf-8")
        self._pattern = regex.compile(GPT2_PATTERN)
        self._cache: dict[str, tuple[int, ...]] = {}
        self._special_pattern = (regex.compile("|".join(regex.escape(s) for s in self.special_tokens))
                                 if self.special_tokens else None)

    @classmethod
    def from_files(cls, vocab_path: str | Path, merges_path: str | Path) -> "Tokenizer":
        """Load `vocab.json` (OpenAI's `encoder.json`) and `merges.txt` (OpenAI's `vocab.bpe`)."""
        try:
            encoder = json.loads(Path(vocab_path).read_bytes().decode("utf-8"))
        except FileNotFoundError:
            raise GPT2Error(f"{vocab_path}: not found") from None
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise GPT2Error(f"{vocab_path}: not a valid JSON file ({e})") from None
        if not isinstance(encoder, dict) or not all(type(v) is int for v in encoder.values()):
            raise GPT2Error(f"{vocab_path}: must map token strings to integer ids")
        try:
            lines = Path(merges_path).read_bytes().decode("utf-8").split("\n")
        except FileNotFoundError:
            raise GPT2Error(f"{merges_path}: not found") from None
        except (OSError, UnicodeDecodeError) as e:
            raise GPT2Error(f"{merges_path}: cannot read ({e})") from None
        if lines and lines[0].startswith("#version"):
            lines = lines[1:]
        merges = []
        for n, line in enumerate(lines, start=2):
            if not line:
                continue
            parts = line.split(" ")
            if len(parts) != 2 or not all(parts):
                raise GPT2Error(f"{merges_path}:{n}: a merge must be two tokens separated by one space")
            merges.append((parts[0], parts[1]))
        return cls(encoder, merges)

    @property
    def n_vocab(self) -> int:
        return len(self.encoder)

    def encode(self, text: str, *, allowed_special: bool | Iterable[str] = False) -> list[int]:
        """Encode `text` to token ids, exactly as GPT-2's reference BPE does.

        Special tokens such as `<|endoftext|>` are encoded as ordinary text unless allowed:
        `allowed_special=True` turns every occurrence of every special token into its id, or
        pass a set of the special token strings to allow. Lone surrogates (not valid Unicode)
        are replaced by U+FFFD first, as tiktoken does.
        """
        if allowed_special is True:
            allowed = set(self.special_tokens)
        elif allowed_special is False:
            allowed = set()
        else:
            allowed = set(allowed_special)
            unknown = allowed - set(self.special_tokens)
            if unknown:
                raise GPT2Error(f"unknown special tokens: {sorted(unknown)}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
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

    def _encode_ordinary(self, text: str) -> list[int]:
        ids: list[int] = []
        cache = self._cache
        for piece in self._pattern.findall(text):
            cached = cache.get(piece)
            if cached is None:
                cached = self._bpe(piece.encode("utf-8").decode("latin-1").translate(self._byte_table))
                if len(cache) >= _CACHE_LIMIT:
                    cache.clear()
                cache[piece] = cached
            ids += cached
        return ids

    def _bpe(self, word: str) -> tuple[int, ...]:
        encoder, ranks = self.encoder, self.ranks
        parts = list(word)
        while len(parts) > 1:
            pair = min(zip(parts, parts[1:]), key=lambda p: ranks.get(p, _NO_MERGE))
            if pair not in ranks:
                break
            first, second = pair
            merged, i = [], 0
            while i < len(parts):  # merge every occurrence, left to right, like encoder.py
                if i + 1 < len(parts) and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        try:
            return tuple(encoder[p] for p in parts)
        except KeyError as e:
            raise GPT2Error(f"tokenizer: BPE produced {e.args[0]!r}, which is not in vocab.json") from None

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The exact bytes the tokens stand for (may end inside a UTF-8 character)."""
        try:
            return b"".join(self._token_bytes[i] for i in ids)
        except (KeyError, TypeError):
            bad = next(i for i in ids if i not in self._token_bytes)
            raise GPT2Error(f"token id {bad!r} is not in the vocabulary (0..{self.n_vocab - 1})") from None

    def decode(self, ids: Iterable[int]) -> str:
        """Decode token ids to text. Bytes that are not valid UTF-8 become U+FFFD, as in GPT-2."""
        return self.decode_bytes(list(ids)).decode("utf-8", errors="replace")

    def stream_decoder(self) -> "StreamDecoder":
        """A decoder for one token at a time that never emits half of a UTF-8 character."""
        return StreamDecoder(self)


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
