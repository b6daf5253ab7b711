"""How well a synthesizer predicts its targets, measured on the targets it is trained on.

A synthesizer that predicts zero has loss ``E[target^2]``; one that predicts every target
has loss 0. :class:`SynthesizerFit` keeps an exponential moving average of both on the
batches the synthesizer is trained on and reports the fraction of the targets' power it
explains, ``1 - loss / zero_loss`` (clipped to [0, 1]): an R^2 around zero. It needs nothing
but the stage's own regression, so it is the same on every backend and costs one square
per target.

``synthesizer.gate: fit`` scales an update-unlocked stage's step by this fraction: while
its synthesizer is still uninformative (predicting about zero, the state a zero-initialised
output layer starts in) the stage barely moves instead of taking full-size, mostly random
steps (Adam normalises a tiny gradient to a full step), and it learns at the full rate once
the synthesizer explains its targets.
"""

from __future__ import annotations

DECAY = 0.99
"""Weight of the past in the averages: a horizon of about 100 targets."""


class SynthesizerFit:
    """Moving averages of a synthesizer's regression loss and of the zero predictor's.

    Both start at zero, as Adam's moments do; they need no bias correction here, because the
    corrections of the two would be equal and cancel in their ratio, so the first targets count in full.
    """

    def __init__(self, decay: float = DECAY) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.loss = 0.0
        self.zero_loss = 0.0
        self.seen = 0

    def add(self, loss: float, zero_loss: float) -> None:
        """One target: the synthesizer's loss on it (before its update) and the zero predictor's."""
        self.loss = self.decay * self.loss + (1.0 - self.decay) * loss
        self.zero_loss = self.decay * self.zero_loss + (1.0 - self.decay) * zero_loss
        self.seen += 1

    @property
    def explained(self) -> float:
        """``1 - loss / zero_loss`` of the averages, in [0, 1]; 0 before the first target."""
        if self.seen == 0 or self.zero_loss <= 0.0:
            return 0.0
        # The bias corrections of the two averages are equal and cancel in the ratio.
        return min(max(1.0 - self.loss / self.zero_loss, 0.0), 1.0)

    def state_dict(self) -> dict[str, float | int]:
        return {"loss": self.loss, "zero_loss": self.zero_loss, "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.loss, self.zero_loss, self.seen = float(state["loss"]), float(state["zero_loss"]), int(state["seen"])
