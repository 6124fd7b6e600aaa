"""Llama 4 text model (Scout, Maverick) in plain torch modules whose parameter names are exactly Hugging Face's.

As the dense model (`dtllama.models.llama`), it runs packed `[T, hidden]` activations described by `cu_seqlens`, takes a
padded `[B, S]` batch through `prepare_batch`, and keeps decoder layers in a ModuleDict keyed "0".."N-1". What
Llama 4 adds, each checked against transformers' `Llama4ForCausalLM`:

- iRoPE attention: RoPE layers rotate interleaved pairs (complex form) and attend within chunks of
  `attention_chunk_size` tokens of their sequence (varlen attention over a chunked `cu_seqlens`, built once per
  forward), after a weightless L2 norm of q and k when `use_qk_norm`; NoPE layers (`no_rope_layers[i] == 0`)
  attend to the whole sequence and scale q by a position-dependent temperature.
- MoE feed-forward: a sigmoid top-k router; each routed expert takes its token pre-scaled by its score; a shared
  SwiGLU expert is added. Experts run as a loop (the reference) or as one `torch._grouped_mm` over the
  expert-sorted tokens (CUDA bf16). Maverick interleaves dense SwiGLU layers.
- Router statistics (tokens per expert, a load-balance loss) on the output, for the recipe to log or add.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from dtllama.models import protocol as P
from dtllama.models.blocks import (
    Attention, CausalLM, CausalLMOutput, Decoder, RMSNorm, RotaryEmbedding, SwiGLU, TokenSum,
)
from dtllama.models.llama4_config import Llama4Config

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
        if isinstance(m, Llama4TextExperts):
            m.backend = name


# ---------------------------------------------------------------------------------------------------- attention


class Llama4RotaryEmbedding(RotaryEmbedding):
    """Rotations as complex numbers `e^{i * position * inv_freq}` `[T, head_dim/2]`, as HF's `freqs_cis`;
    `inv_freq` (default or llama3 scaling) is the dense model's."""

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        freqs = self.angles(position_ids)
        return torch.polar(torch.ones_like(freqs), freqs)


