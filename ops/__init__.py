"""Custom ops of dtllama: padding-free batches, attention dispatch, RMSNorm, fused log-probs, the fused loss."""

from .attention import BACKENDS, attention_backend, cuda_backends, set_attention_backend, varlen_attention
from .cross_entropy import CrossEntropy, linear_cross_entropy
from .logprobs import linear_logits, linear_logprobs_entropy, linear_topk_logprobs
from .rmpad import (
    IGNORE_INDEX,
    Packed,
    check_labels,
    check_packed,
    cu_seqlens_from_lengths,
    pack,
    pad_to_multiple,
    position_ids_from_cu_seqlens,
    prepare_batch,
    shift_labels,
    unpack,
)
from .rms_norm import rms_norm

__all__ = [
    "BACKENDS", "CrossEntropy", "IGNORE_INDEX", "Packed", "attention_backend", "check_labels", "cuda_backends", "check_packed", "cu_seqlens_from_lengths",
    "linear_cross_entropy", "linear_logits", "linear_logprobs_entropy", "linear_topk_logprobs", "pack", "pad_to_multiple", "position_ids_from_cu_seqlens", "prepare_batch", "rms_norm", "set_attention_backend",
    "shift_labels", "unpack", "varlen_attention",
]
