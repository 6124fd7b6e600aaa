"""What each rank of a worker pool runs for the parallel property tests, and the single-device reference.

A case: a config, a layout, a packed batch of sequences and a seed. Every rank of the `batch` mesh
(`dp_replicate x dp_shard`) takes its share of the sequences, which the CP ranks of its group share;
the objective is a token-weighted sum normalized by the global token count, so gradients are those
of the whole batch on one device.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import dtllama
import third_family
from dtllama.models.llama4 import Llama4Config, Llama4ForCausalLM
from dtllama.models.qwen3 import Qwen3Config, Qwen3ForCausalLM, Qwen3ForValue
from dtllama.models.qwen3_moe import Qwen3MoeConfig
from dtllama.models.llama import hf_name
from dtllama.ops import IGNORE_INDEX, cu_seqlens_from_lengths, pad_to_multiple
from dtllama.parallel import (
    CompileOptions, Float8Options, ParallelDims, after_optimizer_step, apply_float8, balance_experts, clip_grad_norm_,
    parallelize,
)

ENTROPY_WEIGHT = 0.01
LR = 1e-2
_DIMS: dict = {}


def random_sequences(lengths, vocab_size: int, g: torch.Generator):
    """Random token sequences with next-token labels, a fifth of them (and each sequence's last) ignored."""
    seqs = [torch.randint(0, vocab_size, (n,), generator=g) for n in lengths]
    labels = []
    for s in seqs:
        lab = torch.cat([s[1:], torch.tensor([IGNORE_INDEX])])
        lab[torch.rand(len(s), generator=g) < 0.2] = IGNORE_INDEX
        labels.append(lab)
    return seqs, labels


def model_config(config_dict: dict):
    """A dense `ModelConfig`, a `Llama4Config` (MoE) for `model_type="llama4_text"`, or the test family of
    `third_family.py` for `family="parallel_block"`."""
    if config_dict.get("family") == "hf":  # transformers' own modules (dtllama.models.hf)
        from dtllama.models.hf import HFConfig

        return HFConfig.from_hf({k: v for k, v in config_dict.items() if k != "family"})
    if config_dict.get("family") == third_family.FAMILY:
        return third_family.ParallelBlockConfig(**{k: v for k, v in config_dict.items() if k != "family"})
    if config_dict.get("family") == "qwen3":
        return Qwen3Config(**{k: v for k, v in config_dict.items() if k != "family"})
    if config_dict.get("model_type") == "llama4_text":
        return Llama4Config(**config_dict)
    if config_dict.get("model_type") == "qwen3_moe":
        return Qwen3MoeConfig(**config_dict)
    return dtllama.ModelConfig(**config_dict)


def build(config, value: bool):
    if type(config).__name__ == "HFConfig" or isinstance(config, Qwen3MoeConfig):
        return dtllama.model_class(config, value)(config)
    if isinstance(config, Qwen3Config):
        return (Qwen3ForValue if value else Qwen3ForCausalLM)(config)
    if isinstance(config, third_family.ParallelBlockConfig):
        return (third_family.ParallelBlockForValue if value else third_family.ParallelBlockForCausalLM)(config)
    if isinstance(config, Llama4Config):
        if value:
            raise ValueError("Llama 4 has no value head; draw value=False for a llama4_text case")
        return Llama4ForCausalLM(config)
    cls = dtllama.LlamaForValue if value else dtllama.LlamaForCausalLM
    return cls(config)


def cp_shard(x: torch.Tensor, cp_mesh) -> torch.Tensor:
    """This CP rank's contiguous token slice of a padded `[T, ...]` tensor (what the model's outputs cover)."""
    if cp_mesh is None:
        return x
    n = x.shape[0] // cp_mesh.size()
    return x[cp_mesh.get_local_rank() * n:][:n]


def cp_gather(x: torch.Tensor, cp_mesh) -> torch.Tensor:
    """All T outputs from the `[T/cp, ...]` of each CP rank, for comparison with the reference."""
    if cp_mesh is None:
        return x
    out = x.new_empty((x.shape[0] * cp_mesh.size(), *x.shape[1:]))
    dist.all_gather_into_tensor(out, x.detach().contiguous(), group=cp_mesh.get_group())
    return out


def objective(model, seqs, labels_list, value: bool, n_global: int, dp: int, multiple: int = 1, cp_mesh=None):
    """Forward the packed `seqs`; returns (loss scaled for FSDP's mean over dp, per-sequence outputs).

    Under context parallelism (`cp_mesh`) the model returns this rank's token shard: the loss sums it, and
    the outputs are gathered over the CP ranks."""
    lengths = [len(s) for s in seqs]
    ids = torch.cat(seqs)
    labels = torch.cat(labels_list)
    p = pad_to_multiple(ids, cu_seqlens_from_lengths(lengths), multiple, labels)
    T = ids.numel()
    if value:
        v = model(p.input_ids, p.position_ids, p.cu_seqlens, p.max_seqlen).values
        # Linear in the values, with per-token weights from the labels: a squared value would scale every
        # gradient by the value itself, which can cancel to 1/50 of its terms and amplify fp32 rounding
        # past the tolerance (a CI draw: 1.03e-5 on a gate_proj gradient, tp=2). The padding's labels are ignored.
        weights = torch.where(p.labels != IGNORE_INDEX, 1.0 + p.labels.remainder(5) / 5.0, 0.0)
        loss = (v * cp_shard(weights, cp_mesh)).sum()
        outs = {"values": cp_gather(v, cp_mesh)[:T]}
    else:
        out = model(p.input_ids, p.position_ids, p.cu_seqlens, p.max_seqlen, labels=p.labels)
        loss = -(out.logprobs.sum() + ENTROPY_WEIGHT * out.entropy.sum())
        with torch.no_grad():
            logits = model(p.input_ids, p.position_ids, p.cu_seqlens, p.max_seqlen).logits
        outs = {"logprobs": cp_gather(out.logprobs, cp_mesh)[:T], "entropy": cp_gather(out.entropy, cp_mesh)[:T],
                "logits": cp_gather(logits, cp_mesh)[:T]}
    split = {k: list(v.detach().split(lengths)) for k, v in outs.items()}
    return loss / n_global * dp, split


def step(model, loss, pp_mesh=None):
    """Backward `loss` (None: a pipeline schedule already did), then the gradients, their norm over all ranks'
    parameters (`pp_mesh`: each pipeline rank holds other layers) and one AdamW step."""
    if loss is not None:
        loss.backward()
    grads = {}
    for n, p in model.named_parameters():
        g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        grads[hf_name(n)] = g.detach().clone()
    norm = clip_grad_norm_(model.parameters(), max_norm=1e9, pp_mesh=pp_mesh)  # only measures: nothing is clipped
    # Adam's first step is lr * g / (|g| + eps): a gradient rounding error dg moves a parameter by up
    # to lr * dg / eps. fp32 gradients of different summation orders differ by ~1e-7 of the largest
    # gradient (a few units here), i.e. up to ~1e-6 absolute where a gradient cancels to near zero (a CI
    # draw: tp=2 with one replicated KV head, v_proj 1.12e-5 off at eps=1e-3); eps=1e-2 keeps lr * dg /
    # eps near 1e-6, inside the 1e-5 tolerance, while real gradients (0.1 - 10) still dominate the step.
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=1e-2, weight_decay=0.1, foreach=False)
    opt.step()
    after_optimizer_step(model)  # float8 all-gathers: the next step's weight scales (a no-op otherwise)
    params = {}
    for n, p in model.named_parameters():
        params[hf_name(n)] = (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
    return grads, params, float(norm)


def reference(config_dict: dict, seqs, labels_list, seed: int, value: bool, float8: str | None = None):
    config = model_config(config_dict)
    model = build(config, value)
    if float8 is not None:  # the single-device float8 model: torchao's linears, no layout
        apply_float8(model, Float8Options(float8), "cpu")
    model.init_weights(seed)
    n_global = sum(int((lab != IGNORE_INDEX).sum()) for lab in labels_list)
    loss, outs = objective(model, seqs, labels_list, value, max(n_global, 1), 1)
    grads, params, norm = step(model, loss)
    return outs, grads, params, norm


def placements(model) -> dict[str, tuple]:
    out = {}
    for n, p in model.named_parameters():
        if isinstance(p, DTensor):
            out[hf_name(n)] = (tuple(p.device_mesh.mesh_dim_names), tuple(str(x) for x in p.placements))
        else:
            out[hf_name(n)] = None
    return out


def run_rank(config_dict: dict, layout: dict, seqs, labels_list, seed: int, value: bool, ac: str = "none",
             compile_backend: str | None = None, float8: str | None = None):
    """On every rank: parallelize a meta-device model, init, forward/backward/AdamW on this rank's share (`float8`:
    the decoder linears in float8 with this recipe).

    `compile_backend`: compile each block with it (the pool's dynamo caches are reset first: every
    example is a new model, and a full recompile cache would silently fall back to eager)."""
    config = model_config(config_dict)
    ParallelDims(**layout).resolve(dist.get_world_size(), config)  # validates against this config
    key = tuple(sorted(layout.items()))
    if key not in _DIMS:  # process groups are created once per layout and reused across examples
        _DIMS[key] = ParallelDims(**layout).resolve(dist.get_world_size())
        _DIMS[key].build_mesh("cpu")
    dims = _DIMS[key]
    with torch.device("meta"):
        model = build(config, value)
    compile = False
    if compile_backend is not None:
        torch._dynamo.reset()
        compile = CompileOptions(backend=compile_backend)
    parallelize(model, dims, ac=ac, compile=compile, float8=None if float8 is None else Float8Options(float8))
    model.to_empty(device="cpu")
    model.init_weights(seed)
    place = placements(model)  # before forward: FSDP keeps some groups unsharded after it
    # Sequences are dealt over the batch mesh (the CP ranks of a group share theirs); the loss is scaled by
    # the dp mesh (cp included), over which FSDP averages the gradients.
    batch_rank, n_batch = dims.mesh("batch").get_local_rank(), dims.mesh("batch").size()
    mine = list(range(batch_rank, len(seqs), n_batch))
    n_global = sum(int((lab != IGNORE_INDEX).sum()) for lab in labels_list)
    loss, outs = objective(model, [seqs[i] for i in mine], [labels_list[i] for i in mine], value,
                           max(n_global, 1), dims.mesh("dp").size(), dims.token_multiple,
                           dims.mesh("cp") if dims.cp_enabled else None)
    grads, params, norm = step(model, loss)
    return {"indices": mine, "outs": outs, "grads": grads, "params": params, "norm": norm, "placements": place}


def validate_rank(config_dict: dict, layout: dict) -> str | None:
    """On every rank: validate a layout as `run_rank` does first; return the error message, if any."""
    try:
        ParallelDims(**layout).resolve(dist.get_world_size(), model_config(config_dict))
    except ValueError as e:
        return str(e)
    return None


BOUNDARY_CONFIG = dict(vocab_size=53, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8, initializer_range=0.2, torch_dtype="float32")


def cp_boundary_logprobs(T: int, seed: int, cp: int) -> torch.Tensor:
    """Log-probs of one random sequence of T tokens (next-token labels), on `cp` CP ranks gathered, or, with
    cp=1, on this process alone (the reference)."""
    config = dtllama.ModelConfig(**BOUNDARY_CONFIG)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (T,), generator=g)
    cu = cu_seqlens_from_lengths([T])
    with torch.device("meta" if cp > 1 else "cpu"):
        model = build(config, value=False)
    cp_mesh = None
    if cp > 1:
        key = (("cp", cp),)
        if key not in _DIMS:
            _DIMS[key] = ParallelDims(cp=cp).resolve(dist.get_world_size(), config)
            _DIMS[key].build_mesh("cpu")
        parallelize(model, _DIMS[key])
        model.to_empty(device="cpu")
        cp_mesh = _DIMS[key].mesh("cp")
    model.init_weights(seed)
    labels = torch.cat([ids[1:], torch.tensor([IGNORE_INDEX])])
    with torch.no_grad():
        lp = model(ids, cu_seqlens=cu, labels=labels).logprobs
    return cp_gather(lp, cp_mesh)


