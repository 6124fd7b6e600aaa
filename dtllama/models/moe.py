"""Mixture-of-experts pieces every MoE family shares (Llama 4, Qwen3-MoE): routed experts as stacked weights run
by a loop or one grouped GEMM, the dispatch of routed rows to them, router statistics and the load-balance loss,
and load balancing without an auxiliary loss.

A family's sparse block derives from `MoEBlock`: it scores its experts (sigmoid, softmax), picks the top-k with
`select`, and hands the picks to `run_experts`, which sorts the routed rows by expert for the experts module
(`GroupedExperts.forward(rows, counts)`: the boundary expert parallel dispatches across, `dtllama.parallel.ep`).

Aux-loss-free balancing (DeepSeek-V3, arXiv:2412.19437 sec. 2.1.2; torchtitan's `load_balance_coeff`): with
`load_balance_coeff` set in the config, each block keeps a per-expert bias added to the scores for the top-k choice
only (the weights the experts' outputs are mixed by stay the unbiased scores), and counts the tokens it sends each
expert in training forwards. After each optimizer step the trainer sums the counts over all ranks
(`dtllama.parallel.balance_experts`) and every block moves its bias by `coeff * sign(mean - count)`: underloaded
experts become likelier picks. The bias is training state: a persistent buffer, in DCP checkpoints (replicated, so
any layout resumes it), not a parameter the optimizer sees, and not in HF exports (transformers has no such field).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from dtllama.compat import local_shape_and_offset

MOE_BACKENDS = ("auto", "loop", "grouped")
_default_moe_backend = ["auto"]  # the process default; a model overrides it per experts module


def set_moe_backend(name: str, model: nn.Module | None = None) -> None:
    """How routed experts run: `loop` (one matmul pair per expert: the reference), `grouped` (`torch._grouped_mm`
    over the expert-sorted tokens), or `auto` (grouped for CUDA bf16, where it is the fast path; loop elsewhere).
    With `model`, for that model's experts only; without, the default of every experts module that sets none."""
    if name not in MOE_BACKENDS:
        raise ValueError(f"MoE backend {name!r} is unknown; choose one of {list(MOE_BACKENDS)}")
    if model is None:
        _default_moe_backend[0] = name
        return
    for m in model.modules():
        if isinstance(m, GroupedExperts):
            m.backend = name


