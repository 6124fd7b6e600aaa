"""Qwen3-MoE, a native family on the model protocol: transformers parity (logits packed and padded, log-probs,
entropy, gradients, the routing and its load-balance loss, the value head), HF files' per-expert tensors read and
written, flavors against the published total and active counts, every parallel layout (FSDP, HSDP, TP, CP, EP,
compiled, pipeline) against one device, DCP resume across EP degrees, and aux-loss-free balancing."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import rel_err
from parallel_cases import aux_loss_rank, balance_run, random_sequences, resume_losses
from pool import get_pool
from test_ep import make_case
from test_llama4 import _grouped_mm_runs_on_cpu, grouped_mm_calls, moe_backend  # noqa: F401 (fixtures)
from test_parallel_properties import check_case
from test_pp import check_pipeline
from test_qwen3 import check_causal_lm_parity, check_value_head

import dtllama
from dtllama.models.hf_io import read_safetensors_index
from dtllama.models.qwen3_moe import Qwen3MoeForCausalLM, Qwen3MoeForValue
from dtllama.ops import cu_seqlens_from_lengths
from dtllama.parallel.pp import PipelineOptions

transformers = pytest.importorskip("transformers", reason="the HF parity tests need transformers ([test] extra)")

TOL = 1e-5  # fp32 matmuls in another association order (packed vs batched, per-expert rows): as for Qwen3 dense
TINY = dict(vocab_size=97, hidden_size=48, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128, rms_norm_eps=1e-6,
            num_experts=6, num_experts_per_tok=2, mlp_only_layers=[1], router_aux_loss_coef=0.01)


def hf_qwen3_moe(seed: int, tie: bool = False, norm_topk: bool = True, head: str = "ForCausalLM", **kw):
    """A tiny transformers Qwen3-MoE (layer 1 dense) with norms away from 1 and a router sharp enough that the
    top-k is decided by margins far above rounding."""
    torch.manual_seed(seed)
    cfg = transformers.Qwen3MoeConfig(**dict(TINY, tie_word_embeddings=tie, norm_topk_prob=norm_topk, **kw),
                                      attention_dropout=0.0, use_sliding_window=False)
    if head != "ForCausalLM":
        cfg.num_labels = 1
    model = getattr(transformers, "Qwen3Moe" + head)(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.3)
    return model


@pytest.mark.parametrize("tie, norm_topk", [(False, True), (True, False)], ids=["untied-renorm", "tied-raw"])
def test_logits_logprobs_entropy_and_gradients_match_transformers(tie, norm_topk, tmp_path):
    seed = int(torch.randint(0, 2**16, ()))
    ours = check_causal_lm_parity(hf_qwen3_moe(seed, tie, norm_topk), tmp_path, seed)
    assert type(ours) is Qwen3MoeForCausalLM and ours.config.norm_topk_prob == norm_topk
    assert float(ours.model.layers["0"].mlp.experts.gate_up_proj.grad.abs().max()) > 0


def test_routing_and_load_balance_loss_match_transformers(tmp_path):
    """The experts chosen equal HF's top-k of its router logits; the load-balance loss is HF's formula per MoE
    layer, averaged (HF pools the layers' tokens first: with one MoE layer the two are HF's own `aux_loss`)."""
    seed = int(torch.randint(0, 2**16, ()))
    hf = hf_qwen3_moe(seed, mlp_only_layers=[0, 1])  # one MoE layer (2)
    hf.save_pretrained(tmp_path)
    ours = dtllama.from_pretrained(tmp_path)
    ids = torch.randint(0, hf.config.vocab_size, (1, 23))
    with torch.no_grad():
        ref = hf(input_ids=ids, output_router_logits=True)
        stats = ours(ids[0], cu_seqlens=cu_seqlens_from_lengths([23])).router_stats
    (logits,) = [r for r in ref.router_logits if r is not None]
    counts = torch.bincount(torch.softmax(logits, -1).topk(2, -1).indices.flatten(), minlength=6)
    assert stats.tokens_per_expert.tolist() == [counts.tolist()]
    aux_err = rel_err(stats.aux_loss, ref.aux_loss * hf.config.router_aux_loss_coef)
    print(f"tokens per expert {counts.tolist()}; aux loss {float(stats.aux_loss):.6f} (HF's), error {aux_err:.1e}")
    assert aux_err <= TOL


def test_value_head_matches_transformers(tmp_path):
    check_value_head(hf_qwen3_moe(5, head="ForSequenceClassification"), tmp_path, Qwen3MoeForValue)


def test_export_writes_per_expert_files_that_transformers_loads_with_equal_logits(tmp_path):
    config = dtllama.flavors["qwen3-moe-debug"]
    ours = Qwen3MoeForCausalLM(config)
    ours.init_weights(seed=int(torch.randint(0, 2**16, ())))
    ours.save_pretrained(tmp_path)
    with open(os.path.join(tmp_path, "config.json")) as f:
        written = json.load(f)
    assert written["num_experts"] == written["num_local_experts"] == 8 and "load_balance_coeff" not in written
    keys = set(read_safetensors_index(str(tmp_path)))
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in keys
    assert not any(k.endswith("gate_up_proj") for k in keys)  # one tensor per expert, as published checkpoints
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(hf).__name__ == "Qwen3MoeForCausalLM"
    ids = torch.randint(0, config.vocab_size, (1, 20))
    with torch.no_grad():
        assert rel_err(ours(ids[0], cu_seqlens=cu_seqlens_from_lengths([20])).logits, hf(ids).logits[0]) <= TOL


@pytest.mark.parametrize("name, total, active", [("qwen3-30b-a3b", 30.5, 3.3), ("qwen3-235b-a22b", 235.1, 22.2)])
def test_flavors_match_the_published_counts(name, total, active):
    """The model cards: 30.5B total / 3.3B activated, 235B / 22B."""
    cfg = dtllama.flavors[name]
    with torch.device("meta"):
        n = sum(p.numel() for p in Qwen3MoeForCausalLM(cfg).parameters())
        hf_cfg = transformers.Qwen3MoeConfig(**{k: v for k, v in cfg.to_hf().items() if k != "architectures"})
        assert sum(p.numel() for p in transformers.Qwen3MoeForCausalLM(hf_cfg).parameters()) == n
    assert n == cfg.num_params()
    assert abs(n / 1e9 - total) < 0.05 and abs(cfg.num_params(active=True) / 1e9 - active) < 0.06


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="use_sliding_window=True"):
        dtllama.config_from_hf(dict(model_type="qwen3_moe", use_sliding_window=True, sliding_window=4096))
    with pytest.raises(ValueError, match="num_experts=8 and num_local_experts=4"):
        dtllama.config_from_hf(dict(model_type="qwen3_moe", num_experts=8, num_local_experts=4))
    with pytest.raises(ValueError, match="num_experts_per_tok=9 must be in 1..num_local_experts=8"):
        dtllama.config_from_hf(dict(model_type="qwen3_moe", num_experts=8, num_experts_per_tok=9))
    assert dtllama.config_from_hf(dict(model_type="qwen3_moe", num_experts=60)).num_local_experts == 60


# ---------------------------------------------------------------------------------------------------- layouts


def moe_config(tp: int = 1, dense_first: bool = False, top_k: int = 2, **kw) -> dict:
    return dict(model_type="qwen3_moe", vocab_size=61, hidden_size=32, intermediate_size=12 * tp,
                moe_intermediate_size=8, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                head_dim=8, rms_norm_eps=1e-5, rope_theta=1e4, num_local_experts=4, num_experts_per_tok=top_k,
                norm_topk_prob=True, mlp_only_layers=[0] if dense_first else [], tie_word_embeddings=False,
                initializer_range=0.2, torch_dtype="float32", **kw)


LAYOUTS = [  # (world, layout, config, activation checkpointing)
    (2, dict(), moe_config(), "none"),  # FSDP over 2
    (4, dict(dp_replicate=2), moe_config(dense_first=True), "none"),  # HSDP
    (2, dict(tp=2), moe_config(tp=2, dense_first=True), "none"),  # ep=1 under TP: experts FSDP over the TP ranks
    (2, dict(cp=2), moe_config(dense_first=True), "none"),
    (2, dict(ep=2), moe_config(), "selective"),
    (4, dict(ep=4), moe_config(top_k=1), "full"),  # one expert per rank
    (4, dict(ep=2, tp=2), moe_config(tp=2, dense_first=True), "none"),
    (4, dict(cp=2, ep=2), moe_config(), "none"),
    (4, dict(ep=2), moe_config(load_balance_coeff=0.01), "none"),  # routing through the (zero) bias, counted
]


@pytest.mark.parametrize("world, layout, config, ac", LAYOUTS, ids=lambda x: str(x).replace(" ", "")
                         if not isinstance(x, dict) or "model_type" not in x else "qwen3moe")
def test_layouts_match_single_device(world, layout, config, ac):
    check_case(make_case(world, layout, config, ac))


def test_compiled_expert_parallel_blocks_match_single_device():
    check_case(make_case(4, dict(ep=2, tp=2), moe_config(tp=2, dense_first=True), "selective"),
               compile_backend="aot_eager")


@pytest.mark.parametrize("schedule", ["1F1B", "Interleaved1F1B"])
def test_pipeline_matches_single_device(schedule):
    check_pipeline(2, dict(pp=2), 4, False, PipelineOptions(schedule, microbatches=4, microbatch_tokens=16),
                   config=dict(moe_config(router_aux_loss_coef=0.0), mlp_only_layers=[1]))


@pytest.mark.parametrize("world, layout", [(2, dict(tp=2)), (2, dict(cp=2))], ids=["tp2", "cp2"])
def test_load_balance_loss_over_token_shards_is_that_of_all_tokens(world, layout):
    config = moe_config(tp=2, router_aux_loss_coef=0.25)
    seed = int(torch.randint(0, 2**16, ()))
    seqs, _ = random_sequences([11, 7, 14], config["vocab_size"], torch.Generator().manual_seed(seed))
    ref_aux, ref_grads = aux_loss_rank(config, None, seqs, seed)
    for aux, grads in get_pool(world).run(aux_loss_rank, config, layout, seqs, seed):
        assert abs(aux - ref_aux) <= 1e-6 * abs(ref_aux)
        for name, ref in ref_grads.items():
            assert float(ref.abs().max()) > 0, name
            assert float((grads[name] - ref).abs().max()) <= 1e-5 * float(ref.abs().max()), name


# ---------------------------------------------------------------------------------------------------- balancing


def test_checkpoint_with_balancing_bias_resumes_on_another_ep(tmp_path):
    """DCP at ep=2 (experts `Shard(0)`), resumed at ep=1 and at ep=4 (top-1 keeps each token's rows on few ranks):
    the balancing bias after step 1 is the one saved, and the next two losses and the biases after them are those
    of the run that went on (the bias steers the routing, so a bias lost would change the losses)."""
    config = moe_config(load_balance_coeff=0.05)
    world, layout, _, seqs, labels, seed, _, _ = make_case(4, dict(ep=2), config)
    folder = str(tmp_path / "ckpt")
    saved = get_pool(world).run(resume_losses, config, layout, seqs, labels, seed, folder, True, True)
    assert all(float(b.abs().max()) > 0 for b in saved[0][1])  # step 1 moved the biases
    for other in (dict(dp_shard=-1), dict(dp_shard=-1, ep=4)):
        resumed = get_pool(world).run(resume_losses, config, other, seqs, labels, seed, folder, False, True)
        (losses, first, last), (ref_losses, ref_first, ref_last) = resumed[0], saved[0]
        assert all(torch.equal(a, b) for a, b in zip(first, ref_first))
        for a, b in zip(losses, ref_losses):
            assert abs(a - b) <= 1e-5 * abs(a), (losses, ref_losses)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(last, ref_last)), (last, ref_last)
        assert all(r[0] == resumed[0][0] for r in resumed)


def test_aux_loss_free_balancing_evens_a_skewed_router():
    """A tiny Qwen3-MoE whose router sends nearly every token to experts 0 and 1 (max/mean tokens per expert 4 of
    at most 4), trained 30 steps of the recipes' step on the demo text over ep=2: without balancing it stays
    skewed; with it, the load evens out well below that."""
    data = os.path.join(os.path.dirname(__file__), "..", "recipes", "data", "instructions.txt")
    config = dict(moe_config(), vocab_size=256, num_local_experts=8, moe_intermediate_size=16, hidden_size=32,
                  intermediate_size=48, router_aux_loss_coef=0.0, initializer_range=0.1)
    runs = {}
    for coeff in (None, 0.01):
        loads, biases = get_pool(2).run(balance_run, dict(config, load_balance_coeff=coeff), dict(dp_shard=-1, ep=2),
                                        30, 0, data, 1.0)[0]
        runs[coeff] = sum(loads[-5:]) / 5
        print(f"load_balance_coeff={coeff}: max/mean tokens per expert by step {[round(x, 2) for x in loads]}")
    assert runs[None] > 3.5 and runs[0.01] < 0.6 * runs[None], runs


# ---------------------------------------------------------------------------------------------------- grouped GEMM


def _grouped_vs_loop(device: str, dtype: torch.dtype, backend_fixture, calls: list) -> tuple[float, float]:
    """Logits and the experts' gradient of the transposed (transformers 5) layout by grouped GEMM against the loop."""
    cfg = dtllama.flavors["qwen3-moe-debug"]
    model = Qwen3MoeForCausalLM(cfg)
    model.init_weights(seed=int(torch.randint(0, 2**16, ())))
    model = model.to(device, dtype)
    lengths = [100, 37, 1, 90]
    ids = torch.randint(0, cfg.vocab_size, (sum(lengths),), device=device)
    cu = cu_seqlens_from_lengths(lengths, device=device)

    def run(backend):
        backend_fixture(backend)
        model.zero_grad()
        out = model(ids, cu_seqlens=cu, max_seqlen=max(lengths)).logits
        out.float().square().mean().backward()
        return out.float(), model.model.layers["1"].mlp.experts.gate_up_proj.grad.float()

    loop, loop_g = run("loop")
    assert not calls
    grouped, grouped_g = run("grouped")
    assert len(calls) == 2 * len(cfg.moe_layers)  # gate_up and down of every MoE layer
    return rel_err(grouped, loop), rel_err(grouped_g, loop_g)


@pytest.mark.skipif(not _grouped_mm_runs_on_cpu(), reason="this torch has no CPU torch._grouped_mm; the loop is then the "
                    "only CPU path (the CUDA test below covers the grouped one)")
def test_grouped_mm_matches_expert_loop_on_cpu(moe_backend, grouped_mm_calls):
    errs = _grouped_vs_loop("cpu", torch.float32, moe_backend, grouped_mm_calls)
    print(f"grouped vs loop (fp32): logits {errs[0]:.2e}, experts.gate_up_proj gradient {errs[1]:.2e}")
    assert max(errs) <= TOL


@pytest.mark.gpu
def test_grouped_mm_matches_expert_loop_bf16_cuda(moe_backend, grouped_mm_calls):
    """On a GPU machine: `python -m pytest tests/test_qwen3_moe.py -m gpu`."""
    errs = _grouped_vs_loop("cuda", torch.bfloat16, moe_backend, grouped_mm_calls)
    print(f"bf16 grouped vs loop: logits {errs[0]:.2e}, experts.gate_up_proj gradient {errs[1]:.2e}")
    assert max(errs) <= 1e-2  # DESIGN.md's bf16 bound, as for Llama 4


def test_export_under_activation_checkpointing_writes_the_same_files(tmp_path):
    """Activation checkpointing wraps each layer (module names gain `_checkpoint_wrapped_module`, state-dict keys do
    not): the per-expert split and the dropped balancing bias follow the state-dict names, so the files are equal."""
    import dataclasses

    from safetensors.torch import load_file

    from dtllama.parallel.ac import apply_ac

    config = dataclasses.replace(dtllama.flavors["qwen3-moe-debug"], load_balance_coeff=0.01)
    model = Qwen3MoeForCausalLM(config)
    model.init_weights(seed=int(torch.randint(0, 2**16, ())))
    model.save_pretrained(tmp_path / "plain")
    apply_ac(model, "full")
    model.save_pretrained(tmp_path / "ac")

    def tensors(folder):
        return {k: v for f in sorted({e.file for e in read_safetensors_index(str(folder)).values()})
                for k, v in load_file(f).items()}

    plain, ac = tensors(tmp_path / "plain"), tensors(tmp_path / "ac")
    assert set(plain) == set(ac) and all(torch.equal(plain[k], ac[k]) for k in plain)
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in ac and not any("expert_bias" in k for k in ac)
