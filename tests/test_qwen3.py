"""Qwen3 (dense), the first family on the model protocol alone: transformers parity (logits packed and padded,
log-probs, entropy, gradients, the value head), flavors against the published counts, HF export, and parallel
layouts (TP with the head norms, CP, FSDP, pipeline) against one device."""

from __future__ import annotations

import pytest
import torch
from helpers import logprobs_entropy_reference, rel_err
from test_hf_parity import random_batch
from test_pp import check_pipeline
from test_protocol import check_layout

import dtllama
from dtllama.models.qwen3 import Qwen3Config, Qwen3ForCausalLM, Qwen3ForValue
from dtllama.ops import cu_seqlens_from_lengths, pack, shift_labels
from dtllama.parallel.pp import PipelineOptions

transformers = pytest.importorskip("transformers", reason="the HF parity tests need transformers ([test] extra)")

TOL = 1e-5  # fp32 matmuls in another association order (packed vs batched): ~100 ulps of headroom, as for Llama
TINY = dict(vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=1e6,
            tie_word_embeddings=False)


def hf_qwen3(seed: int, tie: bool = False, head: str = "ForCausalLM"):
    torch.manual_seed(seed)
    cfg = transformers.Qwen3Config(**dict(TINY, tie_word_embeddings=tie), attention_dropout=0.0, use_sliding_window=False)
    cls = getattr(transformers, "Qwen3" + head)
    if head != "ForCausalLM":
        cfg.num_labels = 1
    model = cls(cfg).float().eval()
    with torch.no_grad():  # norms away from 1, so that the head norms' weights matter
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def check_causal_lm_parity(hf, folder, seed: int, adapter: bool = False):
    """`hf` saved to `folder` and loaded by dtllama (`adapter`: through transformers' own modules): logits of a padded
    batch, log-probs and entropy of it packed, and the gradients of every parameter against transformers' within
    TOL. Returns dtllama's model."""
    hf.save_pretrained(folder)
    ours = dtllama.from_pretrained(folder, adapter=adapter)
    ids, mask = random_batch(hf.config.vocab_size, seed)
    positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
    ref = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    with torch.no_grad():
        padded = ours(ids, attention_mask=mask).logits
    assert rel_err(padded[mask], ref[mask].detach()) <= TOL
    p = pack(ids, mask)
    labels = shift_labels(p.input_ids, p.cu_seqlens)
    out = ours(p.input_ids, p.position_ids, p.cu_seqlens, p.max_seqlen, labels=labels)
    ref_lp, ref_ent = logprobs_entropy_reference(ref[mask], labels)
    assert rel_err(out.logprobs, ref_lp.detach()) <= TOL and rel_err(out.entropy, ref_ent.detach()) <= TOL
    (out.logprobs.sum() + 0.3 * out.entropy.sum()).backward()
    (ref_lp.sum() + 0.3 * ref_ent.sum()).backward()
    theirs = dict(hf.named_parameters())
    assert set(theirs) == {n for n, _ in ours.named_parameters()}  # HF's names, nothing mapped
    for name, param in ours.named_parameters():
        if name == "model.embed_tokens.weight" and not adapter:  # HF's padding_idx row gets no gradient there (a
            continue  # documented choice); the adapter keeps transformers' embedding
        if theirs[name].grad is None:  # an expert no token of the batch chose: no gradient on either side
            assert param.grad is None or not param.grad.any(), name
            continue
        assert rel_err(param.grad, theirs[name].grad, floor=1e-3) <= TOL, name
    return ours


