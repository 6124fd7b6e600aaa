"""The recipe's data, optimizer and configuration: SFT loss masks, streaming and resumable order, token-budget
micro-batches balanced over ranks, bad inputs named by file and line, the LR schedule, weight-decay groups, TOML."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from helpers import ROOT, rel_err

import dtllama
from dtllama.train.config import parse_args
from dtllama.train.data import IGNORE_INDEX, Example, Examples, balance, global_batch, microbatches, records, tokenize
from dtllama.train.loop import pack
from dtllama.train.optim import adamw, lr_multiplier
from dtllama.train.source import ByteTokenizer


def write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_prompt_response_loss_covers_the_response_only():
    """Hand-counted: prompt "ab" (97, 98), response "cd" (99, 100) and eos (0); the loss predicts 99, 100 and 0."""
    ex = tokenize({"prompt": "ab", "response": "cd"}, "row", ByteTokenizer())
    assert ex.ids == [97, 98, 99, 100, 0] and ex.loss_mask == [False, False, True, True, True]
    assert ex.labels() == [IGNORE_INDEX, 99, 100, 0, IGNORE_INDEX] and ex.loss_tokens == 3
    text = tokenize({"text": "ab"}, "row", ByteTokenizer())
    assert text.labels() == [98, 0, IGNORE_INDEX] and text.loss_tokens == 2


def test_chat_loss_covers_the_assistant_turns_of_the_checkpoints_template():
    from transformers import AutoTokenizer

    from dtllama.models.pretrained import smollm2_135m_instruct

    tok = AutoTokenizer.from_pretrained(smollm2_135m_instruct())
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."},
                {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "It is 6."}]
    ex = tokenize({"messages": messages}, "row", tok)
    assert ex.ids == list(tok.apply_chat_template(messages, tokenize=True)["input_ids"])
    trained = tok.decode([i for i, m in zip(ex.ids, ex.loss_mask) if m])
    assert "It is 4." in trained and "It is 6." in trained
    assert "2+2" not in trained and "3+3" not in trained and "user" not in trained


def test_bad_records_name_file_and_line(tmp_path):
    empty = write(tmp_path, "empty.txt", "\n\n")
    with pytest.raises(ValueError, match="no training records"):
        list(records(empty))
    bad_json = write(tmp_path, "bad.jsonl", '{"text": "ok"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not JSON"):
        list(records(bad_json))
    with pytest.raises(ValueError, match=r"x.jsonl:7: a row needs 'text'.*\['prompt'\]"):
        tokenize({"prompt": "only"}, "x.jsonl:7", ByteTokenizer())
    long = write(tmp_path, "long.jsonl", '{"text": "short"}\n{"text": "' + "y" * 40 + '"}\n')
    with pytest.raises(ValueError, match=r"long.jsonl:2: 41 tokens exceed --max-seq-len 16"):
        [next(Examples(long, ByteTokenizer(), 16, 256)) for _ in range(2)]
    cut = Examples(long, ByteTokenizer(), 16, 256, truncate=True)
    assert max(len(next(cut).ids) for _ in range(2)) == 16
    with pytest.raises(ValueError, match=r"long.jsonl:1: token id 116 is outside the model's vocabulary of 100"):
        next(Examples(long, ByteTokenizer(), 64, 100))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(records(str(tmp_path / "missing.txt")))


def test_stream_is_deterministic_and_resumes_at_its_position(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("\n\n".join(f"doc {i}" for i in range(7)))
    (folder / "b.jsonl").write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(6)))
    tok = ByteTokenizer()
    a, b = Examples(str(folder), tok, 64, 256, seed=3, buffer=4), Examples(str(folder), tok, 64, 256, seed=3, buffer=4)
    first = [next(a).ids for _ in range(30)]  # more than two epochs
    assert first == [next(b).ids for _ in range(30)]
    assert sorted(map(bytes, first[:13])) == sorted(map(bytes, first[13:26]))  # each epoch: every record once
    resumed = Examples(str(folder), tok, 64, 256, seed=3, buffer=4)
    resumed.skip(17)
    assert [next(resumed).ids for _ in range(13)] == first[17:]
    c = Examples(str(folder), tok, 64, 256, seed=3, buffer=4)
    batch = global_batch(c, 20)
    assert c.position == len(batch) and sum(len(e.ids) for e in batch) <= 20  # the one that did not fit waits


def test_balanced_ranks_on_skewed_lengths():
    """Lengths from a heavy-tailed distribution: the ranks' real token counts differ by at most 10%."""
    g = torch.Generator().manual_seed(0)
    for n_ranks in (2, 4, 8):
        lengths = (torch.empty(200).exponential_(generator=g) * 300).long().clamp(1, 2048).tolist()
        batch = [Example([1] * n, [True] * n, str(i)) for i, n in enumerate(lengths)]
        loads = [sum(len(e.ids) for e in share) for share in balance(batch, n_ranks)]
        assert max(loads) / min(loads) <= 1.1, loads
        assert sorted(e.where for share in balance(batch, n_ranks) for e in share) == sorted(e.where for e in batch)


