"""The Hugging Face adapter (`dtllama.models.hf`): transformers' own decoders of every text family on packed batches,
dtllama's heads and parallel layer, against transformers' own forward (eager attention, padded batches)."""

from __future__ import annotations

import pytest
import torch
import vl_cases
from helpers import logprobs_entropy_reference, rel_err
from pool import get_pool
from test_hf_parity import random_batch
from test_protocol import check_layout
from test_qwen3 import check_causal_lm_parity, check_value_head

import dtllama
from dtllama.models.hf import HFCausalLM, HFConfig, HFValue
from dtllama.ops import pack, shift_labels
from dtllama.parallel import ParallelDims

transformers = pytest.importorskip("transformers", reason="the adapter tests need transformers ([test] extra)")

TOL = 1e-5  # fp32, packed vs padded and another association order: as for the native families
COMMON = dict(vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, attention_dropout=0.0, tie_word_embeddings=False)
# One tiny config per family, from transformers' own config classes: what each exercises is in its comment.
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),  # q/k/v bias
    "qwen3": ("Qwen3Config", dict(head_dim=16)),  # q/k head norms
    "qwen3_moe": ("Qwen3MoeConfig", dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                         norm_topk_prob=True)),
    "mistral": ("MistralConfig", dict(sliding_window=5)),  # a window shorter than the sequences
    # softcapped attention logits, query scaling other than head_dim**-0.5, alternating sliding / full layers
    "gemma2": ("Gemma2Config", dict(head_dim=16, sliding_window=5, query_pre_attn_scalar=10,
                                    attn_logit_softcapping=3.0, final_logit_softcapping=None)),
    "gemma3_text": ("Gemma3TextConfig", dict(head_dim=16, sliding_window=5, query_pre_attn_scalar=10,
                                             layer_types=["sliding_attention", "full_attention"])),
    "phi3": ("Phi3Config", dict(pad_token_id=0)),  # fused qkv and gate_up projections
    # multi-head latent attention: low-rank q/kv, a value head dim (12) other than q/k's (24), MoE after layer 0
    "deepseek_v3": ("DeepseekV3Config", dict(num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
                                             qk_nope_head_dim=16, v_head_dim=12, n_routed_experts=4,
                                             num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=1,
                                             n_group=1, topk_group=1)),
    # attention sinks, sliding windows, MoE
    "gpt_oss": ("GptOssConfig", dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=5)),
}


def hf_config(family: str, **overrides):
    cls, extra = FAMILIES[family]
    return getattr(transformers, cls)(**{**COMMON, **extra, **overrides})


def hf_model(family: str, seed: int, head: str = "ForCausalLM"):
    """transformers' model of `family` (eager attention), norms and sinks away from their init so they matter."""
    torch.manual_seed(seed)
    config = hf_config(family)
    if head != "ForCausalLM":
        config.num_labels = 1
        auto = getattr(transformers, "AutoModel" + head)
    else:
        auto = transformers.AutoModelForCausalLM
    model = auto.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("sinks"):
                p.normal_(0.0, 1.0)
    return model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_matches_transformers_packed_and_padded(family, tmp_path):
    """Saved by transformers, loaded through the adapter: logits of a padded batch, log-probs and entropy of it
    packed, and every parameter's gradient of a loss of them equal transformers' own within TOL."""
    seed = int(torch.randint(0, 2**16, ()))
    hf = hf_model(family, seed)
    ours = check_causal_lm_parity(hf, tmp_path, seed, adapter=True)
    assert type(ours) is HFCausalLM and type(ours.model) is type(hf.model)  # transformers' own decoder


def test_padded_rows_never_see_each_other():
    """A padded batch is unpacked: each row's outputs are those of the row alone (transformers PR #46634 let a
    2-D mask over packed rows leak across them)."""
    torch.manual_seed(0)
    ours = HFCausalLM(HFConfig(hf_config("gemma3_text")))
    ours.init_weights(1)
    ids, mask = random_batch(COMMON["vocab_size"], 3)
    with torch.no_grad():
        batch = ours(ids, attention_mask=mask).logits
        for b in range(ids.shape[0]):
            alone = ours(ids[b][mask[b]][None]).logits[0]
            assert rel_err(batch[b][mask[b]], alone) <= TOL


