"""The ``reviews`` sentiment task under ``examples/data/`` (hand-written, CC0), tokenized to fixed shapes.

Every sentence is padded to one length, so each batch has the same shape and a jit-compiled
Flax step compiles once. The order of training batches is fixed by the seed and shared by both
frameworks, which is what makes a run reproducible and the two loss curves comparable.

Example
-------
>>> rows = read_jsonl(DATA_DIR / "test.jsonl")
>>> len(rows), sorted({row["label"] for row in rows}) == list(LABELS)
(80, True)
>>> batch_schedule(num_examples=5, batch_size=2, steps=4, seed=0).shape
(4, 2)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DATA_DIR", "LABELS", "Split", "batch_schedule", "load_reviews", "read_jsonl"]

DATA_DIR = Path(__file__).resolve().parent / "data"
LABELS: tuple[str, ...] = ("negative", "positive")


@dataclasses.dataclass(frozen=True)
class Split:
    """One tokenized split: ``input_ids`` and ``attention_mask`` ``(n, seq)`` int32, ``labels`` ``(n,)``."""

    texts: list[str]
    input_ids: np.ndarray
    attention_mask: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(input_ids, attention_mask, labels)`` of the rows at ``index``."""
        return self.input_ids[index], self.attention_mask[index], self.labels[index]


def read_jsonl(path: str | Path) -> list[dict[str, str]]:
    """Read ``{"text": ..., "label": ...}`` rows; an unknown label or a malformed line names the line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{str(path)!r} line {number}: not JSON ({exc})") from None
            if (
                not isinstance(row, dict)
                or not isinstance(row.get("text"), str)
                or row.get("label") not in LABELS
            ):
                raise ValueError(
                    f"{str(path)!r} line {number}: expected {{'text': str, 'label': one of {list(LABELS)}}}, "
                    f"got {line.strip()[:80]!r}"
                )
            rows.append(row)
    return rows


def load_reviews(tokenizer: Any, data_dir: str | Path = DATA_DIR) -> tuple[Split, Split]:
    """Tokenize ``train.jsonl`` and ``test.jsonl``, both padded to the longest sentence of either."""
    train_rows = read_jsonl(Path(data_dir) / "train.jsonl")
    test_rows = read_jsonl(Path(data_dir) / "test.jsonl")
    texts = [row["text"] for row in train_rows + test_rows]
    encoded = tokenizer(texts, padding="longest", return_tensors="np")
    ids = encoded["input_ids"].astype(np.int32)
    mask = encoded["attention_mask"].astype(np.int32)
    labels = np.array([LABELS.index(row["label"]) for row in train_rows + test_rows], dtype=np.int32)
    n = len(train_rows)
    train = Split([r["text"] for r in train_rows], ids[:n], mask[:n], labels[:n])
    test = Split([r["text"] for r in test_rows], ids[n:], mask[n:], labels[n:])
    return train, test


def batch_schedule(num_examples: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
    """Row indices of every training batch, ``(steps, batch_size)``: one fresh permutation of the
    training set per epoch, an epoch's incomplete last batch dropped, all fixed by ``seed``."""
    if not 1 <= batch_size <= num_examples:
        raise ValueError(
            f"batch_size must be between 1 and the {num_examples} training examples, got {batch_size}"
        )
    rng = np.random.default_rng(seed)
    per_epoch = num_examples // batch_size
    epochs = -(-steps // per_epoch) if steps else 0
    batches = [
        rng.permutation(num_examples)[: per_epoch * batch_size].reshape(per_epoch, batch_size)
        for _ in range(epochs)
    ]
    if not batches:
        return np.zeros((0, batch_size), dtype=np.int64)
    return np.concatenate(batches)[:steps]
