"""Selective activation checkpointing keeps what its policy says, eager and compiled (CPU, SDPA backend).

The numbers of AC'd models are covered by the parallel property tests (any policy gives the same
numbers); these tests check what is recomputed: a policy that saved nothing or everything would pass
those but fail here. `tests/gpu/test_ac_gpu.py` runs the same checks with the CUDA attention backends.
"""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dtllama
import dtllama.parallel.ac as ac_mod
from dtllama.ops import cu_seqlens_from_lengths, set_attention_backend
from dtllama.parallel.ac import apply_ac
from dtllama.parallel.compile import apply_compile

LAYERS = 2
# Per layer, in call order: q, k, v, o, gate, up, down; torchtitan's policy saves every other one.
MM_POLICY = ["MUST_SAVE", "PREFER_RECOMPUTE"] * 3 + ["MUST_SAVE"]
RECOMPUTED_MM = 3  # k, o, up


def tiny_model(device="cpu", dtype=torch.float32):
    cfg = dtllama.ModelConfig(model_type="llama", vocab_size=64, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                              rms_norm_eps=1e-5, rope_theta=1e4, initializer_range=0.2, torch_dtype="float32")
    with torch.device("meta"):
        model = dtllama.LlamaForCausalLM(cfg)
    model.to_empty(device=device)
    model.init_weights(0)
    return model.to(dtype)


def step(model, device="cpu"):
    """Forward the logits of two packed sequences; returns the loss."""
    lengths = [5, 11]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (sum(lengths),), generator=g).to(device)
    cu = cu_seqlens_from_lengths(lengths, device=device)
    pos = torch.cat([torch.arange(n) for n in lengths]).to(device)
    return model(ids, pos, cu, max(lengths)).logits.float().square().sum()


def is_attention_forward(name: str) -> bool:
    name = name.lower()
    # inductor_compiled_code: the tiny model's one compiled region is the flex attention forward
    hit = ("attn", "attention", "fa4_varlen_fwd", "inductor_compiled_code")
    return any(h in name for h in hit) and "backward" not in name


class OpCounter(TorchDispatchMode):
    # Higher-order ops pass through too: dtllama's compiled FlexAttention is one (`inductor_compiled_code`).
    supports_higher_order_operators = True

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))


def record_policy(monkeypatch) -> list[tuple[str, str]]:
    """Log (op, decision) for every forward call of the selective policy (a torch older than 2.13 also
    calls it in recompute, with `ctx.is_recompute`)."""
    log = []
    make = ac_mod._policy_fn

    def logged():
        policy = make()

        def wrapper(ctx, op, *args, **kwargs):
            decision = policy(ctx, op, *args, **kwargs)
            if not ctx.is_recompute:
                log.append((str(op), decision.name))
            return decision

        return wrapper

    monkeypatch.setattr(ac_mod, "_policy_fn", logged)
    return log


def check_policy_log(log, layer_calls: int):
    """Matmuls alternate save/recompute within each layer, norms are recomputed, attention is saved.

    `layer_calls` is a lower bound: AOTAutograd may trace a layer more than once, each time with a
    fresh policy."""
    mm = [d for op, d in log if op.startswith("aten.mm")]
    assert len(mm) >= len(MM_POLICY) * layer_calls and mm == MM_POLICY * (len(mm) // len(MM_POLICY)), mm
    assert {d for op, d in log if "rms_norm" in op} == {"PREFER_RECOMPUTE"}
    attn = [(op, d) for op, d in log if is_attention_forward(op) or "flex" in op or "compiled_code" in op]
    assert len(attn) >= layer_calls and all(d == "MUST_SAVE" for _, d in attn), attn


def eager_backward_counts(mode: str, device="cpu", dtype=torch.float32) -> collections.Counter:
    """The ops run during backward (recomputation included) of an eager model with AC `mode`."""
    model = tiny_model(device, dtype)
    apply_ac(model, mode)
    loss = step(model, device)
    counter = OpCounter()
    with counter:
        loss.backward()
    return counter.counts


def compiled_backward_graphs(mode: str, device="cpu", dtype=torch.float32) -> list[collections.Counter]:
    """The ops of each compiled layer graph's backward, after the partitioner inductor uses. Identical
    layers share one graph; with FlexAttention the second layer compiles its own (it reuses the first
    layer's block mask)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm)

    backend = aot_autograd(fw_compiler=lambda gm, ex: make_boxed_func(gm), bw_compiler=keep,
                           partition_fn=min_cut_rematerialization_partition)
    torch._dynamo.reset()
    model = tiny_model(device, dtype)
    apply_ac(model, mode)
    apply_compile(model, backend)
    step(model, device).backward()
    assert 1 <= len(graphs) <= LAYERS
    counts = []
    for gm in graphs:
        ops = collections.Counter()
        for node in gm.graph.nodes:
            if node.op == "call_function":
                # A random-looking op recomputed under rng functionalization is wrapped: name the op inside.
                target = node.args[1] if "run_with_rng_state" in str(node.target) else node.target
                ops[str(target)] += 1
        counts.append(ops)
    return counts


def check_compiled(none, full, sel):
    """Per layer graph: three more matmuls than without AC, no attention forward (full AC has one)."""
    assert len(none) == len(full) == len(sel)
    for n, f, s in zip(none, full, sel):
        assert s["aten.mm.default"] == n["aten.mm.default"] + RECOMPUTED_MM
        assert not [op for op in s if is_attention_forward(op)], s
        assert [op for op in f if is_attention_forward(op)], f


@pytest.fixture
def sdpa():
    set_attention_backend("sdpa")
    yield
    set_attention_backend("auto")


def test_selective_eager_recomputes_norms_and_every_other_matmul_not_attention(sdpa, monkeypatch):
    log = record_policy(monkeypatch)
    none, full, sel = (eager_backward_counts(m) for m in ("none", "full", "selective"))
    check_policy_log(log, LAYERS)
    recomputed = sel - none
    assert recomputed["aten.mm.default"] == RECOMPUTED_MM * LAYERS
    assert recomputed["dtllama.rms_norm.default"] == 2 * LAYERS
    assert recomputed["aten.silu.default"] == LAYERS
    assert not [op for op in recomputed if is_attention_forward(op)], recomputed
    # Full AC recomputes the attention forward (the check above can see it) and the other matmuls
    # (all but down, whose output backward never needs).
    assert [op for op in full - none if is_attention_forward(op)]
    assert (full - none)["aten.mm.default"] == 6 * LAYERS


def test_selective_compiled_keeps_the_policy(sdpa, monkeypatch):
    log = record_policy(monkeypatch)
    none, full, sel = (compiled_backward_graphs(m) for m in ("none", "full", "selective"))
    check_policy_log(log, 1)  # AOTAutograd traces the shared layer graph
    check_compiled(none, full, sel)
    assert sel[0]["dtllama.rms_norm.default"] == 2 and none[0]["dtllama.rms_norm.default"] == 0
