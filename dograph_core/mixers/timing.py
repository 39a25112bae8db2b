"""When a reweighting mixer may update its weights *inside* an optimizer step.

DoReMi's and DoGE's reference trainers update the domain weights from a step's statistics and
use the new weights for that same step (DoReMi's re-weighted loss of the last micro-batch, DoGE's
``sum_k w_k g_k``). The dograph loop calls ``example_weights``/``observe`` per micro-batch and
``update`` after the optimizer step, so a mixer can only match the reference when the step is one
micro-batch on one process: then it updates inside the step (mode ``same_step``). With gradient
accumulation or several processes it updates in ``update()`` from the whole step's reduced
statistics, and the next step uses the new weights (mode ``next_step``).

The number of micro-batches per step is not part of the mixer context, so it is detected: the
first step after a start or resume runs in ``same_step`` mode with a snapshot of the mixer's
state; if a second micro-batch of that step arrives, the snapshot is restored and the mixer
switches to ``next_step`` for good (only that first micro-batch saw early weights).
"""
from __future__ import annotations

from typing import Literal, Optional


class StepTiming:
    def __init__(self, world_size: int):
        self.mode: Literal["same_step", "next_step"] = "same_step" if world_size == 1 else "next_step"
        self.known = world_size != 1  # micro-batches per step confirmed to be one (or irrelevant)
        self.step: Optional[int] = None
        self.micro = 0
        self.done_step: Optional[int] = None  # the step whose update already happened inside the step

    def begin(self, step: int) -> bool:
        """Register a micro-batch of ``step``; True if the in-step update already taken must be undone."""
        if step != self.step:
            if self.step is not None and self.micro == 1:
                self.known = True
            self.step, self.micro = step, 0
        self.micro += 1
        if self.mode == "same_step" and self.micro == 2:
            self.mode, self.known = "next_step", True
            undo = self.done_step == step
            self.done_step = None
            return undo
        return False

    @property
    def in_step(self) -> bool:
        return self.mode == "same_step"

    @property
    def needs_snapshot(self) -> bool:
        return self.mode == "same_step" and not self.known
