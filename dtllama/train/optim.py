"""The optimizer of a training loop: AdamW with decay groups, the LR schedule, and a step guarded against non-finite
losses and gradients."""

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


LR_SCHEDULES = ("constant", "linear", "cosine")


def lr_multiplier(step: int, warmup: int, total: int, schedule: str = "cosine", floor: float = 0.1) -> float:
    """The LR factor after `step` optimizer steps: linear warm-up over `warmup` steps to 1, then constant, or a
    linear or cosine decay to `floor` at `total` steps (torchtitan's and HF's shapes)."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"LR schedule {schedule!r} is unknown; choose one of {list(LR_SCHEDULES)}")
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min((step - warmup) / (total - warmup), 1.0)
    decay = 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return floor + (1.0 - floor) * decay


def adamw(model: torch.nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95)) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm weights and biases are not decayed), fused on GPU."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    fused = all(p.device.type == "cuda" for p in decay + no_decay)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=betas, fused=fused)
