"""The pipeline at run time: this rank's stages and the schedule, microbatches in, the last stage's outputs out."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage

from dtllama.ops import Packed, prepare_batch
from dtllama.ops.packing import Microbatches, split_microbatches

from ..batch_check import agree_on_error
from ..dims import ParallelDims
from .schedules import SCHEDULES, PipelineOptions
from .stages import TiedEmbedding


class Pipeline:
    """This rank's stages, the schedule that runs them, and `model`: this rank's part of the model (what the
    optimizer steps and checkpoints save). Build it with `pipeline_llm`."""

    def __init__(self, model: nn.Module, stage_modules: list[nn.Module], stages: list[PipelineStage], schedule,
                 dims: ParallelDims, options: PipelineOptions, tied: TiedEmbedding | None = None):
        self.model, self.stage_modules, self.stages, self.schedule = model, stage_modules, stages, schedule
        self.dims, self.options, self.tied = dims, options, tied
        self._loss_fn: Callable | None = None
        self._logits_schedule = None  # built at the first forward without labels

    @property
    def has_last_stage(self) -> bool:
        return any(s.is_last for s in self.stages)

    def to_empty(self, device) -> None:
        """Materialize the meta-device parameters (through the FSDP-wrapped stages, which own them)."""
        for m in self.stage_modules:
            m.to_empty(device=device)

    def split(self, batch: Packed) -> "Microbatches":
        """Cut this rank's packed batch into the microbatches of one step; a batch that is invalid or does not fit
        raises the same ValueError on every rank (one all-reduce), before the schedule's first collective."""
        error, mbs = None, None
        try:
            prepare_batch(batch.input_ids, self.model.config.vocab_size, batch.position_ids, batch.cu_seqlens,
                          batch.max_seqlen, batch.labels)
            mbs = split_microbatches(batch, self.options.microbatches, self.options.microbatch_tokens)
        except ValueError as e:
            error = str(e)
        agree_on_error(error, self.dims.mesh("flat"))
        return mbs

    def step(self, mbs: "Microbatches", loss_fn: Callable[[object, int], torch.Tensor]) -> tuple[list, list] | None:
        """Forward and backward over all microbatches. `loss_fn(output, i)` turns the last stage's output of
        microbatch i into the loss to backpropagate (gradients of all microbatches add up; nothing is rescaled).
        The first step may also call it on placeholder outputs (torch infers the stages' shapes with a forward
        and backward), so keep it free of side effects. Returns `(outputs, losses)` of the last stage, detached,
        one per microbatch; None on ranks without the last stage."""
        if self.model.plan().output == "logprobs" and mbs.packed[0].labels is None:
            raise ValueError("a causal LM's pipeline trains on log-probs: pass labels (see dtllama.ops.shift_labels)")
        self._loss_fn = loss_fn
        losses: list[torch.Tensor] = []
        out = self.schedule.step(*self._args(mbs), target=torch.arange(len(mbs.packed)), losses=losses, **mbs.kwargs())
        if self.tied is not None:
            self.tied.sum_gradients(self.model)
        if not self.has_last_stage:
            return None
        return self._outputs(out, mbs), [x.detach() for x in losses]

    @torch.no_grad()
    def forward(self, mbs: "Microbatches") -> list | None:
        """The last stage's outputs of every microbatch, no backward (old / reference log-probs, values; a causal
        LM's logits for microbatches without labels); None on ranks without the last stage."""
        if self.model.plan().output == "logprobs" and mbs.packed[0].labels is None:
            self._logits_schedule = self._logits_schedule or self._eval_schedule()
            out = self._logits_schedule.eval(*self._args(mbs), **mbs.kwargs())
        else:  # the training schedule computes its loss in eval too: give it one that costs nothing
            self._loss_fn = lambda output, i: torch.zeros(())
            out = self.schedule.eval(*self._args(mbs), target=torch.arange(len(mbs.packed)), **mbs.kwargs())
        return self._outputs(out, mbs) if self.has_last_stage else None

    def _eval_schedule(self):
        """A schedule over new `PipelineStage`s of the same stage modules: torch fixes a stage's output shape at
        its first run, and logits (`[tokens, vocab]`) are not the log-probs the training schedule returns."""
        stages = [PipelineStage(st.submod, st.stage_index, st.num_stages, st.device, group=st.group)
                  for st in self.stages]
        cls = type(self.schedule)
        kwargs = dict(n_microbatches=self.options.microbatches, scale_grads=False)
        single = SCHEDULES[self.options.schedule].placement == "single"
        return cls(stages[0], **kwargs) if single else cls(stages, **kwargs)

    def _args(self, mbs: "Microbatches") -> tuple:
        """Token ids go to the first stage only (torch 2.11 refuses positional inputs on the other ranks)."""
        return mbs.args() if any(s.is_first for s in self.stages) else ()

    def _loss(self, output, target):
        return self._loss_fn(output, int(target))

    def _outputs(self, out, mbs: "Microbatches") -> list:
        m = len(mbs.packed)
        parts = [x.detach().chunk(m) for x in (out if isinstance(out, tuple) else (out,))]
        return [tuple(p[i] for p in parts) if len(parts) > 1 else parts[0][i] for i in range(m)]
