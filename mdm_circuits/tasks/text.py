"""Text to tokens the way a model sees it inside a prompt.

A prompt starts the text (with the tokenizer's own special tokens, such as Llama's BOS). Any later piece
(an answer, a right-hand context) is tokenized as a continuation, in context: SentencePiece tokenizers
(Llama) write " Mary" on its own as "▁" "▁Mary", but after other text as "▁Mary" alone.
"""

from __future__ import annotations

from typing import Sequence

import tokenizers

_CONTEXT = "x"


def prompt(tokenizer: tokenizers.Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text).ids


def continuation(tokenizer: tokenizers.Tokenizer, text: str) -> list[int]:
    """The tokens of `text` when it follows other text."""
    context = tokenizer.encode(_CONTEXT, add_special_tokens=False).ids
    full = tokenizer.encode(_CONTEXT + text, add_special_tokens=False).ids
    if full[: len(context)] != context:  # the piece merged into the context: tokenize it alone instead
        return tokenizer.encode(text, add_special_tokens=False).ids
    return full[len(context):]


def single_tokens(tokenizer: tokenizers.Tokenizer, words: Sequence[str]) -> dict[str, int]:
    """The words that are one known token mid-sentence (with their leading space), and that token."""
    ids = {}
    for word in words:
        encoded = continuation(tokenizer, " " + word)
        if len(encoded) == 1 and tokenizer.decode(encoded).strip() == word:
            ids[word] = encoded[0]
    return ids


def unknown_token(tokenizer: tokenizers.Tokenizer) -> int | None:
    """The id text outside the vocabulary becomes (`<unk>`), if the tokenizer has one."""
    name = getattr(tokenizer.model, "unk_token", None)
    return None if name is None else tokenizer.token_to_id(name)
