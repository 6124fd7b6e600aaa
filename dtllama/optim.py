"""The optimizer step of a training loop, guarded against non-finite losses and gradients."""

from __future__ import annotations

import math

import torch

NONFINITE_POLICIES = ("stop", "skip")


def step_if_finite(optimizer: torch.optim.Optimizer, scheduler, loss: float, grad_norm: float,
                   on_nonfinite: str = "stop") -> bool:
    """Step `optimizer` (and `scheduler`) only if `loss` and `grad_norm` are finite; always clear the gradients.

    One NaN gradient written into AdamW's moments poisons every later step, so a non-finite step
    either stops the run (`"stop"`: FloatingPointError naming both values) or is dropped whole
    (`"skip"`: parameters, optimizer state and LR schedule stay as they were). Pass values that are
    the same on every rank (the loss reduced over the data-parallel ranks, the global gradient norm
    of `clip_grad_norm_`), so that all ranks take the same branch. Returns whether it stepped.
    """
    if on_nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"on_nonfinite={on_nonfinite!r} is unknown; choose one of {list(NONFINITE_POLICIES)}")
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    if finite:
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if not finite and on_nonfinite == "stop":
        raise FloatingPointError(
            f"non-finite training step: loss {loss}, gradient norm {grad_norm}; the optimizer was not stepped. "
            "Lower the learning rate, check the data, or pass on_nonfinite='skip' (--on-nonfinite skip) to drop such steps"
        )
    return finite
