"""One dispatch for causal attention over a packed batch (`cu_seqlens` marks the documents).

Backends, best first:
- `fa4`: FlashAttention-4 (`flash-attn-4`, when installed; Hopper or newer, fp16/bf16, head_dim <= 128),
  as the custom ops of `_fa4.py`;
- `flash`: flash-attn's `flash_attn_varlen_func` (when installed; CUDA, fp16/bf16);
- `cudnn`: for a batch whose sequences all have one length (`T == B * max_seqlen`, read from shapes, no
  sync), dense causal SDPA over `[B, H, S, D]`, which picks cuDNN on Hopper (KV heads repeated: SDPA's GQA
  path is not cuDNN's);
- `varlen`: torch's `torch.nn.attention.varlen.varlen_attn` (FlashAttention-2 kernels; CUDA, fp16/bf16);
- `flex`: FlexAttention with a document mask (CUDA, any float dtype);
- `sdpa`: SDPA with a block-diagonal causal mask, O(T^2) memory: the CPU reference and the spec every
  other backend is tested against.
All take grouped-query KV as is, except `cudnn`, and `varlen` on a torch without `enable_gqa`; each is an
op torch.compile traces without a graph break. The process default is `set_attention_backend` or the
`DTLLAMA_ATTENTION` environment variable; `varlen_attention(..., backend=)` overrides it for one call.
`auto` takes the best backend available for the inputs' device, dtype and shapes; the one in use is
printed once.
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from dtllama.compat import VARLEN_ATTN_PARAMS, causal_varlen_attn

from . import _fa4

BACKENDS = ("auto", "fa4", "flash", "cudnn", "varlen", "flex", "sdpa")
_AUTO_ORDER = ("fa4", "flash", "cudnn", "varlen", "flex")  # fastest first (H200, packed causal GQA fwd+bwd)
_backend = os.environ.get("DTLLAMA_ATTENTION", "auto")  # the process default; a call's `backend=` overrides it


def _check_name(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is unknown; choose one of {list(BACKENDS)}")


def set_attention_backend(name: str) -> None:
    """Set the process default backend of `varlen_attention` (calls passing `backend=` keep theirs)."""
    global _backend
    _check_name(name)
    _backend = name


def _probe_flash_attn() -> bool:
    try:
        from flash_attn import flash_attn_varlen_func  # noqa: F401
    except ImportError:
        return False
    return True


# Probed once at import, so that compiled code reads constants instead of tracing imports.
_FLASH_ATTN = _probe_flash_attn()
_VARLEN_PARAMS = VARLEN_ATTN_PARAMS  # varlen_attn's parameter names; None when this torch has none


# FA4 and cuDNN's fused attention: Hopper+ (where cuDNN is SDPA's first pick); FlashAttention-2 kernels: Ampere+
_MIN_CAPABILITY = {"fa4": 9, "flash": 8, "cudnn": 9, "varlen": 8}


def unavailable_reason(name: str, device: torch.device, dtype: torch.dtype, head_dim: int | None = None,
                       equal_lengths: bool | None = None) -> str | None:
    """Why backend `name` cannot run inputs of `dtype` (and `head_dim`; `equal_lengths`: whether the batch's
    sequences all have one length) on `device`, or None when it can."""
    if name == "sdpa":
        return None
    if device.type != "cuda":
        return f"it needs a CUDA device, the inputs are on {device.type}"
    if name == "cudnn" and equal_lengths is False:
        return "it takes batches of equal-length sequences only"
    if name == "cudnn" and head_dim is not None and head_dim > 128:
        return f"it takes head_dim <= 128, the inputs have {head_dim}"
    if name == "fa4" and not _fa4.AVAILABLE:
        return "flash-attn-4 is not installed"
    if name == "fa4" and head_dim is not None and not (8 <= head_dim <= 128 and head_dim % 8 == 0):
        return f"it takes head_dim in 8..128 (a multiple of 8), the inputs have {head_dim}"
    if name == "flash" and not _FLASH_ATTN:
        return "flash-attn is not installed"
    if name == "varlen" and _VARLEN_PARAMS is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen"
    if name in _MIN_CAPABILITY:
        if dtype not in (torch.float16, torch.bfloat16):
            return f"it takes fp16/bf16, the inputs are {dtype}"
        major, minor = _capability(device.index if device.index is not None else torch.cuda.current_device())
        if major < _MIN_CAPABILITY[name]:
            return f"it needs compute capability >= {_MIN_CAPABILITY[name]}.0, this GPU has {major}.{minor}"
    return None


@torch.compiler.assume_constant_result
def _capability(index: int) -> tuple[int, int]:
    """The GPU's compute capability, read eagerly even inside a compiled region (a constant per process)."""
    return torch.cuda.get_device_capability(index)