def pretrained_cp_logprobs(path: str, seqs: list[torch.Tensor], cp: int) -> torch.Tensor:
    """Per-token log-probs (next-token labels) of the packed `seqs` from the HF folder `path`, loaded into a
    model parallelized over `cp` CP ranks (every rank reads its FSDP shards), gathered to all T tokens."""
    from dtllama.models.hf_io import load_state_into
    from dtllama.ops import shift_labels

    config = dtllama.ModelConfig.from_hf(path)
    key = (("cp", cp), ("model", path))
    if key not in _DIMS:
        _DIMS[key] = ParallelDims(cp=cp).resolve(dist.get_world_size(), config)
        _DIMS[key].build_mesh("cpu")
    dims = _DIMS[key]
    with torch.device("meta"):
        model = build(config, value=False)
    parallelize(model, dims)
    model.to_empty(device="cpu")
    load_state_into(model, path)
    ids, cu = torch.cat(seqs), cu_seqlens_from_lengths([len(s) for s in seqs])
    p = pad_to_multiple(ids, cu, dims.token_multiple, shift_labels(ids, cu))
    with torch.no_grad():
        lp = model(p.input_ids, p.position_ids, p.cu_seqlens, p.max_seqlen, labels=p.labels).logprobs
    return cp_gather(lp, dims.mesh("cp"))[:ids.numel()]


