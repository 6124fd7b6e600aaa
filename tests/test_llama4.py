"""dtllama's Llama 4 text model against transformers' `Llama4ForCausalLM` (fp32, CPU; one bf16 test on CUDA).

Two tiny shapes mirror the published models: "scout" (every layer MoE, top-1, q/k L2 norm, llama3 RoPE scaling with
Scout's equal band factors) and "maverick" (MoE every 2nd layer between dense SwiGLU layers, no q/k norm, tied
embeddings, attention biases, and top-2 routing so that routed outputs are summed). Both have a NoPE layer (layer 3),
chunks of 8 tokens on sequences of up to 24 (so chunking matters), and `floor_scale=4` so temperature tuning changes q
from position 3 on.
"""

import dataclasses
import json

import pytest
import torch
from helpers import logprobs_entropy_reference, rel_err

from dtllama.models.llama4 import (
    Llama4Config, Llama4ForCausalLM, chunked_cu_seqlens, router_stats, set_moe_backend,
)
from dtllama import flavors
from dtllama.ops import cu_seqlens_from_lengths, shift_labels

llama4_flavor = flavors.__getitem__  # the one flavor registry holds every family's shapes

transformers = pytest.importorskip("transformers", reason="the HF parity tests need transformers ([test] extra)")

# fp32 matmuls in another association order (packed vs batched, per-expert vs HF's all-expert bmm, SDPA with a mask
# vs without): a few ulps of the largest value; 1e-5 relative is ~100 ulps of headroom, as in test_hf_parity.
TOL = 1e-5

TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=32, intermediate_size_mlp=96, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
            attention_chunk_size=8, attn_temperature_tuning=True, floor_scale=4, attn_scale=0.1)
KINDS = {
    "scout": dict(TINY, num_local_experts=4, num_experts_per_tok=1, use_qk_norm=True,
                  rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 16.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 1.0,
                                   "original_max_position_embeddings": 16}),
    "maverick": dict(TINY, num_local_experts=8, num_experts_per_tok=2, interleave_moe_layer_step=2,
                     use_qk_norm=False, tie_word_embeddings=True, attention_bias=True,
                     rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
}


def hf_llama4(kind: str, seed: int = 0):
    """A tiny HF Llama4ForCausalLM with every parameter random (norms included), in eval mode."""
    torch.manual_seed(seed)
    model = transformers.Llama4ForCausalLM(transformers.Llama4TextConfig(**KINDS[kind])).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module", params=sorted(KINDS))
def pair(request, tmp_path_factory):
    """`(hf, ours, folder)`: HF's model, saved by transformers, and dtllama's loaded from that folder."""
    hf = hf_llama4(request.param, seed=len(request.param))
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf, Llama4ForCausalLM.from_pretrained(path), path


@pytest.fixture
def moe_backend():
    yield set_moe_backend
    set_moe_backend("auto")


@pytest.fixture
def grouped_mm_calls(monkeypatch):
    """A list that grows by one per `torch._grouped_mm` call: proof that a test ran the grouped path."""
    calls, real = [], torch._grouped_mm

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_grouped_mm", counted)
    return calls


def random_sequences(vocab: int, seed: int, lengths=None) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if lengths is None:
        lengths = torch.randint(1, 25, (4,), generator=g).tolist()
        lengths[:2] = [1, 24]  # a single token, and three chunks of 8
    return [torch.randint(0, vocab, (n,), generator=g) for n in lengths]


def padded(seqs, left: list[bool]):
    """`[B, S]` ids and attention mask, each row right- or left-padded (the pad id is a real token: never 0s)."""
    S = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), S), 7)
    mask = torch.zeros(len(seqs), S, dtype=torch.bool)
    for b, s in enumerate(seqs):
        cols = slice(S - len(s), S) if left[b] else slice(0, len(s))
        ids[b, cols], mask[b, cols] = s, True
    return ids, mask


def hf_per_sequence(hf, seqs, **kw):
    """HF's logits of each sequence run alone (no padding): the ground truth for any layout."""
    return torch.cat([hf(input_ids=s[None], **kw).logits[0] for s in seqs])


def packed(ours, seqs, **kw):
    cu = cu_seqlens_from_lengths([len(s) for s in seqs], device=seqs[0].device)
    return ours(torch.cat(seqs), cu_seqlens=cu, **kw)