def cuda_backends(dtype: torch.dtype = torch.bfloat16, device: torch.device | None = None,
                  equal_lengths: bool = False) -> list[str]:
    """The backends that can run CUDA inputs of `dtype` on `device` (default: the current GPU), best first,
    for batches of any lengths (`equal_lengths=True`: of one length); none without a GPU."""
    if device is None:
        if not torch.cuda.is_available():
            return []
        device = torch.device("cuda", torch.cuda.current_device())
    return [n for n in _AUTO_ORDER if unavailable_reason(n, device, dtype, None, equal_lengths) is None]


def _requested(backend: str | None) -> tuple[str, str]:
    """`(name, how to ask for auto instead)` of a call's `backend`, or of the process default when None."""
    if backend is None:
        if _backend not in BACKENDS:
            raise ValueError(f"DTLLAMA_ATTENTION={_backend!r} is unknown; choose one of {list(BACKENDS)}")
        return _backend, "set DTLLAMA_ATTENTION=auto (or set_attention_backend('auto'))"
    _check_name(backend)
    return backend, "pass backend='auto' (or None for the process default)"


def _lacks(name: str, options: frozenset) -> str | None:
    """Why backend `name` cannot honour `options` (`varlen_attention`'s keywords in use), or None."""
    missing = sorted(o for o in options if o not in _SUPPORTS[name])
    if not missing:
        return None
    named = ["a value head dim other than q/k's" if m == "_dv" else m for m in missing]
    return f"it does not take {', '.join(named)}"


def _choose(device: torch.device, dtype: torch.dtype, head_dim: int | None = None,
            equal_lengths: bool | None = None, backend: str | None = None,
            options: frozenset = frozenset()) -> tuple[str, str]:
    """`(backend, why)`: the requested one (`backend`, or the process default when None), or `auto`'s pick
    with the reasons it passed over better ones."""
    name, fix = _requested(backend)
    if name != "auto":
        why = unavailable_reason(name, device, dtype, head_dim, equal_lengths) or _lacks(name, options)
        if why is not None:
            raise ValueError(f"attention backend {name!r} cannot run here: {why}; {fix} to pick one that can")
        return name, "requested"
    if device.type != "cuda":
        return "sdpa", f"auto on {device.type}"
    skipped = []
    for name in _AUTO_ORDER:
        why = unavailable_reason(name, device, dtype, head_dim, equal_lengths) or _lacks(name, options)
        if why is None:
            return name, "auto" + "".join(f"; not {n}: {w}" for n, w in skipped)
        skipped.append((name, why))
    return "sdpa", "auto" + "".join(f"; not {n}: {w}" for n, w in skipped)


def attention_backend(device: torch.device, dtype: torch.dtype = torch.bfloat16, equal_lengths: bool = False,
                      backend: str | None = None) -> str:
    """The backend `varlen_attention(..., backend=backend)` uses for inputs on `device` of `dtype` (sequences of
    several lengths, or, with `equal_lengths`, of one)."""
    return _choose(device, dtype, None, equal_lengths, backend)[0]


@lru_cache(maxsize=None)
def _announce(name: str, why: str) -> None:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"dtllama attention backend: {name} ({why})", flush=True)


def document_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """The index of the sequence each packed token belongs to."""
    return torch.searchsorted(cu_seqlens[1:].long(), torch.arange(total, device=cu_seqlens.device), right=True)