def test_value_head_matches_transformers(tmp_path):
    check_value_head(hf_model("qwen3", 5, head="ForSequenceClassification"), tmp_path, HFValue, adapter=True)


def test_export_loads_in_transformers_with_equal_logits(tmp_path):
    ours = HFCausalLM(HFConfig(hf_config("gemma3_text", tie_word_embeddings=True)))
    ours.init_weights(int(torch.randint(0, 2**16, ())))
    assert ours.lm_head is None  # tied: the head reads the embedding, the files hold it once
    ours.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(hf).__name__ == "Gemma3ForCausalLM"
    ids = torch.randint(0, COMMON["vocab_size"], (1, 20))
    with torch.no_grad():
        assert rel_err(ours(ids).logits, hf(ids).logits) <= TOL


def test_init_is_transformers_and_layout_independent():
    """`init_weights` is transformers' init from the seed (Gemma's norms start at 0: `1 + w`), one full tensor at
    a time, so any layout starts from the same numbers."""
    ours = HFCausalLM(HFConfig(hf_config("gemma3_text")))
    ours.init_weights(7)
    norms = [p for n, p in ours.named_parameters() if n.endswith("norm.weight")]
    assert norms and all(not p.any() for p in norms)
    again = HFCausalLM(HFConfig(hf_config("gemma3_text")))
    again.init_weights(7)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), again.state_dict().values()))


def test_native_families_win_unless_the_adapter_is_asked_for():
    qwen3 = hf_config("qwen3").to_dict()
    assert type(dtllama.config_from_hf(qwen3)).__name__ == "Qwen3Config"
    assert type(dtllama.config_from_hf(qwen3, adapter=True)) is HFConfig
    assert type(dtllama.config_from_hf(hf_config("gemma3_text").to_dict())) is HFConfig


def test_what_the_adapter_cannot_honour_is_refused_by_name():
    with pytest.raises(ValueError, match="final_logit_softcapping=30.0"):
        HFCausalLM(HFConfig(hf_config("gemma2", final_logit_softcapping=30.0)))
    with pytest.raises(ValueError, match="attention_dropout=0.1"):
        HFCausalLM(HFConfig(hf_config("llama", attention_dropout=0.1)))
    next_cfg = transformers.Qwen3NextConfig(**{**COMMON, "num_hidden_layers": 2, "head_dim": 16,
                                               "layer_types": ["linear_attention", "full_attention"]})
    with pytest.raises(ValueError, match="layer 0 is 'linear_attention', not token-wise attention"):
        HFCausalLM(HFConfig(next_cfg))
    for family, degree, message in [
            ("deepseek_v3", dict(tp=2), "tp=2 is not available.*base_model_tp_plan uses \\['mla_kv_a_proj'\\]"),
            ("qwen3", dict(pp=2), "pp=2 is not available.*pipeline"),
            ("qwen3", dict(tp=4), "tp=4 does not fit .*num_key_value_heads=2"),
            ("phi3", dict(tp=2), "tp=2 is not available.*dropout \\{'resid_pdrop': 0.1\\} under tp")]:
        with pytest.raises(ValueError, match=message):
            world = degree.get("tp", 1) * degree.get("pp", 1)
            extra = dict(resid_pdrop=0.1) if family == "phi3" else {}
            ParallelDims(**degree, dp_shard=1).resolve(world, HFConfig(hf_config(family, **extra)))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_compiled_layers_equal_eager(family):
    """Per-block compile (`fullgraph=True`) of transformers' decoder layers: the same log-probs and gradients."""
    from dtllama.parallel.compile import apply_compile

    torch._dynamo.reset()
    config = HFConfig(hf_config(family))
    eager, compiled = HFCausalLM(config), HFCausalLM(config)
    eager.init_weights(3)
    compiled.init_weights(3)
    apply_compile(compiled)
    ids, mask = random_batch(COMMON["vocab_size"], 4)
    p = pack(ids, mask)
    labels = shift_labels(p.input_ids, p.cu_seqlens)
    outs = [m(p.input_ids, p.position_ids, p.cu_seqlens, p.max_seqlen, labels=labels) for m in (eager, compiled)]
    for o, m in zip(outs, (eager, compiled)):
        (o.logprobs.sum() + 0.3 * o.entropy.sum()).backward()
    assert rel_err(outs[1].logprobs, outs[0].logprobs.detach()) <= TOL
    grads = {n: p.grad for n, p in eager.named_parameters()}
    for n, p in compiled.named_parameters():
        assert rel_err(p.grad, grads[n.replace("._orig_mod", "")], floor=1e-3) <= TOL, n


