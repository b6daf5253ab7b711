"""The paper's copy tasks (section 3.2), generated: ``data.name: copy``.

One episode: ``length`` random symbols (ids 0..symbols-1), a stop token (id ``symbols``), then
``repeats x length`` blank tokens (id ``symbols + 1``) during which the model must output the
symbols again, ``repeats`` times (Copy: 1; Repeat Copy: more). Only those outputs are targets;
every other position's label is -1 (ignored by the loss and the accuracy), so bits per character
are over the copied symbols. Episodes follow each other in one stream, cut into windows of
``context`` tokens (the truncated-BPTT segments of an LSTM, :mod:`dni.recurrent`): to copy, the
model must carry each symbol for ``length + 1`` steps, longer than a window when ``length >= T``.
Each split is drawn from its own seed, so no episode is shared.
"""

from __future__ import annotations

import torch

from dni.data.dataset import IGNORE_LABEL, ArrayDataset, DataError, Splits

SYMBOLS = 8
TEST_EPISODES = 1000


def episodes(count: int, *, length: int, repeats: int, symbols: int = SYMBOLS,
             generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` episodes as one stream: (inputs, labels), each of ``count * (length + 1 + repeats * length)`` ids."""
    seq = torch.randint(0, symbols, (count, length), generator=generator)
    stop = torch.full((count, 1), symbols)
    blank = torch.full((count, repeats * length), symbols + 1)
    inputs = torch.cat([seq, stop, blank], 1)
    ignored = torch.full((count, length + 1), IGNORE_LABEL)
    labels = torch.cat([ignored, seq.repeat(1, repeats)], 1)
    return inputs.flatten(), labels.flatten()


def stream_windows(inputs: torch.Tensor, labels: torch.Tensor, *, context: int, num_classes: int) -> ArrayDataset:
    """Consecutive windows of ``context`` tokens of one stream, its labels alongside (the tail that fills
    no window is left out)."""
    count = len(inputs) // context
    return ArrayDataset(inputs[:count * context].view(count, context).clone(),
                        labels[:count * context].view(count, context).clone(), num_classes)


def load_copy(*, length: int, repeats: int, episodes_train: int, val_size: int, context: int, seed: int) -> Splits:
    """Train, validation and test streams of the copy task (``val_size`` validation episodes,
    :data:`TEST_EPISODES` test episodes).

    Raises:
        DataError: a split too short for one window.
    """
    vocab = SYMBOLS + 2
    parts = []
    for split, count in (("train", episodes_train), ("val", val_size), ("test", TEST_EPISODES)):
        g = torch.Generator().manual_seed(seed * 1_000 + {"train": 1, "val": 2, "test": 3}[split])
        inputs, labels = episodes(count, length=length, repeats=repeats, generator=g)
        if count and len(inputs) < context:
            raise DataError(f"data: {count} {split} episodes of the copy task are {len(inputs)} tokens, fewer than "
                            f"one window of data.context={context}: give more episodes")
        parts.append(stream_windows(inputs, labels, context=context, num_classes=vocab))
    return Splits(train=parts[0], val=parts[1], test=parts[2])