# The options each backend honours beyond plain causal attention (`varlen_attention`'s keywords). `auto` passes over
# a backend that lacks one the call uses; a requested backend that lacks it is an error naming the option.
OPTIONS = ("scale", "window", "softcap", "sinks")
_SUPPORTS = {"fa4": frozenset(), "flash": frozenset({"scale", "window", "softcap"}),
             "cudnn": frozenset({"scale"}), "varlen": frozenset({"scale", "window"}),
             "flex": frozenset({"scale", "window", "softcap", "_dv"}), "sdpa": frozenset({*OPTIONS, "_dv"})}
if _VARLEN_PARAMS is None or "scale" not in _VARLEN_PARAMS:
    _SUPPORTS["varlen"] = _SUPPORTS["varlen"] - {"scale"}
if _VARLEN_PARAMS is None or "window_size" not in _VARLEN_PARAMS:
    _SUPPORTS["varlen"] = _SUPPORTS["varlen"] - {"window"}


def _used_options(q: torch.Tensor, scale, window, softcap, sinks) -> dict:
    """The options a call sets that change the result (a scale of `head_dim ** -0.5` is the default)."""
    used = {}
    if scale is not None and float(scale) != q.shape[-1] ** -0.5:
        used["scale"] = float(scale)
    if window is not None:
        if int(window) < 1:
            raise ValueError(f"window={window} must be a positive number of tokens (each query sees itself and the "
                             "window - 1 before it), or None for full causal attention")
        used["window"] = int(window)
    if softcap is not None and float(softcap) > 0:
        used["softcap"] = float(softcap)
    if sinks is not None:
        if sinks.shape != (q.shape[1],):
            raise ValueError(f"sinks of shape {tuple(sinks.shape)}: pass one logit per query head [{q.shape[1]}]")
        used["sinks"] = sinks
    return used


