"""Padding-free ("RmPad") batches: pack a padded `[B, S]` batch into `[T]` tokens and back.

A packed batch is `input_ids[T]`, `position_ids[T]` (restarting at 0 per sequence), `cu_seqlens[B+1]`
(int32 offsets, 0 first and T last) and `max_seqlen`; `indices[T]` remembers where each packed token
sat in the flattened `[B*S]` batch so that outputs can be scattered back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass
class Packed:
    """A packed batch; `indices` and `padded_shape` are set when it came from a padded `[B, S]` batch."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    indices: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    padded_shape: tuple[int, int] | None = None

    def repad(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """A packed output `[T, ...]` in the caller's layout: as is, or back to `[B, S, ...]` (zeros at padding)."""
        if x is None or self.padded_shape is None:
            return x
        return unpack(x, self.indices, *self.padded_shape)


def pack(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
) -> Packed:
    """Drop the padding of a `[B, S]` batch; any padding side works.

    Position ids default to the running count of real tokens in each row, which is what a
    left-padded generation batch needs (and equals `arange` for right padding).
    """
    if input_ids.dim() != 2:
        raise ValueError(f"pack expects input_ids of shape [B, S], got {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
        )
    mask = attention_mask.bool()
    lengths = mask.sum(-1, dtype=torch.int32)
    indices = mask.flatten().nonzero().squeeze(-1)
    if position_ids is None:
        position_ids = mask.long().cumsum(-1) - 1
    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    return Packed(
        input_ids=input_ids.flatten()[indices],
        position_ids=position_ids.flatten()[indices],
        cu_seqlens=cu_seqlens,
        max_seqlen=int(lengths.max()) if lengths.numel() else 0,
        indices=indices,
        labels=None if labels is None else labels.flatten()[indices],
        padded_shape=tuple(input_ids.shape),
    )


def unpack(x: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Scatter packed `[T, ...]` back to `[B, S, ...]`, zeros at padding."""
    out = x.new_zeros((batch * seqlen, *x.shape[1:]))
    out[indices] = x
    return out.view(batch, seqlen, *x.shape[1:])


def cu_seqlens_from_lengths(lengths: list[int] | torch.Tensor, device=None) -> torch.Tensor:
    lengths = torch.as_tensor(lengths, dtype=torch.int32, device=device)
    return torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))


def position_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Positions restarting at 0 at every sequence start."""
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    starts = torch.repeat_interleave(cu[:-1], lengths, output_size=total)
    return torch.arange(total, device=cu.device) - starts


def shift_labels(input_ids: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Next-token labels of a packed batch: `labels[t] = input_ids[t+1]`, ignored at each sequence end."""
    labels = torch.roll(input_ids, -1).clone()
    labels[cu_seqlens[1:].long() - 1] = IGNORE_INDEX
    return labels


def prepare_batch(
    input_ids: torch.Tensor,
    vocab_size: int,
    position_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    labels: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> Packed:
    """What a model forward receives, as a validated packed batch with positions and `max_seqlen` filled in.

    Packed input is `[T]` with `cu_seqlens`; padded input is `[B, S]` with an optional
    `attention_mask`, packed here (`Packed.repad` puts outputs back). Validation (`check_packed`)
    syncs with the device, so it is skipped while compiling, where the eager caller already ran it.
    """
    if input_ids.dim() == 2:
        if cu_seqlens is not None:
            raise ValueError("cu_seqlens is for packed [T] input; a [B, S] batch takes attention_mask")
        batch = pack(input_ids, attention_mask, position_ids, labels)
    elif input_ids.dim() == 1:
        if attention_mask is not None:
            raise ValueError("attention_mask is for a padded [B, S] batch; packed [T] input takes cu_seqlens")
        if cu_seqlens is None:
            raise ValueError("packed [T] input_ids need cu_seqlens (see dtllama.ops.pack)")
        batch = Packed(input_ids, position_ids, cu_seqlens, max_seqlen, labels=labels)
    else:
        raise ValueError(f"input_ids must be [T] (packed) or [B, S] (padded), got shape {tuple(input_ids.shape)}")
    if not torch.compiler.is_compiling():
        check_packed(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen, vocab_size, batch.labels)
    if batch.position_ids is None:
        batch.position_ids = position_ids_from_cu_seqlens(batch.cu_seqlens, batch.input_ids.shape[0])
    if batch.max_seqlen is None:
        batch.max_seqlen = int((batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).max())
    return batch


def check_packed(
    input_ids: torch.Tensor,
    position_ids: torch.Tensor | None,
    cu_seqlens: torch.Tensor,
    max_seqlen: int | None,
    vocab_size: int,
    labels: torch.Tensor | None = None,
) -> None:
    """Raise a ValueError naming the bad value; run once per step before any kernel or collective.

    `position_ids` and `max_seqlen` may be None (they are then derived from a valid `cu_seqlens`).
    Every value check reads one small tensor back from the device: one sync per step, not one per check.
    """
    T = input_ids.shape[0]
    if input_ids.dim() != 1:
        raise ValueError(f"packed input_ids must be 1-D [T], got shape {tuple(input_ids.shape)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D [B+1] with B >= 1, got shape {tuple(cu_seqlens.shape)}")
    if position_ids is not None and position_ids.shape != input_ids.shape:
        raise ValueError(
            f"position_ids has shape {tuple(position_ids.shape)} but input_ids has {tuple(input_ids.shape)}; "
            "they must both be [T]"
        )
    if labels is not None and labels.shape != input_ids.shape:
        raise ValueError(f"labels has shape {tuple(labels.shape)} but input_ids has {tuple(input_ids.shape)}")
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    stats = [cu[0], cu[-1], lengths.min(), lengths.max()]
    ids = input_ids.long() if T else input_ids.new_zeros(1, dtype=torch.long)
    stats += [ids.min(), ids.max()]
    if labels is not None:
        bad = _invalid_labels(labels, vocab_size)
        first_bad = torch.where(bad, torch.arange(T, device=labels.device), T).min() if T else cu.new_tensor(T)
        stats += [first_bad, labels[first_bad.clamp_max(T - 1)].long() if T else cu.new_tensor(0)]
    first, last, shortest, longest, lo, hi, *label_stats = torch.stack(stats).tolist()
    if first != 0 or last != T:
        raise ValueError(
            f"cu_seqlens must start at 0 and end at T={T} (the packed token count), got "
            f"cu_seqlens[0]={first}, cu_seqlens[-1]={last}"
        )
    if shortest < 0:
        raise ValueError(f"cu_seqlens must be non-decreasing, got {cu_seqlens.tolist()}")
    if max_seqlen is not None and max_seqlen < longest:
        raise ValueError(f"max_seqlen={max_seqlen} is smaller than the longest sequence ({longest})")
    if T and (lo < 0 or hi >= vocab_size):
        bad = hi if hi >= vocab_size else lo
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab_size}); check the tokenizer")
    if label_stats and label_stats[0] < T:
        _bad_label(label_stats[1], vocab_size)


def check_labels(labels: torch.Tensor, vocab_size: int) -> None:
    """Labels are token ids in `[0, vocab)` or -100 (ignored); anything else would read a wrong log-prob."""
    bad = _invalid_labels(labels, vocab_size)
    if bool(bad.any()):
        _bad_label(int(labels[bad][0]), vocab_size)


def _invalid_labels(labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab_size))


def _bad_label(value: int, vocab_size: int):
    raise ValueError(f"label {value} is outside the vocabulary [0, {vocab_size}) and is not {IGNORE_INDEX} "
                     "(ignored); check the tokenizer or the label shift")


def pad_to_multiple(
    input_ids: torch.Tensor, cu_seqlens: torch.Tensor, multiple: int, labels: torch.Tensor | None = None,
) -> Packed:
    """Append a dummy tail sequence so that T is a multiple of `multiple` (tp*cp splits T evenly).

    The tail's labels are ignored, and, being its own sequence, it attends to nothing else; so real
    tokens' outputs are unchanged.
    """
    T = input_ids.shape[0]
    pad = -T % multiple
    position_ids = position_ids_from_cu_seqlens(cu_seqlens, T)
    if labels is None:
        labels = torch.full_like(input_ids, IGNORE_INDEX) if pad else None
    if pad:
        input_ids = torch.cat([input_ids, input_ids.new_zeros(pad)])
        position_ids = torch.cat([position_ids, torch.arange(pad, device=position_ids.device, dtype=position_ids.dtype)])
        labels = torch.cat([labels, labels.new_full((pad,), IGNORE_INDEX)])
        cu_seqlens = torch.cat([cu_seqlens, cu_seqlens.new_tensor([T + pad])])
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    return Packed(input_ids, position_ids, cu_seqlens, int(lengths.max()) if lengths.numel() else 0, None, labels)
