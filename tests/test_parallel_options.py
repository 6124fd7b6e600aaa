"""Every option `parallelize` accepts changes what it says, and `ParallelDims` owns the meshes."""

from __future__ import annotations

import pytest
import torch
from fault_cases import CONFIG, run_mixed_precision, run_options
from helpers import rel_err as rel
from pool import get_pool

import dtllama
from dtllama.ops import attention
from dtllama.parallel import FSDPOptions, ParallelDims, parallelize

FSDP2 = dict(dp_shard=-1)


def _seed() -> int:
    return int(torch.randint(0, 2**16, ()))


def _max_rel(a: dict, b: dict) -> float:
    floor = 0.1 * max(float(g.abs().max()) for g in b.values())  # see test_parallel_properties (b)
    return max(rel(a[n], b[n], floor) for n in b)


def test_reshard_after_forward_keeps_gathered_parameters_and_the_numbers():
    seed = _seed()
    on, off = (get_pool(2).run(run_options, FSDP2, seed, dict(reshard_after_forward=r)) for r in (True, False))
    assert not on[0]["unsharded_after_forward"] and off[0]["unsharded_after_forward"]
    assert _max_rel(off[0]["grads"], on[0]["grads"]) <= 1e-6  # the same sums; only memory differs


def test_reduce_dtype_is_the_gradient_reduction_dtype():
    seed = _seed()
    ref = get_pool(1).run(run_options, FSDP2, seed, dict())[0]["grads"]  # one rank: nothing is reduced
    fp32, bf16 = (get_pool(2).run(run_options, FSDP2, seed, dict(reduce_dtype=d))[0]["grads"]
                  for d in (torch.float32, torch.bfloat16))
    # Each rank's gradient is the full batch's here, so a reduction in fp32 is exact up to ~1 ulp;
    # in bf16 the sum is rounded to 8 bits of mantissa (2^-8 = 4e-3 relative), well above 1e-5.
    assert _max_rel(fp32, ref) <= 1e-5
    assert 1e-4 <= _max_rel(bf16, ref) <= 1e-2


@pytest.mark.parametrize("backend,ac", [(None, "none"), ("aot_eager", "selective")])
def test_one_rank_mixed_precision_casts_at_use_with_the_numbers_of_bf16_parameters(backend, ac):
    """On one rank `param_dtype` is applied by casts at each use, not FSDP: the parameters stay fp32 plain
    tensors (what the optimizer steps), and outputs and gradients are those of the same model holding bf16
    parameters, bit for bit (the same bf16 ops on the same bf16 values; each fp32 gradient is the bf16 one,
    cast), except the embedding's, which the casts accumulate in fp32 over repeated tokens (bf16 rounds each
    partial sum: 2^-8 relative)."""
    r = get_pool(1).run(run_mixed_precision, _seed(), backend, ac)[0]
    assert r["dtypes"] == {torch.float32} and r["types"] == {"Parameter"} and not r["fsdp"]
    _check_casts_match_bf16_parameters(r, summed=["model.embed_tokens.weight"])


@pytest.mark.parametrize("backend,ac", [(None, "none"), ("aot_eager", "selective")])
def test_tensor_parallel_alone_casts_at_use_with_the_numbers_of_bf16_parameters(backend, ac):
    """TP alone (tp=2, no data parallelism) takes the same casts instead of FSDP on a 1-rank mesh: fp32 TP
    DTensor parameters; the numbers of the same TP layout holding bf16 parameters, bit for bit but the sums
    that the casts do in fp32: the embedding's rows and, over the TP ranks, the sequence-parallel norms'
    gradients (each rank's partial, then the all-reduce)."""
    results = get_pool(2).run(run_mixed_precision, _seed(), backend, ac, dict(tp=2))
    for r in results:
        assert r["dtypes"] == {torch.float32} and r["types"] == {"DTensor"} and not r["fsdp"]
    norms = [n for n in results[0]["ref"]["grads"] if "norm" in n]
    _check_casts_match_bf16_parameters(results[0], summed=["model.embed_tokens.weight", *norms])
    assert all(torch.equal(r["mp"]["logprobs"], results[0]["mp"]["logprobs"]) for r in results)


def _check_casts_match_bf16_parameters(r: dict, summed: list[str]) -> None:
    mp, ref = r["mp"], r["ref"]
    assert torch.equal(mp["logprobs"], ref["logprobs"]) and torch.equal(mp["entropy"], ref["entropy"])
    assert all(mp["grads"][n].dtype == torch.float32 for n in mp["grads"])
    unequal = [n for n in ref["grads"] if n not in summed and not torch.equal(mp["grads"][n], ref["grads"][n].float())]
    assert not unequal
    for n in summed:
        assert rel(mp["grads"][n], ref["grads"][n].float()) <= 2**-7, n