LAYOUT = dict(family="hf", **{**COMMON, "vocab_size": 61, "hidden_size": 32, "intermediate_size": 16,
                              "initializer_range": 0.2})


LAYOUTS = {"cp2": (2, dict(cp=2)), "cp4-kv2": (4, dict(cp=4)), "fsdp2": (2, dict(dp_shard=2)), "tp2": (2, dict(tp=2))}
TP_LESS = {("deepseek_v3", "tp")}  # transformers' plan holds "mla_kv_a_proj", which dtllama does not map


@pytest.mark.parametrize("world, layout, family", [
    *[(*LAYOUTS[name], family) for family in FAMILIES for name in LAYOUTS if (family, name[:2]) not in TP_LESS],
    (4, dict(cp=2, dp_shard=2), "mistral"), (4, dict(tp=2, dp_shard=2), "qwen3"), (4, dict(tp=2, cp=2), "gemma3_text"),
], ids=[*[f"{family}-{name}" for family in FAMILIES for name in LAYOUTS if (family, name[:2]) not in TP_LESS],
        "mistral-cp2xfsdp2", "qwen3-tp2xfsdp2", "gemma3-tp2xcp2"])
def test_layouts_match_single_device(world, layout, family):
    """Ulysses around the registered attention (at cp=4 the 2 KV heads repeated, a rank's slice of the sinks), FSDP
    over transformers' layers and TP from transformers' own plan (Phi-3's gathered fused projections, GPT-OSS's
    vocab-parallel embedding, Qwen3's head norms) equal one device, for every family: outputs, gradients,
    parameters after AdamW (DeepSeek-V3 has 4 KV heads: cp=4 splits them)."""
    _, extra = FAMILIES[family]
    extra = {k: v for k, v in extra.items() if k not in ("head_dim",)}
    config = dict(LAYOUT, model_type=family, **extra, head_dim=8)
    results = check_layout(world, layout, config, False, lengths=[9, 1, 12, 8, 5, 3])
    if "tp" in layout:  # transformers' plan placed: the plan's modules sharded over tp, the vocab-parallel head too
        on_tp = {n for n, p in results[0]["placements"].items() if p and "tp" in p[0] and "S(" in "".join(p[1])}
        sharded = "model.embed_tokens.weight" if family == "gpt_oss" else "model.layers.0.self_attn.o_proj.weight"
        assert {sharded, "lm_head.weight"} <= on_tp, on_tp


@pytest.mark.parametrize("layout", [dict(cp=2), dict(tp=2)], ids=["cp2", "tp2"])
def test_value_model_layouts_match_single_device(layout):
    config = dict(LAYOUT, model_type="qwen3", head_dim=8, architectures=["Qwen3ForSequenceClassification"])
    check_layout(2, layout, config, True, lengths=[9, 1, 12, 8, 5, 3])


# ------------------------------------------------------------------------------------------ the recipes