def resume_losses(config_dict: dict, layout: dict, seqs, labels_list, seed: int, folder: str, save: bool,
                  biases: bool = False):
    """On every rank: AdamW training of a parallelized model, 3 steps on the same batch. `save`: init from `seed`,
    take step 1, checkpoint to `folder` (DCP, `Checkpointer`); otherwise init from another seed and resume from
    `folder`. Then steps 2 and 3; returns their global losses (the sum over the data-parallel ranks' sequences),
    and with `biases` also the MoE balancing biases after step 1 (as saved or as resumed) and after step 3."""
    from dtllama.train.checkpoint import Checkpointer, TrainState

    config = model_config(config_dict)
    model, dims = parallel_model(config, layout, seed if save else seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=1e-2, weight_decay=0.1, foreach=False)
    batch = dims.mesh("batch")
    mine = list(range(batch.get_local_rank(), len(seqs), batch.size()))
    n_global = max(sum(int((lab != IGNORE_INDEX).sum()) for lab in labels_list), 1)

    def train_step() -> float:
        loss, _ = objective(model, [seqs[i] for i in mine], [labels_list[i] for i in mine], False, n_global,
                            dims.mesh("dp").size(), dims.token_multiple)
        opt.zero_grad()
        loss.backward()
        opt.step()
        balance_experts(model, dims)
        total = loss.detach() / dims.mesh("dp").size()
        dist.all_reduce(total, group=batch.get_group())
        return float(total)

    checkpointer, state = Checkpointer(folder), TrainState(model, opt)
    if save:
        train_step()
        checkpointer.save(1, state)
    else:
        assert checkpointer.load_latest(state) == 1

    def bias():
        return [b.expert_bias.clone() for b in model.balanced_moe()]

    first = bias()
    losses = [train_step(), train_step()]
    return (losses, first, bias()) if biases else losses