class GroupedExperts(nn.Module):
    """All routed experts' SwiGLU weights stacked on dim 0, under HF's names: `gate_up_proj` (gate first, then up)
    and `down_proj`. `transposed` is the layout: False, Llama 4's `[E, H, 2I]` / `[E, I, H]` applied as `x @ W`;
    True, Qwen3-MoE's (transformers 5's) `[E, 2I, H]` / `[E, H, I]` applied as `x @ W.T`, as `nn.Linear` weights.
    Weights are cast to the activations' dtype at use."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, transposed: bool,
                 intermediate_field: str = "intermediate_size"):
        super().__init__()
        e, h, i = num_experts, hidden, intermediate
        self.transposed = transposed
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h) if transposed else torch.empty(e, h, 2 * i))
        self.down_proj = nn.Parameter(torch.empty(e, h, i) if transposed else torch.empty(e, i, h))
        self.hidden, self.intermediate, self.intermediate_field = h, i, intermediate_field  # (the config's name)
        self.backend: str | None = None  # None: the process default (`set_moe_backend`)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """`x [N, H]`: routed rows sorted by expert, `counts[e]` of them for expert e; returns `[N, H]`.

        Under expert parallel the weights are DTensors sharded on experts and `x`, `counts` are the rows of this
        rank's experts only (`dtllama.parallel.ep` dispatches them): the math runs on the local shards."""
        gate_up, down = ((w.to_local() if isinstance(w, DTensor) else w).to(x.dtype)
                         for w in (self.gate_up_proj, self.down_proj))
        if self.transposed:  # as `x @ W` operands: views, no copies
            gate_up, down = gate_up.transpose(-2, -1), down.transpose(-2, -1)
        if self._grouped(x):
            offs = counts.cumsum(0).to(torch.int32)
            gate, up = torch._grouped_mm(x, gate_up, offs=offs).chunk(2, dim=-1)
            return torch._grouped_mm(F.silu(gate) * up, down, offs=offs)
        out, start = [], 0
        for e, n in enumerate(counts.tolist()):
            gate, up = (x[start:start + n] @ gate_up[e]).chunk(2, dim=-1)
            out.append((F.silu(gate) * up) @ down[e])
            start += n
        return torch.cat(out)

    def _grouped(self, x: torch.Tensor) -> bool:
        """Whether to take the grouped-GEMM path (see `set_moe_backend`). `_grouped_mm` wants every row stride a
        multiple of 16 bytes, so hidden and intermediate sizes a multiple of 16 / itemsize."""
        h, i = self.hidden, self.intermediate
        aligned = all(n * x.element_size() % 16 == 0 for n in (h, i))
        backend = self.backend or _default_moe_backend[0]
        if backend == "grouped" and not aligned:
            raise ValueError(f"MoE backend 'grouped' needs hidden_size={h} and {self.intermediate_field}={i} "
                             f"to be multiples of {16 // x.element_size()} for {x.dtype}; use set_moe_backend('loop')")
        if backend == "auto":
            return aligned and x.is_cuda and x.dtype == torch.bfloat16
        return backend == "grouped"

    def checkpoint_tensors(self, prefix: str, state: dict) -> None:
        """In `state` (a state dict), replace this module's stacked tensors by the per-expert ones of the HF
        checkpoint files, when the family stores them so (`per_expert_files`): views of this rank's experts, so
        a load writes into the parameters and a save reads them, whatever the layout."""
        if not self.per_expert_files:
            return
        gate_up, down = state.pop(prefix + "gate_up_proj"), state.pop(prefix + "down_proj")
        first = 0
        if isinstance(gate_up, DTensor):
            (n, *rest), (first, *offsets) = local_shape_and_offset(gate_up)
            if any(offsets) or list(rest) != list(gate_up.shape[1:]):
                raise ValueError(f"{prefix}gate_up_proj is split inside an expert ({gate_up.placements}); HF files "
                                 "hold whole experts, so shard the experts on dim 0 only (EP, FSDP)")
            gate_up, down = gate_up.to_local(), down.to_local()
        state.update(self.per_expert(prefix, "gate_up_proj", gate_up, first))
        state.update(self.per_expert(prefix, "down_proj", down, first))

    def per_expert(self, prefix: str, leaf: str, stacked: torch.Tensor, first: int = 0) -> list[tuple[str, torch.Tensor]]:
        """The HF checkpoint's per-expert tensors (views) of `stacked`, this module's `leaf` tensor ("gate_up_proj"
        or "down_proj") holding experts `first, first + 1, ...`: `{prefix}{e}.gate_proj.weight` and `up_proj`
        from gate_up, `down_proj` from down."""
        i = self.intermediate
        out = []
        for j in range(stacked.shape[0]):
            key = f"{prefix}{first + j}."
            if leaf == "gate_up_proj":
                out += [(key + "gate_proj.weight", stacked[j, :i]), (key + "up_proj.weight", stacked[j, i:])]
            else:
                out.append((key + "down_proj.weight", stacked[j]))
        return out

    per_expert_files = False  # whether HF checkpoint files store one tensor per expert (`checkpoint_tensors`)


def expert_counts(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """How many of the rows' entries name each expert: `[..., n]` expert ids to `[..., num_experts]` int64 counts.
    A scatter rather than `bincount`, whose output size depends on the data (a graph break when compiled)."""
    counts = experts.new_zeros(*experts.shape[:-1], num_experts, dtype=torch.int64)
    return counts.scatter_add_(-1, experts.long(), torch.ones_like(experts, dtype=torch.int64))


def run_experts(x: torch.Tensor, experts: nn.Module, selected: torch.Tensor, weights: torch.Tensor,
                scale_inputs: bool) -> torch.Tensor:
    """Each token `x [T, H]` through its `selected [T, k]` experts, mixed by `weights [T, k]`: the rows sorted by
    expert (tokens in order within each) for `experts(rows, counts)`, then scatter-added back to their tokens.
    `scale_inputs`: scale each row before its expert (Llama 4) rather than its output (Qwen3-MoE, as HF)."""
    flat = selected.flatten()
    order = torch.argsort(flat, stable=True)
    token = order // selected.shape[1]
    counts = expert_counts(flat, next(experts.parameters()).shape[0])
    scale = weights.flatten()[order, None]
    rows = x[token] * scale if scale_inputs else x[token]
    out = experts(rows, counts)
    if not scale_inputs:
        out = out * scale
    return torch.zeros_like(x).index_add_(0, token, out.to(x.dtype))


class MoEBlock(nn.Module):
    """Base of a family's sparse feed-forward: `top_k` of `num_experts` picked per token by `select`, and, with
    `balance_coeff`, the aux-loss-free balancing state (`expert_bias`, persistent; `tokens_per_expert`, counts of
    training forwards since the last `update_bias`)."""

    def __init__(self, num_experts: int, top_k: int, balance_coeff: float | None):
        super().__init__()
        self.num_experts, self.top_k, self.balance_coeff = num_experts, top_k, balance_coeff
        if balance_coeff is not None:
            self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))
            self.register_buffer("tokens_per_expert", torch.zeros(num_experts, dtype=torch.float32), persistent=False)
        else:
            self.expert_bias = self.tokens_per_expert = None

    def select(self, ranked: torch.Tensor) -> torch.Tensor:
        """The top-k experts `[T, k]` by `ranked [T, E]` (plus the balancing bias, when on: it steers the choice
        only). Counted for balancing in forwards that build a graph (training, and its recompute: the sign
        update does not depend on that scale)."""
        if self.expert_bias is None:
            return torch.topk(ranked, self.top_k, dim=-1).indices
        selected = torch.topk(ranked.float() + self.expert_bias, self.top_k, dim=-1).indices
        if torch.is_grad_enabled():
            with torch.no_grad():
                self.tokens_per_expert += expert_counts(selected.flatten(), self.num_experts)
        return selected

    @torch.no_grad()
    def update_bias(self, counts: torch.Tensor) -> None:
        """One balancing step from `counts [E]`, this block's tokens per expert summed over all ranks since the
        last: `bias += coeff * sign(mean - count)`, centered (DeepSeek-V3's rule, torchtitan's centering)."""
        delta = self.balance_coeff * torch.sign(counts.float().mean() - counts.float())
        self.expert_bias += delta - delta.mean()
        self.tokens_per_expert.zero_()

    def reset_balance(self, bias: bool) -> None:
        """Zero the counts (and, with `bias`, the bias: a model initialized or loaded from HF, which has none)."""
        if self.expert_bias is not None:
            self.tokens_per_expert.zero_()
            if bias:
                self.expert_bias.zero_()