def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
    backend: str | None = None, *, scale: float | None = None, window: int | None = None,
    softcap: float | None = None, sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of packed `q[T, Hq, Dqk]` over `k[T, Hkv, Dqk], v[T, Hkv, Dv]` within each sequence;
    returns `[T, Hq, Dv]`.

    `Hq` must be a multiple of `Hkv` (grouped-query attention). `backend`: one of `BACKENDS` for this call, or
    None for the process default (`set_attention_backend` / `DTLLAMA_ATTENTION`); under torch.compile it is a
    constant of the traced graph. The options, as Hugging Face families use them: `scale` of the scores (default
    `Dqk ** -0.5`); `window`: each query sees itself and the `window - 1` tokens before it (sliding-window layers);
    `softcap`: scores pass through `softcap * tanh(s / softcap)` (Gemma 2); `sinks[Hq]`: one learned logit per
    head joining every row's softmax without a value (GPT-OSS). `auto` picks the best backend that honours them.
    """
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads")
    used = _used_options(q, scale, window, softcap, sinks)
    # Shapes only, no device sync; under compile with a dynamic T, only where the shapes prove it (a guess would bake
    # one batch's [B, S] into the graph, and the next T would not fit its view).
    equal_lengths = statically_known_true(q.shape[0] == (cu_seqlens.shape[0] - 1) * int(max_seqlen))
    needs = frozenset(used) | ({"_dv"} if q.shape[-1] != v.shape[-1] else set())  # "_dv": MLA's own value dim
    name, why = _choose(q.device, q.dtype, q.shape[-1], equal_lengths, backend, needs)
    if not torch.compiler.is_compiling():
        _announce(name, why)
    return _IMPLS[name](q, k, v, cu_seqlens, int(max_seqlen), **used)


def _flash(q, k, v, cu_seqlens, max_seqlen, scale=None, window=None, softcap=None):
    from flash_attn import flash_attn_varlen_func

    cu = cu_seqlens.to(torch.int32)
    extra = {"softmax_scale": scale, "window_size": (-1, -1) if window is None else (window - 1, 0),
             "softcap": 0.0 if softcap is None else softcap}
    return flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, causal=True, **extra)


def _torch_varlen(q, k, v, cu_seqlens, max_seqlen, scale=None, window=None):
    return causal_varlen_attn(q, k, v, cu_seqlens, max_seqlen, _VARLEN_PARAMS, scale=scale, window=window)


def _cudnn(q, k, v, cu_seqlens, max_seqlen, scale=None):
    """Sequences of one length `max_seqlen`: the packed tokens are `[B, S]` as they are."""
    B, groups = cu_seqlens.shape[0] - 1, q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    q, k, v = (x.view(B, max_seqlen, *x.shape[1:]).transpose(1, 2) for x in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return out.transpose(1, 2).reshape(B * max_seqlen, *out.shape[1:2], out.shape[-1])


def _sdpa_mask(cu_seqlens, T: int, device, window: int | None) -> torch.Tensor:
    doc = document_ids(cu_seqlens, T)
    idx = torch.arange(T, device=device)
    mask = (doc[:, None] == doc[None, :]) & (idx[:, None] >= idx[None, :])
    if window is not None:
        mask &= idx[:, None] - idx[None, :] < window
    return mask


def _sdpa(q, k, v, cu_seqlens, max_seqlen, scale=None, window=None, softcap=None, sinks=None):
    T = q.shape[0]
    mask = _sdpa_mask(cu_seqlens, T, q.device, window)
    if softcap is not None or sinks is not None:
        return _eager(q, k, v, mask, scale, softcap, sinks)
    q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1], scale=scale)
    return out.squeeze(0).transpose(0, 1)


def _eager(q, k, v, mask, scale, softcap, sinks):
    """Scores in fp32, capped, masked, with a sink column per head in the softmax: the reference of those options."""
    groups = q.shape[1] // k.shape[1]
    k, v = (x.repeat_interleave(groups, dim=1) for x in (k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        sink = sinks.float()[:, None, None].expand(-1, s.shape[1], 1)
        p = torch.softmax(torch.cat([s, sink], dim=-1), dim=-1)[..., :-1]
    else:
        p = torch.softmax(s, dim=-1)
    return torch.einsum("hqk,khd->qhd", p, v.float()).to(q.dtype)


_block_mask_cache: list = [None, None]  # [(cu_seqlens tensor, T), BlockMask]


def _document_block_mask(cu_seqlens, T: int, device, window: int | None = None):
    """The BlockMask of a batch, built once and reused by every layer that gets the same `cu_seqlens` (and window)."""
    from torch.nn.attention.flex_attention import create_block_mask

    key = _block_mask_cache[0]
    if key is not None and key[0] is cu_seqlens and key[1] == T and key[2] == window:
        return _block_mask_cache[1]
    doc = document_ids(cu_seqlens, T)

    def mask_mod(b, h, q_idx, kv_idx):
        causal = (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)
        return causal if window is None else causal & (q_idx - kv_idx < window)

    mask = create_block_mask(mask_mod, None, None, T, T, device=device)
    _block_mask_cache[:] = [(cu_seqlens, T, window), mask]
    return mask


def _flex(q, k, v, cu_seqlens, max_seqlen, scale=None, window=None, softcap=None):
    T = q.shape[0]
    block_mask = _document_block_mask(cu_seqlens, T, q.device, window)
    q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    score_mod = None
    if softcap is not None:
        def score_mod(score, b, h, q_idx, kv_idx):
            return softcap * torch.tanh(score / softcap)
    out = _compiled_flex()(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                           enable_gqa=k.shape[1] != q.shape[1])
    return out.squeeze(0).transpose(0, 1)


@lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # Eager FlexAttention materializes the scores; compiled it is a fused kernel. (Inductor's
    # `wrap_inductor_compiled_regions` would let selective AC see it, but then the checkpoint's recompute
    # fails on torch 2.11: "flex_attention encountered during backward, but not found in storage".)
    return torch.compile(flex_attention, dynamic=True)


_IMPLS = {"fa4": _fa4.fa4_varlen_attention, "flash": _flash, "cudnn": _cudnn, "varlen": _torch_varlen, "flex": _flex,
          "sdpa": _sdpa}