def _layout_dims(layout: dict, config) -> ParallelDims:
    """The layout's dims with meshes, built once per layout and reused across examples (process groups)."""
    key = tuple(sorted(layout.items()))
    if key not in _DIMS:
        _DIMS[key] = ParallelDims(**layout).resolve(dist.get_world_size(), config)
        _DIMS[key].build_mesh("cpu")
    return _DIMS[key]


def parallel_model(config, layout: dict, seed: int):
    """`(model, dims)`: the causal LM of `config` built on meta, parallelized over `layout` (this rank's part),
    materialized on the host and initialized from `seed` (layout-independent, so every layout starts alike)."""
    dims = _layout_dims(layout, config)
    with torch.device("meta"):
        model = build(config, value=False)
    parallelize(model, dims)
    model.to_empty(device="cpu")
    model.init_weights(seed)
    return model, dims


def _whole_batch_model(config, layout: dict | None, seed: int):
    """`(model, dims)`: parallelized over a layout whose batch mesh is one rank (every rank sees every sequence;
    TP / CP ranks each hold a token shard), or, for `layout=None`, on this process alone (dims None)."""
    if layout is None:
        model = build(config, value=False)
        model.init_weights(seed)
        return model, None
    model, dims = parallel_model(config, layout, seed)
    assert dims.mesh("batch").size() == 1, "every rank must see every sequence"
    return model, dims