def test_logits_match_transformers_packed_and_padded(pair):
    hf, ours, _ = pair
    seqs = random_sequences(hf.config.vocab_size, 1)
    with torch.no_grad():
        # HF batched, right-padded, as HF itself batches. (HF's NoPE temperature tuning reads the padded column
        # index, not the position, so a left-padded HF row is shifted there: left padding is checked against
        # HF's unpadded per-sequence run below.)
        ids, mask = padded(seqs, [False] * len(seqs))
        positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        right = ours(ids, attention_mask=mask).logits
        pk = packed(ours, seqs).logits
        alone = hf_per_sequence(hf, seqs)
        ids_m, mask_m = padded(seqs, [False, True, True, False])
        mixed = ours(ids_m, attention_mask=mask_m).logits
        untuned = Llama4ForCausalLM(dataclasses.replace(ours.config, attn_temperature_tuning=False))
        untuned.load_state_dict(ours.state_dict())
        effect = rel_err(packed(untuned, seqs).logits, alone)
    errs = {"right-padded vs HF batch": rel_err(right[mask], ref[mask]), "packed vs HF batch": rel_err(pk, ref[mask]),
            "packed vs HF per sequence": rel_err(pk, alone),
            "mixed padding vs HF per sequence": rel_err(mixed[mask_m], alone)}
    print(errs, f"without temperature tuning the logits would differ by {effect:.2e}")
    assert all(e <= TOL for e in errs.values()), errs
    assert effect > 1e-3  # temperature tuning acts at these positions, so the parity above covers it
    assert float(right[~mask].abs().sum()) == 0.0 and float(mixed[~mask_m].abs().sum()) == 0.0


def test_chunked_attention(pair):
    hf, ours, _ = pair
    assert chunked_cu_seqlens(torch.tensor([0, 3, 20, 21]), 8).tolist() == [0, 3, 11, 19, 20, 21]
    assert chunked_cu_seqlens(torch.tensor([0, 8, 8, 24], dtype=torch.int32), 8).tolist() == [0, 8, 16, 24]
    unchunked = Llama4ForCausalLM(dataclasses.replace(ours.config, attention_chunk_size=None))
    unchunked.load_state_dict(ours.state_dict())
    (long,) = random_sequences(hf.config.vocab_size, 2, [40])  # five chunks
    short = random_sequences(hf.config.vocab_size, 3, [8, 5, 1])  # each within one chunk
    with torch.no_grad():
        ref = hf(input_ids=long[None]).logits[0]
        chunked = packed(ours, [long]).logits
        full = packed(unchunked, [long]).logits
        short_chunked, short_full = packed(ours, short).logits, packed(unchunked, short).logits
    err, effect = rel_err(chunked, ref), rel_err(full, ref)
    print(f"one 40-token sequence vs HF: {err:.2e}; without chunks it would differ by {effect:.2e}")
    assert err <= TOL
    assert effect > 1e-3  # chunking changes these logits well beyond rounding: the comparison above tests it
    assert torch.equal(short_chunked, short_full)  # a sequence within one chunk: plain causal attention


def test_logprobs_and_entropy_match_log_softmax_of_hf_logits(pair):
    hf, ours, _ = pair
    seqs = random_sequences(hf.config.vocab_size, 4)
    ids, cu = torch.cat(seqs), cu_seqlens_from_lengths([len(s) for s in seqs])
    labels = shift_labels(ids, cu)
    with torch.no_grad():
        out = ours(ids, cu_seqlens=cu, labels=labels, temperature=0.7, chunk_size=16)
        ref_lp, ref_ent = logprobs_entropy_reference(hf_per_sequence(hf, seqs) / 0.7, labels)
    errs = rel_err(out.logprobs, ref_lp), rel_err(out.entropy, ref_ent)
    print(f"logprobs {errs[0]:.2e}, entropy {errs[1]:.2e}")
    assert max(errs) <= TOL
    assert out.logits is None


