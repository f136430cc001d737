"""First-order MAML (Finn et al. 2017, section 5.2): the inner gradients are treated as constants, so the
meta-gradient of a task is the query-loss gradient at the adapted parameters."""
from __future__ import annotations

from dataclasses import dataclass

from ..schema import POSITIVE_FLOAT, POSITIVE_INT, AlgorithmConfig, required
from .maml import MAML


class FOMAML(MAML):
    @dataclass
    class Config(AlgorithmConfig):  # MAML's keys without first_order: this algorithm is the first-order variant
        inner_steps: int = required(POSITIVE_INT)
        inner_lr: float = required(POSITIVE_FLOAT)
        outer_lr: float = required(POSITIVE_FLOAT)

    name = "fomaml"

    def __init__(self, model, cfg, task_type, total_iterations):
        super().__init__(model, cfg, task_type, total_iterations)
        # Whatever algorithm.first_order says: this algorithm *is* the first-order variant.
        self.first_order = True
        self.maml.first_order = True