def test_microbatches_respect_the_budget_and_never_split():
    batch = [Example([1] * n, [True] * n, f"row {n}") for n in (50, 20, 70, 10, 33, 64)]
    mbs = microbatches(batch, 100)
    assert all(sum(len(e.ids) for e in mb) <= 100 for mb in mbs) and len(mbs) == 3
    assert sorted(len(e.ids) for mb in mbs for e in mb) == sorted(len(e.ids) for e in batch)
    with pytest.raises(ValueError, match=r"row 70: 70 tokens exceed --max-tokens-per-microbatch 64"):
        microbatches(batch, 64)


def test_packed_mixed_lengths_equal_one_sequence_at_a_time():
    """Loss and gradients of one packed batch = the sum over its sequences run one at a time (fp32)."""
    config = dtllama.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                 initializer_range=0.2)
    model = dtllama.LlamaForCausalLM(config)
    model.init_weights(int(torch.randint(0, 1000, ())))
    g = torch.Generator().manual_seed(int(torch.randint(0, 1000, ())))
    batch = [Example(torch.randint(0, 64, (n,), generator=g).tolist(), (torch.rand(n, generator=g) < 0.7).tolist(),
                     str(n)) for n in (5, 17, 1, 9)]

    def loss_and_grads(examples):
        p = pack(examples, 1, "cpu")
        model.zero_grad()
        loss = -model(p.input_ids, p.position_ids, p.cu_seqlens, p.max_seqlen, labels=p.labels).logprobs.sum()
        loss.backward()
        return loss.detach(), {n: q.grad.clone() for n, q in model.named_parameters()}

    packed_loss, packed_grads = loss_and_grads(batch)
    singles = [loss_and_grads([ex]) for ex in batch]
    assert rel_err(packed_loss, sum(s[0] for s in singles)) <= 1e-5
    for name, grad in packed_grads.items():
        assert rel_err(grad, sum(s[1][name] for s in singles)) <= 1e-5, name


def test_lr_schedule_and_weight_decay_groups():
    assert [lr_multiplier(i, 4, 20, "cosine", 0.1) for i in (0, 3)] == [0.25, 1.0]
    assert lr_multiplier(4, 4, 20, "cosine", 0.1) == 1.0 and abs(lr_multiplier(20, 4, 20, "cosine", 0.1) - 0.1) < 1e-12
    assert abs(lr_multiplier(12, 4, 20, "linear", 0.0) - 0.5) < 1e-12 and lr_multiplier(19, 4, 20, "constant") == 1.0
    with pytest.raises(ValueError, match="choose one of"):
        lr_multiplier(0, 1, 2, "step")
    config = dtllama.ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, attention_bias=True)
    model = dtllama.LlamaForCausalLM(config)
    decay, no_decay = adamw(model, 1e-3, 0.1).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(names[id(p)].endswith(("norm.weight", ".bias")) for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)


def test_toml_config_sets_defaults_that_flags_override(tmp_path):
    cfg = write(tmp_path, "run.toml", 'steps = 7\nbatch-tokens = 300\nlr_schedule = "linear"\n')
    args = parse_args(["--config", cfg, "--steps", "9"])
    assert (args.steps, args.batch_tokens, args.lr_schedule) == (9, 300, "linear")
    bad = write(tmp_path, "bad.toml", "steps = 7\nlearning_rate = 1e-3\n")
    with pytest.raises(ValueError, match=r"bad.toml: unknown key 'learning_rate'"):
        parse_args(["--config", bad])
    shipped = sorted(os.listdir(os.path.join(ROOT, "recipes", "configs")))
    assert shipped == ["llama3.1-8b.toml", "llama3.2-1b.toml", "smollm2-135m.toml"]
    for name in shipped:  # every shipped config parses
        parse_args(["--config", os.path.join(ROOT, "recipes", "configs", name)])


def test_resume_from_another_models_checkpoint_is_refused(tmp_path):
    import torch.distributed.checkpoint as dcp

    from dtllama.train.checkpoint import check_compatible

    small = dtllama.LlamaForCausalLM(dtllama.ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                                         num_hidden_layers=1, num_attention_heads=2,
                                                         num_key_value_heads=1))
    dcp.save({"train": {"model": small.state_dict()}}, checkpoint_id=str(tmp_path / "ck"), no_dist=True)
    check_compatible(str(tmp_path / "ck"), small)
    other = dtllama.LlamaForCausalLM(dataclasses.replace(small.config, hidden_size=32))
    with pytest.raises(ValueError, match=r"written for another model: model.embed_tokens.weight has shape \[64, 16\]"):
        check_compatible(str(tmp_path / "ck"), other)