def test_gradients_match_transformers(pair):
    hf, ours, _ = pair
    seqs = random_sequences(hf.config.vocab_size, 5)
    ids, cu = torch.cat(seqs), cu_seqlens_from_lengths([len(s) for s in seqs])
    labels = shift_labels(ids, cu)
    weights = torch.randn(ids.shape[0], generator=torch.Generator().manual_seed(5))
    ours.zero_grad()
    (ours(ids, cu_seqlens=cu, labels=labels).logprobs * weights).sum().backward()
    hf.zero_grad()
    logp = torch.log_softmax(hf_per_sequence(hf, seqs), -1)  # one sequence at a time: HF has no packed mode
    tok = torch.where(labels == -100, 0.0, logp.gather(1, labels.clamp_min(0)[:, None]).squeeze(1))
    (tok * weights).sum().backward()
    ref = {n: p.grad for n, p in hf.named_parameters()}
    ours_grads = {n: p.grad for n, p in ours.named_parameters()}
    assert ours_grads.keys() == ref.keys()  # HF's names, nothing else

    def floor(name):
        """A NoPE layer's k bias adds the same q.b to all of a query's scores, which softmax cancels: its true
        gradient is 0 and both sides are rounding noise, measured against the scale of the layer's k weight's."""
        layer = name.split(".")[2] if name.endswith("self_attn.k_proj.bias") else None
        if layer is None or ours.config.use_rope(int(layer)):
            return 0.0
        return float(ref[name.replace(".bias", ".weight")].abs().max())

    errs = {n: rel_err(g, ref[n], floor(n)) for n, g in ours_grads.items()}
    worst = max(errs, key=errs.get)
    print(f"worst gradient: {worst} {errs[worst]:.2e}")
    assert errs[worst] <= TOL, worst
    assert float(ours_grads["model.layers.1.feed_forward.experts.gate_up_proj"].abs().max()) > 0


def test_router_stats_count_hf_routing(pair):
    hf, ours, _ = pair
    cfg = ours.config
    seqs = random_sequences(hf.config.vocab_size, 6)
    T = sum(len(s) for s in seqs)
    with torch.no_grad():
        stats = packed(ours, seqs).router_stats
        ids, mask = padded(seqs, [True, False, True, False])
        padded_stats = ours(ids, attention_mask=mask).router_stats
        per_seq = [hf(input_ids=s[None], output_router_logits=True).router_logits for s in seqs]
    hf_logits = [torch.cat([r[i] for r in per_seq]) for i in range(len(cfg.moe_layers))]  # [T, E] per MoE layer
    counts = torch.stack([torch.bincount(lg.topk(cfg.num_experts_per_tok, -1).indices.flatten(),
                                         minlength=cfg.num_local_experts) for lg in hf_logits])
    assert stats.tokens_per_expert.tolist() == counts.tolist()
    assert stats.tokens_per_expert.sum(-1).tolist() == [T * cfg.num_experts_per_tok] * len(cfg.moe_layers)
    assert torch.equal(padded_stats.tokens_per_expert, stats.tokens_per_expert)  # padding is not routed
    E = cfg.num_local_experts
    switch = [E * (c.float() / T * torch.softmax(lg, -1).mean(0)).sum() for c, lg in zip(counts, hf_logits)]
    aux_err = rel_err(stats.aux_loss, cfg.router_aux_loss_coef * torch.stack(switch).mean())
    print(f"tokens per expert {stats.tokens_per_expert.tolist()}; aux loss {float(stats.aux_loss):.6f}, "
          f"error {aux_err:.2e}")
    assert aux_err <= TOL
    assert router_stats([], 1, 0.001) is None and router_stats(hf_logits, 1, 0.0).aux_loss is None


def _grouped_mm_runs_on_cpu() -> bool:
    try:
        torch._grouped_mm(torch.ones(2, 8), torch.ones(2, 8, 8), offs=torch.tensor([1, 2], dtype=torch.int32))
    except (RuntimeError, NotImplementedError, AttributeError):
        return False
    return True


@pytest.mark.skipif(not _grouped_mm_runs_on_cpu(), reason="this torch has no CPU torch._grouped_mm; the loop "
                    "(which runs the same expert-sorted rows and counts) is then the only CPU path")
def test_grouped_mm_matches_expert_loop_on_cpu(pair, moe_backend, grouped_mm_calls):
    """The grouped-GEMM path (tokens sorted by expert, int32 offsets) against the per-expert loop, forward and
    backward, in fp32 on CPU, where this torch runs `_grouped_mm` too."""
    hf, ours, _ = pair
    seqs = random_sequences(hf.config.vocab_size, 7)

    def run(backend):
        moe_backend(backend)
        ours.zero_grad()
        out = packed(ours, seqs).logits
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in ours.named_parameters()}

    (loop, loop_g) = run("loop")
    assert not grouped_mm_calls
    (grouped, grouped_g) = run("grouped")
    assert len(grouped_mm_calls) == 2 * len(ours.config.moe_layers)  # gate_up and down of every MoE layer
    errs = [rel_err(grouped, loop)] + [rel_err(g, loop_g[n]) for n, g in grouped_g.items()]
    print(f"grouped vs loop: logits {errs[0]:.2e}, worst gradient {max(errs[1:]):.2e}")
    assert max(errs) <= TOL