def hf_folder(path, family: str, **overrides) -> str:
    """A random-init transformers checkpoint of `family` with SmolLM2's tokenizer, as a user's folder would be."""
    from transformers import AutoTokenizer

    from dtllama.models.pretrained import smollm2_135m_instruct

    tokenizer = AutoTokenizer.from_pretrained(smollm2_135m_instruct())
    torch.manual_seed(0)
    config = hf_config(family, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, pad_token_id=0,
                       bos_token_id=1, eos_token_id=2, **overrides)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_train_recipe_trains_a_folder_of_another_family_and_exports_it(tmp_path):
    """`recipes/train.py --model FOLDER` on a family dtllama has no native module for (Gemma 3: sliding and full
    layers, query scaling, tied embeddings): the loss falls on 2 FSDP processes, and the export loads in
    transformers with the logits dtllama computes from it."""
    import json
    import os

    from helpers import ROOT, torchrun

    folder = hf_folder(tmp_path / "gemma3", "gemma3_text", tie_word_embeddings=True)
    metrics = tmp_path / "metrics.jsonl"
    torchrun(2, os.path.join(ROOT, "recipes", "train.py"), "--model", folder, "--steps", "4", "--lr", "3e-3",
             "--metrics", str(metrics), "--export-hf", str(tmp_path / "out"), cwd=tmp_path)
    losses = [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ours = dtllama.from_pretrained(tmp_path / "out")
    assert type(ours) is HFCausalLM and type(hf).__name__ == "Gemma3ForCausalLM"
    ids = torch.randint(0, hf.config.vocab_size, (1, 24))
    with torch.no_grad():
        assert rel_err(ours(ids).logits, hf(ids).logits) <= TOL


def test_ppo_recipe_on_the_adapter_gives_world_1_losses_at_cp2(tmp_path):
    """PPO with actor, reference and critic all transformers' Qwen3 modules (`--hf-adapter`): Ulysses cp=2 gives
    world 1's per-epoch losses."""
    from test_rl import _check_rows, ppo

    folder = hf_folder(tmp_path / "qwen3", "qwen3")
    # A smaller step than test_rl's debug flavor takes: this model's vocabulary is SmolLM2's 49152 tokens.
    args = ("--iterations", "1", "--model", folder, "--hf-adapter", "--lr", "2e-4")
    one = ppo(tmp_path, 1, *args)
    two = ppo(tmp_path, 2, *args, "--cp", "2")
    for rows in (one, two):
        _check_rows(rows, 1)
    assert one[0]["samples"] == two[0]["samples"]
    for key in ("pg_loss", "vf_loss", "kl"):
        for a, b in zip(one[0][key], two[0][key]):
            assert abs(a - b) <= 1e-5 * max(abs(a), 1e-3), (key, one[0][key], two[0][key])  # as test_rl's layouts


def test_set_overrides_a_transformers_config():
    """`--set FIELD=VALUE` on an adapter config: the text model's fields, a new depth re-deriving `layer_types`,
    an unknown field refused by name; the original untouched."""
    from dtllama.train.source import override

    config = HFConfig(hf_config("gemma3_text"))
    deeper = override(config, ["num_hidden_layers=4", "sliding_window=7"])
    assert (deeper.num_hidden_layers, deeper.sliding_window, config.num_hidden_layers) == (4, 7, 2)
    assert deeper.layer_types == ["sliding_attention", "full_attention"] * 2
    with pytest.raises(ValueError, match="--set 'no_such_field=1'"):
        override(config, ["no_such_field=1"])


# ------------------------------------------------------------------------------------------ vision-language models


def hf_vl_model(seed: int):
    """transformers' Qwen2.5-VL (eager attention in both towers), norms away from their init so they matter."""
    torch.manual_seed(seed)
    model = transformers.Qwen2_5_VLForConditionalGeneration(vl_cases.hf_vl_config()).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
    return model


def padded(seqs, left: list[bool]):
    """The sequences as a `[B, S]` batch and mask, rows right- or left-padded."""
    S = max(len(s[0]) for s in seqs)
    ids, mask = torch.zeros(len(seqs), S, dtype=torch.long), torch.zeros(len(seqs), S, dtype=torch.bool)
    for b, (s, *_) in enumerate(seqs):
        cols = slice(S - len(s), S) if left[b] else slice(0, len(s))
        ids[b, cols], mask[b, cols] = s, True
    return ids, mask


def test_vl_model_matches_transformers_packed_and_padded(tmp_path):
    """Qwen2.5-VL saved by transformers, loaded through the adapter: a padded batch of text, images and a video (two
    images and a video of 2 temporal patches, in three of five rows, mixed padding sides) gives transformers'
    logits; packed, its log-probs, entropy and the gradients of every parameter (the vision tower's too) within
    TOL."""
    seed = int(torch.randint(0, 2**16, ()))
    hf = hf_vl_model(seed)
    hf.save_pretrained(tmp_path)
    ours = dtllama.from_pretrained(tmp_path)
    assert type(ours) is HFCausalLM and {n.split(".")[0] for n, _ in ours.named_parameters()} == {
        "model", "visual", "lm_head"}  # the names of the checkpoint's files
    seqs, _ = vl_cases.random_batch(seed)
    media = vl_cases.images(seqs)
    ids, mask = padded(seqs, left=[False, True, True, False, True])
    ref = hf(input_ids=ids, attention_mask=mask.long(), mm_token_type_ids=vl_cases.token_types(ids), **media).logits
    with torch.no_grad():
        assert rel_err(ours(ids, attention_mask=mask, **media).logits[mask], ref[mask].detach()) <= TOL
    p = pack(ids, mask)
    labels = shift_labels(p.input_ids, p.cu_seqlens)
    out = ours(p.input_ids, p.position_ids, p.cu_seqlens, p.max_seqlen, labels=labels, **media)
    ref_lp, ref_ent = logprobs_entropy_reference(ref[mask], labels)
    assert rel_err(out.logprobs, ref_lp.detach()) <= TOL and rel_err(out.entropy, ref_ent.detach()) <= TOL
    (out.logprobs.sum() + 0.3 * out.entropy.sum()).backward()
    (ref_lp.sum() + 0.3 * ref_ent.sum()).backward()
    theirs = {ours._own_key(n): p for n, p in hf.named_parameters()}
    assert set(theirs) == {n for n, _ in ours.named_parameters()}
    for name, param in ours.named_parameters():
        assert rel_err(param.grad, theirs[name].grad, floor=1e-3) <= TOL, name
    assert any(n.startswith("visual.") and p.grad.abs().max() > 0 for n, p in ours.named_parameters())


def test_vl_images_are_checked_against_their_tokens():
    ours = HFCausalLM(HFConfig(vl_cases.hf_vl_config()))
    ours.init_weights(0)
    seqs, _ = vl_cases.random_batch(1)
    ids, media = torch.cat([s[0] for s in seqs[:4]]), vl_cases.images(seqs[:4])  # the images alone
    cu = torch.tensor([0, len(ids)])
    with pytest.raises(ValueError, match="hold 6 image tokens .* but no pixel_values"):
        ours(ids, cu_seqlens=cu)
    with pytest.raises(ValueError, match="holds 24 patches but pixel_values has 16 rows"):
        ours(ids, cu_seqlens=cu, pixel_values=media["pixel_values"][:16], image_grid_thw=media["image_grid_thw"])
    with pytest.raises(ValueError, match="hold 5 image tokens .* give 6 features"):
        first = int((ids == vl_cases.IMAGE).nonzero()[0])
        ours(torch.cat([ids[:first], ids[first + 1:]]), cu_seqlens=cu - torch.tensor([0, 1]), **media)
    inside = int((ids == vl_cases.IMAGE).nonzero()[1])  # between the first image's first two tokens
    with pytest.raises(ValueError, match="tokens \\[0, %d\\) holds 1 tokens .* a cut through an image" % inside):
        ours(ids, cu_seqlens=torch.tensor([0, inside, len(ids)]), **media)
    with pytest.raises(ValueError, match="pixel_values was given without image_grid_thw"):
        ours(ids, cu_seqlens=cu, pixel_values=media["pixel_values"])
    with pytest.raises(ValueError, match="qwen2_vl is a vision-language model the adapter does not place images for"):
        HFCausalLM(HFConfig(transformers.Qwen2VLConfig(text_config=vl_cases.TEXT, vision_config=dict(depth=1))))
    video = vl_cases.images(seqs[4:])
    ids, cu = seqs[4][0], torch.tensor([0, len(seqs[4][0])])
    with pytest.raises(ValueError, match="hold 8 video tokens .* but no pixel_values_videos"):
        ours(ids, cu_seqlens=cu)
    with pytest.raises(ValueError, match="second_per_grid_ts of shape \\(2,\\): one per video of video_grid_thw"):
        ours(ids, cu_seqlens=cu, **dict(video, second_per_grid_ts=torch.ones(2)))
    text = HFCausalLM(HFConfig(hf_config("qwen3")))
    with pytest.raises(ValueError, match="has no vision tower: drop \\['image_grid_thw', 'pixel_values'\\]"):
        text(torch.tensor([1, 2, 3]), cu_seqlens=torch.tensor([0, 3]), **media)
    with pytest.raises(ValueError, match="no classification head for vision-language models"):
        HFValue(HFConfig(vl_cases.hf_vl_config()))
    wide = dict(vl_cases.TEXT, hidden_size=64)  # head_dim 16: mRoPE's 4 rotary pairs no longer cover it
    with pytest.raises(ValueError, match="mrope_section=\\[1, 1, 2\\] covers 8 rotary dims, but head_dim is 16"):
        HFCausalLM(HFConfig(vl_cases.hf_vl_config(text_config=wide)))


def test_vl_export_loads_in_transformers_with_equal_logits(tmp_path):
    ours = HFCausalLM(HFConfig(vl_cases.hf_vl_config()))
    ours.init_weights(int(torch.randint(0, 2**16, ())))
    ours.save_pretrained(tmp_path)
    hf = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(hf).__name__ == "Qwen2_5_VLForConditionalGeneration"
    seqs, _ = vl_cases.random_batch(3)
    ids, mask = padded(seqs[:1], left=[False])
    with torch.no_grad():
        theirs = hf(input_ids=ids, mm_token_type_ids=vl_cases.token_types(ids), **vl_cases.images(seqs[:1]))
        assert rel_err(ours(ids, **vl_cases.images(seqs[:1])).logits, theirs.logits) <= TOL


@pytest.mark.parametrize("world, layout", [(2, dict(cp=2)), (4, dict(cp=4)), (2, dict(dp_shard=2)), (2, dict(tp=2))],
                         ids=["cp2", "cp4-kv2", "fsdp2-no-image", "tp2"])
def test_vl_layouts_match_single_device(world, layout):
    """Ulysses slices the embeddings after the images are scattered in, with the [3, T] mRoPE positions; under FSDP
    the rank whose sequences hold no image (here rank 1) runs the tower on a dummy image: outputs, gradients and
    parameters after AdamW equal one device's."""
    seed = int(torch.randint(0, 2**16, ()))
    seqs, labels = vl_cases.random_batch(seed)
    if "dp_shard" in layout:  # rank 1's sequences (1 and 3) are text only
        assert all(seqs[i][1] is None for i in (1, 3))  # (0, 2, 4: two images and the video on rank 0)
    layout = dict(layout, dp_shard=layout.get("dp_shard", -1))
    results = get_pool(world).run(vl_cases.run_rank, layout, seqs, labels, seed)
    outs, grads, params, norm = vl_cases.reference(seqs, labels, seed)
    lengths = [len(s[0]) for s in seqs]
    ref = {k: v.split(lengths) for k, v in outs.items()}
    grad_floor = 0.1 * max(float(g.abs().max()) for g in grads.values())
    param_floor = max(float(p.abs().max()) for p in params.values())
    for r in results:
        for key, got in r["outs"].items():
            for j, got_seq in zip(r["indices"], got.split([lengths[i] for i in r["indices"]])):
                assert rel_err(got_seq, ref[key][j].detach()) <= TOL, (key, j)
        for name in grads:
            assert rel_err(r["grads"][name], grads[name], floor=grad_floor) <= TOL, ("grad", name)
            assert rel_err(r["params"][name], params[name], floor=param_floor) <= TOL, ("param", name)
        assert abs(r["norm"] - norm) <= TOL * norm


def test_vl_compiled_layers_equal_eager():
    """Per-block compile of the VL decoder's layers (mRoPE's cos/sin come in from outside them): the same log-probs
    and gradients, the tower's included."""
    from dtllama.parallel.compile import apply_compile

    torch._dynamo.reset()
    config = HFConfig(vl_cases.hf_vl_config())
    eager, compiled = HFCausalLM(config), HFCausalLM(config)
    eager.init_weights(4)
    compiled.init_weights(4)
    apply_compile(compiled)
    seqs, labels = vl_cases.random_batch(int(torch.randint(0, 2**16, ())))
    outs = [vl_cases.objective(m, seqs, labels, 1, 1) for m in (eager, compiled)]
    for loss, _ in outs:
        loss.backward()
    assert rel_err(outs[1][1]["logprobs"], outs[0][1]["logprobs"].detach()) <= TOL
    grads = {n: p.grad for n, p in eager.named_parameters()}
    for n, p in compiled.named_parameters():
        assert rel_err(p.grad, grads[n.replace("._orig_mod", "")], floor=1e-3) <= TOL, n