def apply_rope_interleaved(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate `x [T, H, D]` by `freqs_cis [T, D/2]` with pairs `(x[2j], x[2j+1])` as complex numbers: Llama 4's
    (and Meta's original) layout, not the dense HF models' halves. Weights are HF's as is, so nothing is permuted."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs_cis[:, None, :]).flatten(-2).type_as(x)


def l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's `Llama4TextL2Norm`: an RMS norm without weight, in fp32."""
    h = x.float()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


class AttentionSpans(NamedTuple):
    """What attention needs of one packed batch, built once per forward and shared by every layer."""

    cu_seqlens: torch.Tensor  # whole sequences (NoPE layers)
    max_seqlen: int
    chunk_cu_seqlens: torch.Tensor  # sequences cut into chunks (RoPE layers)
    chunk_max_seqlen: int
    temperature: torch.Tensor | None  # per-token q scale of NoPE layers `[T]`, None without temperature tuning


def chunked_cu_seqlens(cu_seqlens: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """`cu_seqlens` with a boundary added at every multiple of `chunk_size` inside each sequence: varlen causal
    attention over it is HF's chunked attention (a token sees the earlier tokens of its own chunk). Positions for
    RoPE are unchanged; the offset inside the sequence, not the position id, places the boundaries, as HF's
    padding-aware chunk mask does. Built from `cu_seqlens` alone, so a CP rank, whose positions cover only its
    token shard, builds the same global chunks."""
    cu = cu_seqlens.long()
    chunks = (cu[1:] - cu[:-1] + chunk_size - 1) // chunk_size  # per sequence
    first = torch.repeat_interleave(chunks.cumsum(0) - chunks, chunks)  # each chunk's sequence's first chunk
    k = torch.arange(first.numel(), device=cu.device) - first  # the chunk's index within its sequence
    starts = torch.repeat_interleave(cu[:-1], chunks) + k * chunk_size
    return torch.cat([starts, cu[-1:]]).to(cu_seqlens.dtype)


def temperature_scales(position_ids: torch.Tensor, floor_scale: int, attn_scale: float) -> torch.Tensor:
    """NoPE layers' q scale `1 + attn_scale * log(1 + floor((pos + 1) / floor_scale))` (HF's formula, from
    arXiv:2501.19399): it sharpens attention far into long sequences, where no position signal is left."""
    return torch.log1p(torch.floor((position_ids.float() + 1.0) / floor_scale)) * attn_scale + 1.0


def attention_spans(config: Llama4Config, position_ids, cu_seqlens, max_seqlen: int) -> AttentionSpans:
    chunk = config.attention_chunk_size
    if chunk is None:
        chunk_cu, chunk_max = cu_seqlens, max_seqlen
    else:
        chunk_cu, chunk_max = chunked_cu_seqlens(cu_seqlens, chunk), min(max_seqlen, chunk)
    temp = (temperature_scales(position_ids, config.floor_scale, config.attn_scale)
            if config.attn_temperature_tuning else None)
    return AttentionSpans(cu_seqlens, max_seqlen, chunk_cu, chunk_max, temp)


class Llama4TextAttention(Attention):
    def __init__(self, config: Llama4Config, layer: int):
        super().__init__(config, qkv_bias=config.attention_bias, o_bias=config.attention_bias)
        self.use_rope = config.use_rope(layer)
        # HF gives only RoPE layers the q/k norm; its eps is rms_norm_eps.
        self.qk_norm_eps = config.rms_norm_eps if config.use_qk_norm and self.use_rope else None

    def forward(self, x, freqs_cis, spans: AttentionSpans):
        q, k, v = self.qkv(x)
        if self.use_rope:
            q, k = apply_rope_interleaved(q, freqs_cis), apply_rope_interleaved(k, freqs_cis)
            if self.qk_norm_eps is not None:  # after RoPE, as HF
                q, k = l2_norm(q, self.qk_norm_eps), l2_norm(k, self.qk_norm_eps)
            out = self.attn_core(q, k, v, spans.chunk_cu_seqlens, spans.chunk_max_seqlen)
        else:
            if spans.temperature is not None:
                q = (q * spans.temperature[:, None, None]).to(q.dtype)
            out = self.attn_core(q, k, v, spans.cu_seqlens, spans.max_seqlen)
        return self.out(out)


# ---------------------------------------------------------------------------------------------------- feed-forward


class Llama4TextExperts(nn.Module):
    """All routed experts' SwiGLU weights stacked as HF stores them: `gate_up_proj [E, H, 2I]` (gate first, then
    up, along the last dim) and `down_proj [E, I, H]`, applied as `x @ W` (no transposes)."""

    def __init__(self, config: Llama4Config):
        super().__init__()
        e, h, i = config.num_local_experts, config.hidden_size, config.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, h, 2 * i))
        self.down_proj = nn.Parameter(torch.empty(e, i, h))
        self.backend: str | None = None  # None: the process default (`set_moe_backend`)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """`x [N, H]`: routed rows sorted by expert, `counts[e]` of them for expert e; returns `[N, H]`.

        Under expert parallel the weights are DTensors sharded on experts and `x`, `counts` are the rows of this
        rank's experts only (`dtllama.parallel.ep` dispatches them): the math runs on the local shards."""
        gate_up, down = (w.to_local() if isinstance(w, DTensor) else w for w in (self.gate_up_proj, self.down_proj))
        if self._grouped(x):
            offs = counts.cumsum(0).to(torch.int32)
            gate, up = torch._grouped_mm(x, gate_up, offs=offs).chunk(2, dim=-1)
            return torch._grouped_mm(up * F.silu(gate), down, offs=offs)
        out, start = [], 0
        for e, n in enumerate(counts.tolist()):
            gate, up = (x[start:start + n] @ gate_up[e]).chunk(2, dim=-1)
            out.append((up * F.silu(gate)) @ down[e])
            start += n
        return torch.cat(out)

    def _grouped(self, x: torch.Tensor) -> bool:
        """Whether to take the grouped-GEMM path (see `set_moe_backend`). `_grouped_mm` wants every row stride a
        multiple of 16 bytes, so hidden and intermediate sizes a multiple of 16 / itemsize."""
        h, i = self.down_proj.shape[2], self.down_proj.shape[1]
        aligned = all(n * x.element_size() % 16 == 0 for n in (h, i))
        backend = self.backend or _default_moe_backend[0]
        if backend == "grouped" and not aligned:
            raise ValueError(f"MoE backend 'grouped' needs hidden_size={h} and intermediate_size={i} to be multiples "
                             f"of {16 // x.element_size()} for {x.dtype}; use set_moe_backend('loop')")
        if backend == "auto":
            return aligned and x.is_cuda and x.dtype == torch.bfloat16
        return backend == "grouped"


def expert_counts(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """How many of the rows' entries name each expert: `[..., n]` expert ids to `[..., num_experts]` int64 counts.
    A scatter rather than `bincount`, whose output size depends on the data (a graph break when compiled)."""
    counts = experts.new_zeros(*experts.shape[:-1], num_experts, dtype=torch.int64)
    return counts.scatter_add_(-1, experts.long(), torch.ones_like(experts, dtype=torch.int64))


def route(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(experts [T, k], scores [T, k])`: the top-k experts by router logit and their scores `sigmoid(logit)`,
    computed in fp32 as HF's `Llama4Router` does (its other experts get sigmoid(-inf) = 0, i.e. nothing)."""
    top, experts = torch.topk(logits, top_k, dim=1)
    return experts, torch.sigmoid(top.float()).to(logits.dtype)


class Llama4TextMoe(nn.Module):
    """Token-choice MoE. HF runs every expert on every token (scaled by a score of 0 where unrouted); this runs
    each expert on its own tokens only, which is the same sum: an expert's SwiGLU of a zero row is zero."""

    def __init__(self, config: Llama4Config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.experts = Llama4TextExperts(config)
        self.router = nn.Linear(config.hidden_size, config.num_local_experts, bias=False)
        self.shared_expert = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(output [T, H], router logits [T, E])`."""
        logits = self.router(x)
        experts, scores = route(logits, self.top_k)
        flat = experts.flatten()
        order = torch.argsort(flat, stable=True)  # rows grouped by expert, tokens in order within each
        token = order // self.top_k
        counts = expert_counts(flat, logits.shape[1])
        routed = self.experts(x[token] * scores.flatten()[order, None], counts)
        return self.shared_expert(x) + torch.zeros_like(x).index_add_(0, token, routed), logits


# ---------------------------------------------------------------------------------------------------- model


class Llama4TextDecoderLayer(nn.Module):
    def __init__(self, config: Llama4Config, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Llama4TextAttention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = config.is_moe(layer)
        self.feed_forward = (Llama4TextMoe(config) if self.is_moe
                             else SwiGLU(config.hidden_size, config.intermediate_size_mlp))

    def plan(self) -> P.LayerPlan:
        attention = P.attention_plan(3)  # (x, freqs_cis, spans)
        if not self.is_moe:
            return P.LayerPlan({**attention, **P.swiglu_plan("feed_forward")})
        # The router and routed experts work on this rank's own tokens (the experts are sharded by EP, never TP).
        tp = {**attention, "feed_forward": P.OwnTokens(), "feed_forward.router": P.Router(),
              **P.swiglu_plan("feed_forward.shared_expert")}
        parts = ("input_layernorm", "self_attn", "post_attention_layernorm", "feed_forward.shared_expert")
        return P.LayerPlan(tp, experts="feed_forward.experts", compile_parts=parts)

    def forward(self, x, freqs_cis, spans: AttentionSpans):
        """`(x, router logits or None for a dense layer)`."""
        x = x + self.self_attn(self.input_layernorm(x), freqs_cis, spans)
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            h, logits = self.feed_forward(h)
            return x + h, logits
        return x + self.feed_forward(h), None


class Llama4TextModel(Decoder):
    """Embedding (without `padding_idx`, as `blocks.Decoder` explains), decoder layers, final norm; the layers'
    aux outputs are the MoE layers' router logits."""

    layer_class = Llama4TextDecoderLayer
    rotary_class = Llama4RotaryEmbedding

    def layer_inputs(self, x, position_ids, cu_seqlens, max_seqlen):
        return self.rotary_emb(position_ids), attention_spans(self.config, position_ids, cu_seqlens, max_seqlen)


@dataclass
class RouterStats:
    """Per MoE layer (in layer order): `tokens_per_expert [L, E]` (int64; each row sums to T * top_k) and the
    load-balance loss `aux_loss` (already times `router_aux_loss_coef`; None when that is 0)."""

    tokens_per_expert: torch.Tensor
    aux_loss: torch.Tensor | None


def router_stats(router_logits: list[torch.Tensor], top_k: int, coef: float,
                 token_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> RouterStats | None:
    """Counts of the routing `route` made, and the Switch Transformer load-balance loss (arXiv:2101.03961, eq. 4)
    `coef * E * sum_e f_e * P_e` per layer, averaged over MoE layers: `f_e` the share of tokens sent to expert e
    (of T, so top-k routing sums to k, as HF's `load_balancing_loss_func` counts), `P_e` the mean softmax router
    probability (the differentiable part). HF's Llama 4 text model computes no such loss (its config's
    `router_aux_loss_coef` is unused there); this is that helper's formula, per layer rather than over all
    layers' tokens pooled.

    `token_sum`: where this rank holds a shard of the sequences' tokens (sequence parallel), the sum over the
    ranks holding the others, so `f_e` and `P_e` are means over all the sequences' tokens as on one device.
    The counts returned stay this rank's own."""
    if not router_logits:
        return None
    logits = torch.stack(router_logits)  # [L, T, E]
    n_layers, T, E = logits.shape
    counts = expert_counts(torch.topk(logits.detach(), top_k, dim=-1).indices.reshape(n_layers, -1), E)
    if not coef:
        return RouterStats(counts, None)
    total = token_sum or (lambda x: x)
    n_tokens = total(torch.tensor(float(T), device=logits.device)).clamp_min(1)
    share = total(counts.float()) / n_tokens
    prob = total(torch.softmax(logits.float(), dim=-1).sum(1)) / n_tokens
    return RouterStats(counts, coef * E * (share * prob).sum(-1).mean())


@dataclass
class Llama4CausalLMOutput(CausalLMOutput):
    router_stats: RouterStats | None = None


class Llama4ForCausalLM(CausalLM):
    """Causal LM with HF's `Llama4ForCausalLM` parameter names; its output adds `router_stats` over the batch's real
    tokens. `token_sum` sums the router statistics over the ranks holding other token shards of the same
    sequences (TP's sequence parallel, Ulysses register the sums), so the load-balance loss is that of all tokens."""

    config_class = Llama4Config  # what `hf_io` reads config.json with
    decoder_class = Llama4TextModel
    output_class = Llama4CausalLMOutput
    token_sums = ("token_sum",)

    def _build_head(self, last: bool) -> None:
        super()._build_head(last)
        self.token_sum = TokenSum()

    def stage_aux_loss(self, aux: list) -> torch.Tensor | None:
        """This stage's MoE layers' share of the load-balance loss (a mean over all MoE layers of the model)."""
        c = self.config
        stats = router_stats(aux, c.num_experts_per_tok, c.router_aux_loss_coef, self.token_sum)
        return None if stats.aux_loss is None else stats.aux_loss * (len(aux) / len(c.moe_layers))

    def aux_outputs(self, aux: list) -> dict:
        c = self.config
        return {"router_stats": router_stats(aux, c.num_experts_per_tok, c.router_aux_loss_coef, self.token_sum)}

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = torch.float32) -> "Llama4ForCausalLM":
        """Load a transformers-saved `Llama4ForCausalLM` folder, or the text model of a multimodal
        (`Llama4ForConditionalGeneration`) one, whose tensors are the same names under `language_model.`."""
        from dtllama.models.hf_io import load_state_into

        path = os.fspath(path)
        config = Llama4Config.from_hf(path)
        with torch.device("meta"):
            model = cls(config)
        model.to_empty(device="cpu")
        if dtype is not None:
            model.to(dtype)
        load_state_into(_MultimodalView(model) if _is_multimodal(path) else model, path)
        return model


class _MultimodalView(nn.Module):
    """The text model as a multimodal checkpoint names it: its own state-dict keys under `language_model.` (a
    prefix, not a key map); the checkpoint's vision tensors are simply not read."""

    def __init__(self, model: Llama4ForCausalLM):
        super().__init__()
        self.language_model = model

    def reset_buffers(self) -> None:
        self.language_model.reset_buffers()


def _is_multimodal(path: str) -> bool:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f).get("model_type") == "llama4"


__all__ = ["Llama4CausalLMOutput", "Llama4Config", "Llama4ForCausalLM", "RouterStats", "set_moe_backend"]