@pytest.mark.gpu
def test_grouped_mm_matches_expert_loop_bf16_cuda(moe_backend, grouped_mm_calls):
    """`auto` takes `torch._grouped_mm` for CUDA bf16: it must agree with the loop run in bf16. On a GPU machine:
    `python -m pytest tests/test_llama4.py -m gpu`."""
    cfg = Llama4Config.from_hf(dict(KINDS["maverick"], model_type="llama4_text", interleave_moe_layer_step=1,
                                    intermediate_size=64))
    model = Llama4ForCausalLM(cfg)
    model.init_weights(seed=0)
    model = model.to("cuda", torch.bfloat16)
    seqs = [s.cuda() for s in random_sequences(cfg.vocab_size, 8, [200, 57, 1, 130])]

    def run(backend):
        moe_backend(backend)
        model.zero_grad()
        out = packed(model, seqs).logits
        out.float().square().mean().backward()
        return out.float(), model.model.layers["0"].feed_forward.experts.gate_up_proj.grad.float()

    (loop, loop_g) = run("loop")
    assert not grouped_mm_calls
    (grouped, grouped_g) = run("auto")
    assert len(grouped_mm_calls) == 2 * cfg.num_hidden_layers  # auto took the grouped path in every MoE layer
    errs = rel_err(grouped, loop), rel_err(grouped_g, loop_g)
    print(f"bf16 grouped vs loop: logits {errs[0]:.2e}, experts.gate_up_proj gradient {errs[1]:.2e}")
    # bf16 (8 mantissa bits): the two paths round partial sums differently; 1e-2 is DESIGN.md's bf16 bound.
    assert max(errs) <= 1e-2


# Exact counts from `Llama4Config.num_params` of the published configs (total ~108B of Scout's 109B: the rest is its
# vision tower; 17B active for both).
FLAVOR_COUNTS = {"llama4-scout": (107_769_861_120, 17_172_894_720),
                 "llama4-maverick": (400_711_848_960, 17_184_691_200)}


@pytest.mark.parametrize("name", sorted(FLAVOR_COUNTS))
def test_flavor_parameter_counts_match_transformers_meta_model(name):
    cfg = llama4_flavor(name)
    total, active = FLAVOR_COUNTS[name]
    assert (cfg.num_params(), cfg.num_params(active=True)) == (total, active)
    hf_cfg = transformers.Llama4TextConfig(**{k: v for k, v in cfg.to_hf().items()
                                              if k not in ("architectures", "rope_scaling", "rope_theta")})
    with torch.device("meta"):
        hf = transformers.Llama4ForCausalLM(hf_cfg)
        ours = Llama4ForCausalLM(cfg)
    assert sum(p.numel() for p in ours.parameters()) == total
    assert sum(p.numel() for p in hf.parameters()) == total
    # HF's active count: everything but the routed experts a token does not use.
    experts = sum(p.numel() for n, p in hf.named_parameters() if ".experts." in n)
    unused = experts * (cfg.num_local_experts - cfg.num_experts_per_tok) // cfg.num_local_experts
    assert sum(p.numel() for p in hf.parameters()) - unused == active
    print(f"{name}: {total / 1e9:.2f}B total, {active / 1e9:.2f}B active")


def test_init_weights_is_hfs_init_and_seeded():
    cfg = Llama4Config.from_hf(dict(KINDS["maverick"], model_type="llama4_text", num_local_experts=16))
    a, b = Llama4ForCausalLM(cfg), Llama4ForCausalLM(cfg)
    a.init_weights(seed=3)
    b.init_weights(seed=3)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name  # the same seed gives the same weights
    layer = a.model.layers["1"]
    assert torch.equal(layer.input_layernorm.weight, torch.ones(cfg.hidden_size))
    for w in (layer.feed_forward.experts.gate_up_proj, layer.feed_forward.router.weight):
        assert 0.015 < float(w.std()) < 0.025  # normal(0, initializer_range=0.02), as HF's _init_weights
    assert torch.allclose(a.model.rotary_emb.inv_freq, transformers.Llama4ForCausalLM(
        transformers.Llama4TextConfig(**KINDS["maverick"])).model.rotary_emb.inv_freq)


