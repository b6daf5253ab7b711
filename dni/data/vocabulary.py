"""A character vocabulary: characters to token ids and back, saved with a run as ``vocab.json``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from dni.data.dataset import DataError

VOCAB_FILE = "vocab.json"


@dataclass(frozen=True)
class Vocabulary:
    """The distinct characters of a text's training part, in code-point order: character ``chars[i]``
    has id ``i``. With ``unknown``, id ``len(chars)`` stands for every character the training part
    lacks (one that only the validation or test part holds)."""

    chars: str
    unknown: bool = False

    @classmethod
    def of(cls, train: str, *others: str) -> "Vocabulary":
        """The vocabulary of ``train``, with an unknown id when one of ``others`` holds a character
        that ``train`` lacks."""
        chars = "".join(sorted(set(train)))
        known = set(chars)
        return cls(chars, any(not set(text) <= known for text in others))

    @property
    def size(self) -> int:
        """Number of ids (the model's classes)."""
        return len(self.chars) + int(self.unknown)

    def encode(self, text: str) -> torch.Tensor:
        """``text`` as int64 ids; characters outside the vocabulary become the unknown id.

        Raises:
            ValueError: a character outside the vocabulary and no unknown id.
        """
        table = {c: i for i, c in enumerate(self.chars)}
        if self.unknown:
            fallback = len(self.chars)
            ids = [table.get(c, fallback) for c in text]
        else:
            try:
                ids = [table[c] for c in text]
            except KeyError as e:
                raise ValueError(f"character {e.args[0]!r} is not in the vocabulary") from None
        return torch.tensor(ids, dtype=torch.int64)

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        """Ids back to text; the unknown id reads as U+FFFD."""
        values = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return "".join(self.chars[i] if i < len(self.chars) else "\ufffd" for i in values)

    def to_dict(self) -> dict[str, Any]:
        return {"chars": self.chars, "unknown": self.unknown, "size": self.size}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Vocabulary":
        """Raises DataError for a dict that :meth:`to_dict` did not write."""
        if not isinstance(d, dict) or not isinstance(d.get("chars"), str) or not isinstance(d.get("unknown"), bool):
            raise DataError(f"not a vocabulary: {str(d)[:80]!r}; expected the contents of a run's {VOCAB_FILE}")
        return cls(d["chars"], d["unknown"])

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, indent=1) + "\n"
