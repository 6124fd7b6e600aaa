"""Selective activation checkpointing saves the attention forward of every CUDA backend, eager and compiled."""

import pytest
import torch
from test_ac import (
    LAYERS, RECOMPUTED_MM, check_compiled, check_policy_log, compiled_backward_graphs, eager_backward_counts,
    is_attention_forward, record_policy, step, tiny_model,
)

from dtllama.ops import set_attention_backend
from dtllama.ops.attention import cuda_backends
from dtllama.parallel.ac import apply_ac

pytestmark = pytest.mark.gpu

# dtllama runs FlexAttention through its own torch.compile. In an eager layer that compiled region is
# opaque to the checkpoint's dispatch mode, so the flex forward is recomputed in backward (inductor's
# `wrap_inductor_compiled_regions=True` would expose it, but then the recompute fails on torch 2.11).
EAGER_FLEX = "eager flex: ops/attention.py's compiled FlexAttention is opaque to selective AC"
# Any checkpoint (full or selective) around a compiled layer fails to trace with flex: create_block_mask
# inside the checkpointed layer is a side effect dynamo refuses ("HOP: Unsafe side effect", torch 2.11
# and 2.13). Building the block mask outside the layers, or dynamo's
# `skip_fwd_side_effects_in_bwd_under_checkpoint`, lifts it.
COMPILED_FLEX = "compiled flex + activation checkpointing: create_block_mask inside the checkpoint"


@pytest.fixture(params=cuda_backends(torch.bfloat16) if torch.cuda.is_available() else ["none"])
def backend(request):
    set_attention_backend(request.param)
    yield request.param
    set_attention_backend("auto")


def test_selective_eager_saves_attention(backend, monkeypatch, request):
    log = record_policy(monkeypatch)
    kw = dict(device="cuda", dtype=torch.bfloat16)
    if backend == "flex":
        request.applymarker(pytest.mark.xfail(strict=True, reason=EAGER_FLEX))
        model = tiny_model(**kw)
        apply_ac(model, "selective")
        step(model, "cuda").backward()  # a plain dispatch mode cannot count inside compiled regions
        check_policy_log(log, LAYERS)
        return
    none, sel = eager_backward_counts("none", **kw), eager_backward_counts("selective", **kw)
    check_policy_log(log, LAYERS)
    recomputed = sel - none
    assert recomputed["aten.mm.default"] == RECOMPUTED_MM * LAYERS
    assert not [op for op in recomputed if is_attention_forward(op)], recomputed


def test_selective_compiled_saves_attention(backend, monkeypatch, request):
    if backend == "flex":
        request.applymarker(pytest.mark.xfail(strict=True, reason=COMPILED_FLEX))
    log = record_policy(monkeypatch)
    kw = dict(device="cuda", dtype=torch.bfloat16)
    none, full, sel = (compiled_backward_graphs(m, **kw) for m in ("none", "full", "selective"))
    check_policy_log(log, 1)
    check_compiled(none, full, sel)
