"""Packing sequences into bins by a token budget: first-fit (the data loader's micro-batches and the pipeline's
microbatches share it) and the pipeline's microbatches of one step, each padded to one static token count."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .rmpad import IGNORE_INDEX, Packed, cu_seqlens_from_lengths, position_ids_from_cu_seqlens


def first_fit(lengths: list[int], capacity: int, n_bins: int | None = None) -> list[list[int]] | None:
    """Indices of `lengths` packed longest first into the first bin with room for them: into `n_bins` bins (None
    if one does not fit), or into as many bins as needed (every length must be at most `capacity`)."""
    bins: list[list[int]] = [[] for _ in range(n_bins or 0)]
    fill = [0] * len(bins)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        k = next((k for k in range(len(bins)) if fill[k] + lengths[i] <= capacity), None)
        if k is None:
            if n_bins is not None:
                return None
            bins.append([])
            fill.append(0)
            k = len(bins) - 1
        bins[k].append(i)
        fill[k] += lengths[i]
    return bins



@dataclass
class Microbatches:
    """One step's microbatches, each padded to the same token count; `seqs[i]` lists the sequences (indices into
    the batch) that microbatch i holds, in order."""

    packed: list[Packed]
    seqs: list[list[int]]
    lengths: list[int]

    def args(self) -> tuple[torch.Tensor]:
        return (torch.cat([p.input_ids for p in self.packed]),)

    def kwargs(self) -> dict[str, torch.Tensor]:
        """Each microbatch's inputs, concatenated so that the schedule's even split along dim 0 hands every
        stage its own microbatch's: `cu_seqlens` padded with repeats of T to one length, the counts on the host."""
        n = max(p.cu_seqlens.numel() for p in self.packed)
        cu = [torch.cat([p.cu_seqlens, p.cu_seqlens[-1:].expand(n - p.cu_seqlens.numel())]) for p in self.packed]
        out = dict(position_ids=torch.cat([p.position_ids for p in self.packed]), cu_seqlens=torch.cat(cu),
                   num_seqs=torch.tensor([p.cu_seqlens.numel() - 1 for p in self.packed]),
                   max_seqlen=torch.tensor([p.max_seqlen for p in self.packed]))
        if self.packed[0].labels is not None:
            out["labels"] = torch.cat([p.labels for p in self.packed])
        return out

    def take(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """Microbatch i's rows of a per-token `[T, ...]` tensor of the batch, in the microbatch's layout (the
        inverse of `merge`; zeros on its padding tail): per-token targets for its loss."""
        starts = [0]
        for n in self.lengths:
            starts.append(starts[-1] + n)
        p = self.packed[i]
        out = x.new_zeros((p.input_ids.numel(), *x.shape[1:]))
        for k, s in enumerate(self.seqs[i]):
            out[int(p.cu_seqlens[k]):int(p.cu_seqlens[k + 1])] = x[starts[s]:starts[s + 1]]
        return out

    def merge(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        """Per-microbatch `[microbatch_tokens, ...]` outputs back into the batch's packed order `[T, ...]`."""
        pieces: dict[int, torch.Tensor] = {}
        for seqs, out, p in zip(self.seqs, outputs, self.packed):
            for k, s in enumerate(seqs):
                pieces[s] = out[int(p.cu_seqlens[k]):int(p.cu_seqlens[k + 1])]
        return torch.cat([pieces[s] for s in range(len(self.lengths))])


def split_microbatches(batch: Packed, n: int, tokens: int) -> Microbatches:
    """Pack the batch's sequences first-fit (longest first) into `n` microbatches of at most `tokens` tokens
    each, then pad each to exactly `tokens` with a tail sequence whose labels are ignored."""
    cu = batch.cu_seqlens.tolist()
    lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
    bins = first_fit(lengths, tokens, n)
    if bins is None:
        total = sum(lengths)
        raise ValueError(
            f"the batch's {total} tokens in {len(lengths)} sequences (longest {max(lengths)}) do not fit "
            f"{n} microbatches of {tokens} tokens; raise microbatch_tokens to at least "
            f"{max(lengths) + -(-total // n)} (always enough) or the number of microbatches")
    packed = []
    for seqs in bins:
        seqs.sort()
        packed.append(_pack(batch, [(cu[s], cu[s + 1]) for s in seqs], tokens))
    return Microbatches(packed, bins, lengths)


def _pack(batch: Packed, spans: list[tuple[int, int]], tokens: int) -> Packed:
    ids = [batch.input_ids[a:b] for a, b in spans]
    labels = [batch.labels[a:b] for a, b in spans] if batch.labels is not None else None
    lengths = [b - a for a, b in spans]
    pad = tokens - sum(lengths)
    if pad:  # a tail sequence of its own: attends to nothing real, its labels are ignored
        ids.append(batch.input_ids.new_zeros(pad))
        if labels is not None:
            labels.append(batch.input_ids.new_full((pad,), IGNORE_INDEX))
        lengths.append(pad)
    cu = cu_seqlens_from_lengths(lengths, device=batch.cu_seqlens.device)
    return Packed(torch.cat(ids), position_ids_from_cu_seqlens(cu, tokens), cu, max(lengths), None,
                  torch.cat(labels) if labels is not None else None)


__all__ = ["Microbatches", "first_fit", "split_microbatches"]
