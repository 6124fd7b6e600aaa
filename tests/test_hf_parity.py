"""dtllama against Hugging Face transformers on the same saved checkpoint (fp32, CPU)."""

import pytest
import torch
from conftest import hf_model
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
