"""The tokenizer every stage shares: HF `tokenizers` with our own padding and explicit truncation."""

from __future__ import annotations

import json
import os
import pathlib
from typing import Sequence

import numpy as np
import tokenizers

from bixse_jax.errors import UserError

_PAD_TOKENS = ("[PAD]", "<pad>")
# vocab.txt gives a BertWordPieceTokenizer wrapper; it has the same methods we use.
_AnyTokenizer = tokenizers.Tokenizer | tokenizers.implementations.BaseTokenizer


class Tokenizer:
    """A `tokenizers` tokenizer with padding off and explicit truncation."""

    def __init__(self, tok: _AnyTokenizer, *, pad_id: int | None = None, fallback_pad_id: int | None = None,
                 append_id: int | None = None):
        """`fallback_pad_id`: the pad id when the tokenizer names no pad token (decoder LLMs often
        do not; their eos is a sensible filler, since the attention mask hides padding anyway).
        `append_id`: a token put after every text's last one (truncation keeps room for it), e.g.
        the eos a last-token-pooling model expects when its tokenizer does not add one."""
        if pad_id is None:
            pad_id = _find_pad_id(tok, fallback_pad_id)
        self.append_id = append_id
        # Padding is ours (to length buckets); a tokenizer.json often fixes it to 128.
        tok.no_padding()
        tok.no_truncation()
        self._tok = tok
        self.pad_id: int = pad_id
        self.vocab_size: int = tok.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_model_dir(cls, path: str | os.PathLike, **kwargs) -> "Tokenizer":
        """Loads tokenizer.json, else builds a WordPiece tokenizer from vocab.txt; kwargs: __init__'s."""
        path = pathlib.Path(path)
        if (path / "tokenizer.json").is_file():
            return cls(tokenizers.Tokenizer.from_file(str(path / "tokenizer.json")), **kwargs)
        if (path / "vocab.txt").is_file():
            lowercase = True
            config = path / "tokenizer_config.json"
            if config.is_file():
                lowercase = bool(json.loads(config.read_text()).get("do_lower_case", True))
            wordpiece = tokenizers.BertWordPieceTokenizer(
                str(path / "vocab.txt"), lowercase=lowercase)
            return cls(wordpiece, **kwargs)
        raise FileNotFoundError(
            f"{path}: no tokenizer found (expected tokenizer.json or vocab.txt)")

    def encode(self, texts: Sequence[str], max_len: int, *, add_special_tokens: bool = True) -> list[np.ndarray]:
        """Token ids with special tokens (unless `add_special_tokens=False`, for text that already
        holds them, such as a rendered chat template), truncated to max_len (final [SEP] kept)."""
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        if not texts:
            return []
        appended = self.append_id is not None
        if appended and max_len < 2:
            raise ValueError(f"max_len must be >= 2 to append a token, got {max_len}")
        self._tok.enable_truncation(max_length=max_len - appended)
        try:
            encodings = self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        finally:
            self._tok.no_truncation()
        if appended:
            return [np.asarray(e.ids + [self.append_id], dtype=np.int32) for e in encodings]
        return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids, special tokens dropped (e.g. a document cut to a token budget)."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def check_vocab(self, model_vocab_size: int, source: str) -> None:
        """Fails early when the tokenizer can emit ids the embedding table lacks."""
        largest = max(self._tok.get_vocab(with_added_tokens=True).values())
        if largest >= model_vocab_size:
            raise UserError(
                f"{source}: tokenizer emits ids up to {largest} but the model's "
                f"vocab_size is {model_vocab_size}; tokenizer and checkpoint do not match")


def _find_pad_id(tok: _AnyTokenizer, fallback: int | None = None) -> int:
    if tok.padding is not None:
        return int(tok.padding["pad_id"])
    for token in _PAD_TOKENS:
        token_id = tok.token_to_id(token)
        if token_id is not None:
            return token_id
    return 0 if fallback is None else fallback