class Routing(NamedTuple):
    """What an MoE layer reports of its routing (a decoder layer's aux output): the router logits `[T, E]` (the
    load-balance loss differentiates them) and the experts chosen `[T, k]`."""

    logits: torch.Tensor
    selected: torch.Tensor


@dataclass
class RouterStats:
    """Per MoE layer (in layer order): `tokens_per_expert [L, E]` (int64; each row sums to T * top_k) and the
    load-balance loss `aux_loss` (already times `router_aux_loss_coef`; None when that is 0)."""

    tokens_per_expert: torch.Tensor
    aux_loss: torch.Tensor | None


def router_stats(routing: list[Routing | torch.Tensor], top_k: int, coef: float,
                 token_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> RouterStats | None:
    """Counts of the experts chosen (given router logits alone: their top-k), and the Switch Transformer load-balance loss (arXiv:2101.03961, eq. 4)
    `coef * E * sum_e f_e * P_e` per layer, averaged over MoE layers: `f_e` the share of tokens sent to expert e
    (of T, so top-k routing sums to k, as HF's `load_balancing_loss_func` counts), `P_e` the mean softmax router
    probability (the differentiable part). HF's helper pools all layers' tokens before the product; per layer, the
    loss of a pipeline stage is the sum of its layers' (and with one MoE layer the two are equal).

    `token_sum`: where this rank holds a shard of the sequences' tokens (sequence parallel), the sum over the
    ranks holding the others, so `f_e` and `P_e` are means over all the sequences' tokens as on one device.
    The counts returned stay this rank's own."""
    if not routing:
        return None
    logits = torch.stack([r.logits if isinstance(r, Routing) else r for r in routing])  # [L, T, E]
    n_layers, T, E = logits.shape
    selected = torch.stack([r.selected if isinstance(r, Routing) else torch.topk(r.detach(), top_k, dim=-1).indices
                            for r in routing])
    counts = expert_counts(selected.reshape(n_layers, -1), E)
    if not coef:
        return RouterStats(counts, None)
    total = token_sum or (lambda x: x)
    n_tokens = total(torch.tensor(float(T), device=logits.device)).clamp_min(1)
    share = total(counts.float()) / n_tokens
    prob = total(torch.softmax(logits.float(), dim=-1).sum(1)) / n_tokens
    return RouterStats(counts, coef * E * (share * prob).sum(-1).mean())


def balanced_blocks(model: nn.Module) -> list[MoEBlock]:
    """The model's MoE blocks that balance by bias, in layer order (none without `load_balance_coeff`)."""
    return [m for m in model.modules() if isinstance(m, MoEBlock) and m.expert_bias is not None]


__all__ = ["GroupedExperts", "MoEBlock", "RouterStats", "Routing", "balanced_blocks", "expert_counts", "router_stats",
           "run_experts", "set_moe_backend"]
