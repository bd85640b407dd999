"""An exponential moving average of an SAE's trained weights (Gao et al. 2024, appendix A.3:
decay 0.999 "in all experiments"), the weights its evaluation reads.

After every optimizer step t = 1, 2, … (and the architecture's post-step hook, so the average
is of the weights as constrained), each trained parameter w keeps a shadow

    w̄_t = β · w̄_{t−1} + (1 − β) · w_t,   w̄_0 = 0,

and the averaged weights are the bias-corrected ŵ_t = w̄_t / (1 − β^t): a weighted mean of
w_1 … w_t whose weights sum to 1 (openai/sparse_autoencoder's ``EmaModel``, which updates
just before the step instead). Buffers (the normalisation's μ and s, BatchTopK's threshold)
are not averaged. The shadows and t are part of the checkpoint, beside the raw weights
Adam continues from, so a resumed run ends with the same average; at the end of training
the averaged weights replace the raw ones in the module, and ``sae.safetensors`` holds them.
Averaged unit-norm decoder rows are not exactly unit norm; nothing renormalises them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class WeightAverage:
    """The moving average of ``module``'s trained parameters with decay β (0 < β < 1)."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.module, self.decay, self.steps = module, decay, 0
        self.names = [name for name, parameter in module.named_parameters() if parameter.requires_grad]
        self.shadows = [torch.zeros_like(module.get_parameter(name), requires_grad=False) for name in self.names]

    def parameters(self) -> list[torch.Tensor]:
        """The module's trained parameters, in ``names`` order."""
        return [self.module.get_parameter(name) for name in self.names]

    @torch.no_grad()
    def update(self) -> None:
        """w̄ ← β w̄ + (1 − β) w for every trained parameter (one fused pass over them)."""
        torch._foreach_lerp_(self.shadows, [parameter.detach() for parameter in self.parameters()], 1 - self.decay)
        self.steps += 1

    @torch.no_grad()
    def averaged(self) -> list[torch.Tensor]:
        """The bias-corrected averages ŵ = w̄ / (1 − β^t); the raw weights before any step."""
        if self.steps == 0:
            return [parameter.detach().clone() for parameter in self.parameters()]
        correction = 1 - self.decay**self.steps
        return [shadow / correction for shadow in self.shadows]

    @torch.no_grad()
    def install(self) -> None:
        """Replace the module's trained weights by their averages, for good (end of training)."""
        for parameter, average in zip(self.parameters(), self.averaged()):
            parameter.copy_(average)

    @contextmanager
    def installed(self) -> Iterator[None]:
        """The averaged weights in the module inside the block, the raw ones back after it."""
        raw = [parameter.detach().clone() for parameter in self.parameters()]
        self.install()
        try:
            yield
        finally:
            with torch.no_grad():
                for parameter, value in zip(self.parameters(), raw):
                    parameter.copy_(value)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: the shadows by parameter name and t."""
        return {"shadows": dict(zip(self.names, self.shadows)), "steps": self.steps}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The inverse of ``state_dict`` (shadows copied onto the module's device)."""
        for name, shadow in zip(self.names, self.shadows):
            shadow.copy_(state["shadows"][name])
        self.steps = state["steps"]


def weight_average(module: nn.Module, decay: float) -> WeightAverage | None:
    """The average of ``module``'s weights with decay ``decay``; None for 0 (no average: the
    raw weights are evaluated)."""
    return WeightAverage(module, decay) if decay > 0 else None


@contextmanager
def evaluated_weights(average: WeightAverage | None) -> Iterator[None]:
    """The weights an evaluation reads inside the block: the average's where there is one."""
    if average is None:
        yield
        return
    with average.installed():
        yield
