"""CUDA attention backends against the SDPA block-diagonal reference."""

import pytest
import torch
from conftest import rel_err

from dtllama.ops import cu_seqlens_from_lengths, set_attention_backend, varlen_attention

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("lengths", [[1], [37, 1, 200, 5], [512]])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_flex_matches_sdpa_reference(lengths, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    T = sum(lengths)
    q = torch.randn(T, 8, 64, device="cuda", dtype=dtype, generator=g)
    k, v = (torch.randn(T, 2, 64, device="cuda", dtype=dtype, generator=g) for _ in range(2))
    cu = cu_seqlens_from_lengths(lengths, device="cuda")
    try:
        set_attention_backend("sdpa")
        ref = varlen_attention(q.float(), k.float(), v.float(), cu, max(lengths))
        set_attention_backend("flex")
        out = varlen_attention(q, k, v, cu, max(lengths))
    finally:
        set_attention_backend("auto")
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4  # bf16 inputs: ~3 significant digits
    assert rel_err(out, ref) <= tol
