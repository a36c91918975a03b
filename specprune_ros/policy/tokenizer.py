"""A word-level tokenizer over the closed vocabulary of the simulated tasks.

The reference VLA is trained from scratch, so a subword tokenizer would only add unseen pieces; a fixed
word list keeps instructions exact and the embedding table tiny. Unknown words map to ``<unk>``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

PAD, UNK = '<pad>', '<unk>'
_WORD = re.compile(r"[a-z0-9]+")


@dataclass(frozen=True)
class WordTokenizer:
    """Maps an instruction to a fixed-length row of word ids (padding after the words)."""

    vocabulary: tuple[str, ...]
    max_words: int = 12

    @property
    def tokens(self) -> tuple[str, ...]:
        return (PAD, UNK, *self.vocabulary)

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def words(self, instruction: str) -> list[str]:
        """Lower-cased words of an instruction, truncated to ``max_words``."""
        return _WORD.findall(instruction.lower())[: self.max_words]

    def word_count(self, instruction: str) -> int:
        """How many words the instruction has before truncation (a policy refuses more than ``max_words``)."""
        return len(_WORD.findall(instruction.lower()))

    def unknown_words(self, instruction: str) -> list[str]:
        """The instruction's words outside the vocabulary (each once, in order; they would read as ``<unk>``)."""
        known = set(self.vocabulary)
        return list(dict.fromkeys(w for w in _WORD.findall(instruction.lower()) if w not in known))

    def encode(self, instruction: str) -> tuple[list[int], int]:
        """(ids padded to ``max_words``, number of real words)."""
        index = {token: i for i, token in enumerate(self.tokens)}
        ids = [index.get(word, 1) for word in self.words(instruction)]
        return ids + [0] * (self.max_words - len(ids)), len(ids)