def test_save_pretrained_loads_in_transformers_as_is(pair, tmp_path):
    hf, ours, _ = pair
    ours.save_pretrained(tmp_path / "export")
    back, info = transformers.Llama4ForCausalLM.from_pretrained(tmp_path / "export", output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    for name, t in hf.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name  # fp32 written, fp32 read: bit for bit
    assert back.config.no_rope_layers == hf.config.no_rope_layers and back.config.moe_layers == hf.config.moe_layers
    ids = random_sequences(hf.config.vocab_size, 9, [24])[0][None]
    with torch.no_grad():
        err = rel_err(back.eval()(input_ids=ids).logits, hf(input_ids=ids).logits)
    assert err == 0.0, err


def test_loads_the_text_model_of_a_multimodal_folder(pair, tmp_path):
    """Published checkpoints are `Llama4ForConditionalGeneration`: the text model's tensors under `language_model.`
    beside the vision tower's, and its config under `text_config`."""
    from safetensors.torch import save_file

    hf, ours, path = pair
    state = {"language_model." + k: v.contiguous() for k, v in hf.state_dict().items()}
    if hf.config.tie_word_embeddings:
        del state["language_model.lm_head.weight"]  # a tied checkpoint stores the table once
    state["vision_model.patch_embedding.linear.weight"] = torch.randn(8, 12)  # not the text model's: not read
    save_file(state, str(tmp_path / "model.safetensors"))
    text = json.loads((path / "config.json").read_text())
    config = {"model_type": "llama4", "architectures": ["Llama4ForConditionalGeneration"], "text_config": text,
              "vision_config": {"model_type": "llama4_vision_model", "hidden_size": 8}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert Llama4Config.from_hf(tmp_path) == ours.config
    mm = Llama4ForCausalLM.from_pretrained(tmp_path)
    for name, t in ours.state_dict().items():
        assert torch.equal(mm.state_dict()[name], t), name


def test_config_errors_name_the_field(pair, moe_backend):
    _, ours, path = pair
    text = json.loads((path / "config.json").read_text())
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        Llama4Config.from_hf(dict(text, hidden_act="gelu"))
    with pytest.raises(ValueError, match="layer_types=.*disagrees with no_rope_layers"):
        Llama4Config.from_hf(dict(text, layer_types=["full_attention"] * 4))
    with pytest.raises(ValueError, match="no_rope_layers=\\[1, 2\\]"):
        Llama4Config.from_hf(dict(text, no_rope_layers=[1, 2]))
    with pytest.raises(ValueError, match="model_type='llama'.*'llama4_text'"):
        Llama4Config.from_hf(dict(text, model_type="llama"))
    with pytest.raises(ValueError, match="needs a text_config"):
        Llama4Config.from_hf({"model_type": "llama4"})
    with pytest.raises(ValueError, match="rope_type='yarn'"):
        Llama4Config.from_hf(dict(text, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}))
    with pytest.raises(KeyError, match="llama4-behemoth"):
        llama4_flavor("llama4-behemoth")
    moe_backend("grouped")
    odd = Llama4ForCausalLM(dataclasses.replace(ours.config, intermediate_size=6))
    with pytest.raises(ValueError, match="intermediate_size=6 to be multiples of 4"):
        odd(torch.tensor([1, 2]), cu_seqlens=cu_seqlens_from_lengths([2]))


def test_an_all_dense_llama4_keeps_fsdp_mixed_precision():
    """Casts at use (dtllama's dense model, no data parallelism) are not Llama 4's: its layers hold plain
    `nn.Linear`s. Even with no MoE layer it is refused there, and `parallelize` leaves it to FSDP."""
    from dtllama.parallel import apply_mixed_precision
    from dtllama.parallel.mixed_precision import supports_casts

    cfg = Llama4Config.from_hf(dict(KINDS["scout"], model_type="llama4_text", moe_layers=[]))
    with torch.device("meta"):
        model = Llama4ForCausalLM(cfg)
    assert not supports_casts(model)
    with pytest.raises(TypeError, match=r"Llama4ForCausalLM does not cast .*FSDPOptions\(param_dtype="):
        apply_mixed_precision(model, torch.bfloat16)
