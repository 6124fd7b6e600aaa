"""Parallelisms applied to a dtllama model from outside, one module and one `apply_*` each."""

from .ac import AC_MODES, apply_ac
from .compile import apply_compile
from .cp import apply_cp
from .batch_check import agree_on_error, apply_batch_check
from .dims import ParallelDims, valid_cp_degrees, valid_ep_degrees, valid_tp_degrees
from .ep import apply_ep, balance_experts
from .float8 import after_optimizer_step, apply_float8
from .fsdp import apply_fsdp
from .grad_clip import clip_grad_norm_
from .mixed_precision import apply_mixed_precision
from .options import CompileOptions, Float8Options, FSDPOptions
from .parallelize import parallelize
from .pp import SCHEDULES, Pipeline, PipelineOptions, check_options, pipeline_llm
from .tp import apply_tp

__all__ = [
    "AC_MODES", "after_optimizer_step", "agree_on_error", "apply_ac", "apply_batch_check", "apply_compile",
    "apply_cp", "apply_ep", "apply_float8", "apply_fsdp", "apply_mixed_precision", "apply_tp", "balance_experts",
    "check_options", "clip_grad_norm_", "CompileOptions", "Float8Options", "FSDPOptions", "ParallelDims",
    "parallelize", "Pipeline", "pipeline_llm", "PipelineOptions", "SCHEDULES", "valid_cp_degrees",
    "valid_ep_degrees", "valid_tp_degrees",
]