def aux_loss_rank(config_dict: dict, layout: dict | None, seqs, seed: int):
    """On every rank (or on one process for `layout=None`, the reference): the load-balance loss of all `seqs`
    (a layout whose batch mesh is one rank: every rank sees them all, TP / CP ranks each a token shard) and the
    router weights' gradients of that loss alone."""
    ids, lengths = torch.cat(seqs), [len(s) for s in seqs]
    model, dims = _whole_batch_model(model_config(config_dict), layout, seed)
    dp = dims.mesh("dp").size() if dims is not None else 1  # the CP ranks, over which FSDP averages
    aux = model(ids, cu_seqlens=cu_seqlens_from_lengths(lengths)).router_stats.aux_loss
    (aux * dp).backward()
    grads = {hf_name(n): (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).detach().clone()
             for n, p in model.named_parameters() if n.endswith(("router.weight", "mlp.gate.weight"))}
    return float(aux.detach()), grads


def gathered_loss_grads(config_dict: dict, layout: dict | None, seqs, labels_list, seed: int):
    """On every rank of a CP layout whose batch mesh is one rank (or on one process for `layout=None`): a loss
    that needs whole sequences (per-sequence squared mean of the log-probs, as RL's sequence means do) over the
    log-probs gathered with `gather_tokens`; returns it and the full gradients."""
    from dtllama.parallel.cp import gather_tokens

    lengths = [len(s) for s in seqs]
    model, dims = _whole_batch_model(model_config(config_dict), layout, seed)
    multiple, cp_mesh = (dims.token_multiple, dims.mesh("cp")) if dims is not None else (1, None)
    p = pad_to_multiple(torch.cat(seqs), cu_seqlens_from_lengths(lengths), multiple, torch.cat(labels_list))
    lp = model(p.input_ids, p.position_ids, p.cu_seqlens, p.max_seqlen, labels=p.labels).logprobs
    lp = (gather_tokens(lp, cp_mesh) if cp_mesh is not None else lp)[:sum(lengths)]
    loss = sum(x.mean() ** 2 for x in lp.split(lengths))
    # FSDP averages gradients over the dp mesh (the CP ranks): every CP rank's loss is the whole loss.
    (loss * (cp_mesh.size() if cp_mesh is not None else 1)).backward()
    grads = {hf_name(n): (q.grad.full_tensor() if isinstance(q.grad, DTensor) else q.grad).detach().clone()
             for n, q in model.named_parameters()}
    return float(loss.detach()), grads


def skew_router(model, seed: int, strength: float) -> None:
    """Give every token's hidden state a common direction `c` (added to each embedding row) and the first two
    experts' router rows `strength * c`: a router that sends most tokens to experts 0 and 1 from the start."""
    from dtllama.models.blocks import copy_full_into

    c = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(seed))
    c = c / c.norm()
    with torch.no_grad():
        for name, p in model.named_parameters():
            name = hf_name(name)
            full = p.full_tensor() if isinstance(p, DTensor) else p.detach().clone()
            if name == "model.embed_tokens.weight":
                copy_full_into(p, full + 0.5 * c)
            elif name.endswith("mlp.gate.weight"):
                full[:2] += strength * c
                copy_full_into(p, full)


def balance_run(config_dict: dict, layout: dict, steps: int, seed: int, data: str, strength: float):
    """On every rank: the recipes' training step (`dtllama.train.loop.train_step`, which runs the balancing step)
    for `steps` steps on the byte-tokenized `data` from a skewed router; returns each step's max/mean tokens per
    expert (over all ranks and MoE layers) and the balancing biases at the end."""
    from dtllama.train.config import Optim, Training
    from dtllama.train.data import Example, Examples, global_batch
    from dtllama.train.loop import optimizer, train_step
    from dtllama.train.source import ByteTokenizer

    config = model_config(config_dict)
    model, dims = parallel_model(config, layout, seed)
    skew_router(model, seed, strength)
    training, optim = Training(data=data, steps=steps, batch_tokens=1024, max_seq_len=256), Optim(lr=3e-3)
    opt, sched = optimizer(model, optim, steps)
    examples = Examples(data, ByteTokenizer(), 256, config.vocab_size, seed=seed, truncate=True)
    filler = Example([0, 0], [False, False], "filler")
    loads = [train_step(model, opt, sched, global_batch(examples, training.batch_tokens), dims, filler, training,
                        optim)["expert_load_max_over_mean"] for _ in range(steps)]
    return loads, [b.expert_bias.clone() for b in model.balanced_moe()]
