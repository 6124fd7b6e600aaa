"""dtllama against Hugging Face transformers on the same saved checkpoint (fp32, CPU)."""

import pytest
import torch
from conftest import FAMILIES, hf_model
from helpers import rel_err

import dtllama
from dtllama.ops import cu_seqlens_from_lengths, pack

# fp32 matmuls in a different association order (packed vs batched, SDPA with a mask vs without)
# differ by a few ulps of the largest logit; 1e-5 relative is ~100 ulps of headroom.
TOL = 1e-5


def random_batch(vocab, seed, batch=4, max_len=24):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (batch,), generator=g)
    lengths[0] = 1  # a sequence of a single token
    S = int(lengths.max())
    ids = torch.randint(0, vocab, (batch, S), generator=g)
    mask = torch.arange(S)[None, :] < lengths[:, None]
    left = torch.rand(batch, generator=g) < 0.5  # mix right- and left-padded rows
    for b in range(batch):
        if left[b]:
            mask[b] = mask[b].flip(0)
    return ids, mask


@pytest.mark.parametrize("seed", [0, 1])
def test_causal_lm_logits_match_transformers(family, seed, tmp_path):
    hf = hf_model(family, seed)
    hf.save_pretrained(tmp_path)
    ours = dtllama.LlamaForCausalLM.from_pretrained(tmp_path)
    ids, mask = random_batch(hf.config.vocab_size, seed)
    positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        padded = ours(ids, attention_mask=mask).logits
        p = pack(ids, mask)
        packed = ours(p.input_ids, p.position_ids, p.cu_seqlens, p.max_seqlen).logits
    assert padded.shape == ref.shape
    assert rel_err(padded[mask], ref[mask]) <= TOL
    assert rel_err(packed, ref[mask]) <= TOL
    assert float(padded[~mask].abs().sum()) == 0.0  # padding is zero-filled