def check_value_head(hf, folder, value_class, adapter: bool = False) -> None:
    """`hf` (a `*ForSequenceClassification`) saved to `folder`, loaded by dtllama as `value_class`: equal values."""
    hf.save_pretrained(folder)
    ours = dtllama.from_pretrained(folder, value=True, adapter=adapter)
    assert type(ours) is value_class
    ids, mask = random_batch(hf.config.vocab_size, 5)
    positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        ref = hf.score(hf.model(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state)
        values = ours(ids, attention_mask=mask).values
    assert rel_err(values[mask], ref.squeeze(-1)[mask]) <= TOL


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_logits_logprobs_entropy_and_gradients_match_transformers(tie, tmp_path):
    seed = int(torch.randint(0, 2**16, ()))
    ours = check_causal_lm_parity(hf_qwen3(seed, tie), tmp_path, seed)
    assert type(ours) is Qwen3ForCausalLM
    assert any(n.endswith("self_attn.q_norm.weight") for n, _ in ours.named_parameters())


def test_value_head_matches_transformers(tmp_path):
    check_value_head(hf_qwen3(5, head="ForSequenceClassification"), tmp_path, Qwen3ForValue)


def test_export_loads_in_transformers_with_equal_logits(tmp_path):
    config = dtllama.flavors["qwen3-debug"]
    ours = Qwen3ForCausalLM(config)
    ours.init_weights(seed=int(torch.randint(0, 2**16, ())))
    ours.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(hf).__name__ == "Qwen3ForCausalLM"
    ids = torch.randint(0, config.vocab_size, (1, 20))
    with torch.no_grad():
        assert rel_err(ours(ids[0], cu_seqlens=cu_seqlens_from_lengths([20])).logits, hf(ids).logits[0]) <= TOL


@pytest.mark.parametrize("name, total, non_embedding", [
    ("qwen3-0.6b", 0.596, 0.44), ("qwen3-1.7b", 1.72, 1.41), ("qwen3-4b", 4.02, 3.63), ("qwen3-8b", 8.19, 6.95),
    ("qwen3-14b", 14.77, 13.21), ("qwen3-32b", 32.76, 31.21),
])  # the model cards: 0.6B (0.44B non-embedding), 1.7B (1.4B), 4.0B (3.6B), 8.2B (6.95B), 14.8B (13.2B), 32.8B (31.2B)
def test_flavors_match_the_published_counts(name, total, non_embedding):
    cfg = dtllama.flavors[name]
    with torch.device("meta"):
        n = sum(p.numel() for p in Qwen3ForCausalLM(cfg).parameters())
    assert n == cfg.num_params()
    embedding = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    assert abs(n / 1e9 - total) < 0.01 and abs((n - embedding) / 1e9 - non_embedding) < 0.01
    hf_cfg = transformers.Qwen3Config(**{k: v for k, v in cfg.to_hf().items() if k not in ("architectures",)})
    with torch.device("meta"):
        assert sum(p.numel() for p in transformers.Qwen3ForCausalLM(hf_cfg).parameters()) == n


def test_sliding_window_is_refused_by_name():
    with pytest.raises(ValueError, match="use_sliding_window=True"):
        Qwen3Config.from_hf(dict(model_type="qwen3", use_sliding_window=True, sliding_window=4096))
    with pytest.raises(ValueError, match="layer_types=.*sliding_attention"):
        dtllama.config_from_hf(dict(model_type="qwen3", layer_types=["full_attention", "sliding_attention"]))


LAYOUT_CONFIG = dict(family="qwen3", vocab_size=61, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=1e4,
                     tie_word_embeddings=False, initializer_range=0.2, torch_dtype="float32")


@pytest.mark.parametrize("world, layout", [
    (2, dict(tp=2)), (4, dict(tp=4)), (2, dict(cp=2)), (4, dict(dp_shard=2, tp=2)), (4, dict(dp_replicate=2)),
], ids=["tp2", "tp4-replicated-kv", "cp2", "fsdp2xtp2", "hsdp"])
def test_layouts_match_single_device(world, layout):
    """TP splits the heads and the head norms' weights stay whole (their gradient summed over the TP ranks)."""
    check_layout(world, layout, LAYOUT_CONFIG, False, lengths=[9, 1, 12, 8, 5, 3])


@pytest.mark.parametrize("schedule", ["1F1B", "Interleaved1F1B"])
def test_pipeline_matches_single_device(schedule):
    check_pipeline(2, dict(pp=2), 4, False, PipelineOptions(schedule, microbatches=4, microbatch_tokens=16),
                   config=dict(LAYOUT_CONFIG, tie_word_embeddings=True))
