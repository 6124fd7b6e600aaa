"""What each rank runs for the head-option tests (`test_head_options.py`): a model every rank of a TP / CP layout
runs on the whole batch, with one temperature per sequence."""

from __future__ import annotations

import torch
from parallel_cases import _whole_batch_model, cp_gather, model_config
from torch.distributed.tensor import DTensor

from dtllama.models.blocks import hf_name
from dtllama.ops import cu_seqlens_from_lengths, pad_to_multiple, shift_labels


def full_grads(model) -> dict[str, torch.Tensor]:
    """Every parameter's whole gradient under its HF name (`full_tensor()` of a sharded one)."""
    return {hf_name(n): (q.grad.full_tensor() if isinstance(q.grad, DTensor) else q.grad).detach().clone()
            for n, q in model.named_parameters()}


def temperature_rank(config_dict: dict, layout: dict | None, seqs, temps, seed: int):
    """Log-probs, entropy (all tokens, gathered over CP) and the full gradients of `sum(logprobs + 0.3 entropy)` at
    per-sequence temperatures `temps`; `layout=None`: one process, the reference."""
    model, dims = _whole_batch_model(model_config(config_dict), layout, seed)
    multiple = 1 if dims is None else dims.token_multiple
    ids = torch.cat(seqs)
    p = pad_to_multiple(ids, cu_seqlens_from_lengths([len(s) for s in seqs]), multiple,
                        shift_labels(ids, cu_seqlens_from_lengths([len(s) for s in seqs])))
    n_pad = p.cu_seqlens.numel() - 1 - len(seqs)  # a padding tail sequence, if any, reads temperature 1
    t = torch.cat([torch.tensor(temps), torch.ones(n_pad)])
    out = model(p.input_ids, p.position_ids, p.cu_seqlens, p.max_seqlen, labels=p.labels, temperature=t)
    dp = 1 if dims is None else dims.mesh("dp").size()  # the CP ranks, over which FSDP averages (each has its shard)
    ((out.logprobs.sum() + 0.3 * out.entropy.sum()) * dp).backward()
    cp = dims.mesh("cp") if dims is not None and dims.cp_enabled else None
    T = len(ids)
    grads = full_grads(model)
    return cp_gather(out.logprobs, cp)[:T], cp_gather(out.entropy, cp)[:T], grads


def topk_rank(config_dict: dict, layout: dict | None, seqs, k: int, seed: int):
    """Top-k log-probs and ids of every token (gathered over CP) and the full gradients of `sum(w * topk_logprobs)`
    (fixed weights `w`: a KL on the top-k); `layout=None`: one process, the reference."""
    model, dims = _whole_batch_model(model_config(config_dict), layout, seed)
    multiple = 1 if dims is None else dims.token_multiple
    ids = torch.cat(seqs)
    p = pad_to_multiple(ids, cu_seqlens_from_lengths([len(s) for s in seqs]), multiple)
    out = model(p.input_ids, p.position_ids, p.cu_seqlens, p.max_seqlen, top_k=k)
    w = torch.linspace(0.5, 1.5, k)
    dp = 1 if dims is None else dims.mesh("dp").size()
    ((out.topk_logprobs * w).sum() * dp).backward()
    cp = dims.mesh("cp") if dims is not None and dims.cp_enabled else None
    T = len(ids)
    grads = full_grads(model)
    return cp_gather(out.topk_logprobs.detach(), cp)[:T], cp_gather(out.topk_indices, cp)[:T], grads


def loss_rank(config_dict: dict, layout: dict | None, seqs, options: dict, seed: int):
    """The fused loss (`loss=CrossEntropy(normalizer=the global label count, **options)`) and its full gradients,
    beside the log-prob head's `-sum(logprobs) / n` and its gradients on the same layout, and whether `entropy=False`
    gives that layout's default log-probs and gradients bitwise; `layout=None`: one process, the reference."""
    from dtllama.ops import CrossEntropy

    model, dims = _whole_batch_model(model_config(config_dict), layout, seed)
    multiple = 1 if dims is None else dims.token_multiple
    ids = torch.cat(seqs)
    cu = cu_seqlens_from_lengths([len(s) for s in seqs])
    labels = shift_labels(ids, cu)
    p = pad_to_multiple(ids, cu, multiple, labels)
    n = int((labels != -100).sum())
    dp = 1 if dims is None else dims.mesh("dp").size()  # the CP ranks, over which FSDP averages (each has its shard)
    batch = (p.input_ids, p.position_ids, p.cu_seqlens, p.max_seqlen)
    out = model(*batch, labels=p.labels, loss=CrossEntropy(normalizer=n / dp, **options))
    out.loss.backward()
    loss = out.loss.detach().clone()
    if dims is not None:  # each rank's share (CP: its tokens' loss; TP: the whole loss on every rank)
        import torch.distributed as dist

        dist.all_reduce(loss, group=dims.mesh("dp").get_group())
        loss /= dp
    grads = full_grads(model)
    runs = []
    for entropy in (True, False):
        model.zero_grad()
        o = model(*batch, labels=p.labels, entropy=entropy)
        (-o.logprobs.sum() / n * dp).backward()
        runs.append((o.logprobs.detach().clone(), full_grads(model)))
    same = torch.equal(runs[0][0], runs[1][0]) and all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])
    return float(loss), grads, runs[0][1], same, o.entropy is None