def test_value_model_matches_transformers_score_head(family, tmp_path):
    hf = hf_model(family, 3, head="ForSequenceClassification")
    hf.save_pretrained(tmp_path)
    ours = dtllama.LlamaForValue.from_pretrained(tmp_path)
    ids, mask = random_batch(hf.config.vocab_size, 3)
    positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        hidden = hf.model(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
        ref = hf.score(hidden).squeeze(-1)
        values = ours(ids, attention_mask=mask).values
    assert values.shape == ids.shape
    assert rel_err(values[mask], ref[mask]) <= TOL
    assert float(values[~mask].abs().sum()) == 0.0


def test_value_model_from_causal_checkpoint_initializes_head(tmp_path, caplog):
    hf_model("llama3", 4).save_pretrained(tmp_path)
    with caplog.at_level("WARNING"):
        critic = dtllama.LlamaForValue.from_pretrained(tmp_path)
    assert "no value head" in caplog.text
    lm = dtllama.LlamaForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(critic.model.embed_tokens.weight, lm.model.embed_tokens.weight)
    assert 0.01 < float(critic.score.weight.std()) < 0.03  # normal(0, initializer_range=0.02)
    ids = torch.randint(0, 97, (7,))
    out = critic(ids, cu_seqlens=cu_seqlens_from_lengths([3, 4]))
    assert out.values.shape == (7,)


def _packed_batch_with_pad_tokens(vocab, pad, seed):
    """Packed sequences in which `pad` is a real token (each sequence ends with it, as with eos-as-pad, and it
    appears inside some), with next-token labels (-100 at each sequence's last token) and random loss weights."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(6, 20, (4,), generator=g).tolist()
    seqs = []
    for n in lengths:
        s = torch.randint(0, vocab, (n,), generator=g)
        s[-1] = pad
        s[torch.randint(0, n - 1, (2,), generator=g)] = pad
        seqs.append(s)
    labels = torch.cat([torch.cat([s[1:], torch.tensor([-100])]) for s in seqs])
    weights = torch.randn(sum(lengths), generator=g)
    return seqs, torch.cat(seqs), labels, weights, cu_seqlens_from_lengths(lengths)


def test_training_gradients_match_transformers_except_the_pad_row(tmp_path):
    """HF builds `nn.Embedding(..., padding_idx=pad_token_id)`, so its pad row never trains; dtllama trains every
    row (a documented choice: see `LlamaModel`). Everything else, gradients included, is HF's."""
    # Untied: then the embedding lookup is the pad row's only gradient (a tied lm_head would add its own).
    vocab = FAMILIES["llama3"][1]["vocab_size"]
    pad = int(torch.randint(1, vocab, (1,), generator=torch.Generator().manual_seed(5)))
    hf = hf_model("llama3", 5, pad_token_id=pad)
    assert hf.model.embed_tokens.padding_idx == pad
    hf.save_pretrained(tmp_path)
    ours = dtllama.LlamaForCausalLM.from_pretrained(tmp_path)
    seqs, ids, labels, weights, cu = _packed_batch_with_pad_tokens(hf.config.vocab_size, pad, 5)
    assert int((ids == pad).sum()) >= len(seqs)

    lp = ours(ids, cu_seqlens=cu, labels=labels).logprobs
    (lp * weights).sum().backward()
    grads = {n: p.grad for n, p in ours.named_parameters()}

    def hf_grads():
        hf.zero_grad()
        # One sequence per call: HF's reference attention has no packed mode; the losses add up as dtllama's.
        loss, start = 0.0, 0
        for s in seqs:
            logp = torch.log_softmax(hf(input_ids=s[None]).logits[0], -1)
            lab = labels[start:start + len(s)]
            tok = torch.where(lab == -100, 0.0, logp.gather(1, lab.clamp_min(0)[:, None]).squeeze(1))
            loss = loss + (tok * weights[start:start + len(s)]).sum()
            start += len(s)
        loss.backward()
        return {n: p.grad.clone() for n, p in hf.named_parameters()}

    with_padding_idx = hf_grads()
    hf.model.embed_tokens.padding_idx = None  # HF as it would train without padding_idx
    without_padding_idx = hf_grads()

    assert grads.keys() == with_padding_idx.keys()
    emb = "model.embed_tokens.weight"
    rest = torch.arange(hf.config.vocab_size) != pad
    for name, g in grads.items():
        ref = with_padding_idx[name]
        # fp32 gradients summed in another order (packed vs one sequence at a time, a fused log-prob backward vs
        # log_softmax): a few ulps of each tensor's largest entry; 1e-5 relative is ~100 ulps of headroom.
        a, b = (g[rest], ref[rest]) if name == emb else (g, ref)
        assert rel_err(a, b) <= TOL, name
        assert rel_err(g, without_padding_idx[name]) <= TOL, name  # dtllama = HF without padding_idx, pad row too
    assert float(with_padding_idx[emb][pad].abs().max()) == 0.0  # HF never trains the pad row...
    # ...which here is a real, trained token: its gradient is of the size of the other rows' (not rounding noise).
    assert float(grads[emb][pad].abs().max()) > 0.01 * float(grads[emb].abs().max())


def test_value_model_loads_and_exports_token_classification_critics(family, tmp_path):
    """HF's *ForTokenClassification with num_labels=1 (verl's critics): `score.weight` and `score.bias`."""
    import transformers

    hf = hf_model(family, 6, head="ForTokenClassification")
    assert hf.score.bias is not None and float(hf.score.bias.detach().abs()) > 0  # random, not HF's zero init
    hf.save_pretrained(tmp_path / "hf")
    ours = dtllama.LlamaForValue.from_pretrained(tmp_path / "hf")
    assert ours.hf_architecture == "ForTokenClassification"
    assert torch.equal(ours.score.weight, hf.score.weight) and torch.equal(ours.score.bias, hf.score.bias)
    assert sum(p.numel() for p in ours.parameters()) == ours.config.num_params(value_head=True)
    ids, mask = random_batch(hf.config.vocab_size, 6)
    positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits.squeeze(-1)  # eval: no dropout
        values = ours(ids, attention_mask=mask).values
        p = pack(ids, mask)
        packed = ours(p.input_ids, p.position_ids, p.cu_seqlens, p.max_seqlen).values
    assert rel_err(values[mask], ref[mask]) <= TOL  # TOL: see its comment (same fp32 association-order bound)
    assert rel_err(packed, ref[mask]) <= TOL

    ours.save_pretrained(tmp_path / "export")
    arch = type(hf).__name__
    back, info = getattr(transformers, arch).from_pretrained(tmp_path / "export", output_loading_info=True)
    assert back.config.architectures == [arch] and back.config.num_labels == 1
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors: loads as is
    for name, t in hf.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name  # fp32 written, fp32 read: bit for bit
    with torch.no_grad():
        again = back.eval()(input_ids=ids, attention_mask=mask, position_ids=positions).logits.squeeze(-1)
    assert rel_err(values[mask], again[mask]) <= TOL


def test_value_head_layout_mismatch_is_a_clear_error(tmp_path):
    import json

    hf = hf_model("llama3", 7, head="ForTokenClassification")
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    # A bias the config's layout has no place for would be dropped silently: an error naming it and the fix.
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, architectures=["LlamaForSequenceClassification"])))
    with pytest.raises(ValueError, match=r"has 'score.bias'.*\['LlamaForTokenClassification'\]"):
        dtllama.LlamaForValue.from_pretrained(tmp_path)
    # A head of several labels is not a critic.
    hf_model("llama3", 7, head="ForTokenClassification", num_labels=3).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"'score.weight' has shape \[3, 48\].*num_labels=1"):
        dtllama.LlamaForValue.from_pretrained(tmp_path)