def test_cpu_offload_is_refused_on_a_cpu_mesh():
    """FSDP2's CPUOffloadPolicy pins host memory, which needs an accelerator; tests/gpu checks that it
    lowers peak GPU memory with the same numbers."""
    with pytest.raises(Exception, match="cpu_offload=True needs an accelerator mesh"):
        get_pool(2).run(run_options, FSDP2, _seed(), dict(cpu_offload=True))


def test_compile_backend_is_the_one_used():
    seed = _seed()
    eager = get_pool(2).run(run_options, FSDP2, seed, dict())[0]["grads"]
    aot = get_pool(2).run(run_options, FSDP2, seed, dict(), "aot_eager")[0]["grads"]
    assert _max_rel(aot, eager) <= 1e-6  # aot_eager runs the same aten ops, traced
    with pytest.raises(Exception, match="no_such_backend"):
        get_pool(2).run(run_options, FSDP2, seed, dict(), "no_such_backend")


def test_parallelize_refuses_inconsistent_arguments():
    config = dtllama.ModelConfig(**CONFIG)
    dims = ParallelDims().resolve(1, config)
    with torch.device("meta"):
        model = dtllama.LlamaForCausalLM(config)
    with pytest.raises(ValueError, match=r"call dims.build_mesh\(\)"):
        parallelize(model, dims)
    with pytest.raises(ValueError, match="dp_shard is still -1"):
        ParallelDims().build_mesh("cpu")
    with pytest.raises(ValueError, match="param_dtype=torch.bfloat16 given twice"):
        dims._meshes = {"world": object()}  # stands in for a built mesh; the check runs before any use
        parallelize(model, dims, fsdp=FSDPOptions(), param_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="not the one dims.build_mesh"):
        parallelize(model, dims, object())


def test_auto_attention_says_why_it_passed_over_a_backend(monkeypatch):
    """The dispatch logic alone (no GPU here): an sm75 GPU gets FlexAttention, and the reason is printed."""
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(attention, "_capability", lambda index: (7, 5))
    monkeypatch.setattr(attention._fa4, "AVAILABLE", False)
    monkeypatch.setattr(attention, "_FLASH_ATTN", False)
    monkeypatch.setattr(attention, "_VARLEN_PARAMS", frozenset({"window_size"}))
    monkeypatch.setattr(attention, "_backend", "auto")
    name, why = attention._choose(cuda, torch.bfloat16)
    assert name == "flex"
    assert "not fa4: flash-attn-4 is not installed; not flash: flash-attn is not installed" in why
    assert "not varlen: it needs compute capability >= 8.0, this GPU has 7.5" in why
    monkeypatch.setattr(attention, "_capability", lambda index: (9, 0))
    assert attention._choose(cuda, torch.bfloat16, 64, False) == (
        "varlen", "auto; not fa4: flash-attn-4 is not installed; not flash: flash-attn is not installed; "
        "not cudnn: it takes batches of equal-length sequences only")
    # Sequences of one length: dense SDPA (cuDNN) on Hopper; not on Ampere, where SDPA picks FlashAttention-2.
    assert attention._choose(cuda, torch.bfloat16, 64, True)[0] == "cudnn"
    assert attention._choose(cuda, torch.bfloat16, 256, True)[0] == "varlen"
    monkeypatch.setattr(attention, "_capability", lambda index: (8, 0))
    assert "not cudnn: it needs compute capability >= 9.0" in attention._choose(cuda, torch.bfloat16, 64, True)[1]
    monkeypatch.setattr(attention, "_capability", lambda index: (9, 0))
    assert attention._choose(cuda, torch.float32) == ("flex", "auto; not fa4: flash-attn-4 is not installed; "
                                                      "not flash: flash-attn is not installed; "
                                                      "not cudnn: it takes fp16/bf16, the inputs are torch.float32; "
                                                      "not varlen: it takes fp16/bf16, the inputs are torch.float32")
    # FA4 is first when installed, on Hopper, for the head dims it has kernels for.
    monkeypatch.setattr(attention._fa4, "AVAILABLE", True)
    assert attention._choose(cuda, torch.bfloat16, 64)[0] == "fa4"
    assert attention._choose(cuda, torch.bfloat16, 256, False) == (
        "varlen", "auto; not fa4: it takes head_dim in 8..128 (a multiple of 8), the inputs have 256; "
        "not flash: flash-attn is not installed; not cudnn: it takes batches of equal-length sequences only")
    monkeypatch.setattr(attention, "_capability", lambda index: (8, 0))
    assert "not fa4: it needs compute capability >= 9.0, this GPU has 8.0" in attention._choose(cuda, torch.bfloat16)[1]
    monkeypatch.setattr(attention, "_backend", "varlen")
    with pytest.raises(ValueError, match="'varlen' cannot run here: it needs a CUDA device.*DTLLAMA_ATTENTION=auto"):
        attention._choose(torch.device("cpu"), torch.float32)
