"""Images and videos in a packed batch, for the Hugging Face adapter's vision-language models (Qwen2.5-VL).

transformers' VL forward embeds `[B, S]` rows, scatters the vision tower's features into the image and video tokens
and derives 3-row mRoPE positions from the padded rows. On a packed batch the adapter does the same per sequence of
`cu_seqlens`, with transformers' own pieces (`get_image_features`, `get_video_features`, `get_rope_index`), before
the decoder's inputs hook: context parallelism then slices the merged embeddings and the `[3, T]` positions together,
as verl does. A rank without images or videos runs the tower on a dummy image whose output is added times 0, so that
FSDP's collectives (and every tower parameter's gradient) are the same on every rank.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from dtllama.models.blocks import MEDIA


@dataclass(frozen=True)
class Kind:
    """One kind of visual input: its forward arguments, its placeholder token, transformers' feature method and
    its `mm_token_type_ids` value."""

    pixels: str
    grid: str
    token: str
    features: str
    type_id: int


KINDS = (Kind("pixel_values", "image_grid_thw", "image_token_id", "get_image_features", 1),
         Kind("pixel_values_videos", "video_grid_thw", "video_token_id", "get_video_features", 2))


def _tokens_per_item(vlm, grid: torch.Tensor) -> torch.Tensor:
    merge = vlm.config.vision_config.spatial_merge_size
    return grid.long().prod(-1) // merge**2


def _check_kind(vlm, input_ids: torch.Tensor, media: dict, kind: Kind) -> None:
    pixels, grid = media.get(kind.pixels), media.get(kind.grid)
    token = getattr(vlm.config, kind.token)
    n_tokens = int((input_ids == token).sum())
    if (pixels is None) != (grid is None):
        given, missing = (kind.pixels, kind.grid) if grid is None else (kind.grid, kind.pixels)
        raise ValueError(f"{given} was given without {missing}: pass both, as the processor makes them")
    if pixels is None:
        if n_tokens:
            raise ValueError(f"input_ids hold {n_tokens} {kind.token.removesuffix('_token_id')} tokens (id {token}) "
                             f"but no {kind.pixels} were given")
        return
    if grid.dim() != 2 or grid.shape[1] != 3:
        raise ValueError(f"{kind.grid} of shape {tuple(grid.shape)}: one (t, h, w) row per item, [N, 3]")
    if int(grid.long().prod(-1).sum()) != pixels.shape[0]:
        raise ValueError(f"{kind.grid} {grid.tolist()} holds {int(grid.long().prod(-1).sum())} patches but "
                         f"{kind.pixels} has {pixels.shape[0]} rows")
    n_features = int(_tokens_per_item(vlm, grid).sum())
    if n_features != n_tokens:
        raise ValueError(f"input_ids hold {n_tokens} {kind.token.removesuffix('_token_id')} tokens (id {token}) but "
                         f"{kind.pixels} give {n_features} features; each item needs t*h*w/merge^2 tokens")


def check_images(vlm, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, media: dict) -> None:
    """Refuse what the model cannot place: pixels without grids, a grid whose patches are not the pixels' rows,
    image or video tokens in `input_ids` that are not the features' count, a `second_per_grid_ts` not one per video,
    a sequence of `cu_seqlens` that cuts through an image or a video."""
    for kind in KINDS:
        _check_kind(vlm, input_ids, media, kind)
    seconds, videos = media.get("second_per_grid_ts"), media.get("video_grid_thw")
    if seconds is not None and (videos is None or seconds.shape != (videos.shape[0],)):
        raise ValueError(f"second_per_grid_ts of shape {tuple(seconds.shape)}: one per video of video_grid_thw "
                         f"({0 if videos is None else videos.shape[0]})")
    items_per_sequence(vlm, input_ids, cu_seqlens, media)


def _features(vlm, kind: Kind, pixels: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """The vision tower's merged features `[N tokens, hidden]` of all items of a kind, in order."""
    out = getattr(vlm, kind.features)(pixels, grid)
    out = getattr(out, "pooler_output", out)  # transformers 5 returns an output object, earlier a tuple
    return torch.cat(list(out)) if isinstance(out, (tuple, list)) else out


def merge_images(vlm, embeds: torch.Tensor, input_ids: torch.Tensor, media: dict) -> torch.Tensor:
    """`embeds [T, hidden]` with the images' and videos' features in place of their tokens' embeddings; without
    either, a dummy image's features times 0 (the tower's collectives and gradients as on a rank with images)."""
    given = [kind for kind in KINDS if media.get(kind.pixels) is not None]
    if not given:
        vision = vlm.config.vision_config
        merge = vision.spatial_merge_size
        width = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        grid = torch.tensor([[1, merge, merge]], device=embeds.device)
        pixels = torch.zeros(merge * merge, width, device=embeds.device, dtype=embeds.dtype)
        return embeds + 0.0 * _features(vlm, KINDS[0], pixels, grid).sum().to(embeds.dtype)
    for kind in given:
        features = _features(vlm, kind, media[kind.pixels], media[kind.grid]).to(embeds.dtype)
        mask = (input_ids == getattr(vlm.config, kind.token))[:, None].expand_as(embeds)
        embeds = embeds.masked_scatter(mask, features)
    return embeds


def _rows_of(per_item: list[int], first: int, n: int, span: str) -> int:
    """The index after the items from `first` whose tokens add up to `n` (the ones a sequence holds)."""
    k, count = first, 0
    while count < n and k < len(per_item):
        count, k = count + per_item[k], k + 1
    if count != n:
        raise ValueError(f"the sequence at tokens {span} holds {n} tokens of images or videos that do not end at an "
                         f"item's last ({per_item} tokens per item): a cut through an image or a video; cut the "
                         "packed batch between sequences only, each item's tokens whole in one")
    return k


def _token_types(vlm, input_ids: torch.Tensor) -> torch.Tensor:
    types = torch.zeros_like(input_ids, dtype=torch.int32)
    for kind in KINDS:
        types[input_ids == getattr(vlm.config, kind.token)] = kind.type_id
    return types


def items_per_sequence(vlm, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, media: dict) -> list[dict]:
    """For each sequence of `cu_seqlens`, the `get_rope_index` arguments of its own images and videos (their grid
    rows, the videos' seconds), or {} for a text-only sequence; a ValueError where a sequence cuts through one."""
    kinds = [kind for kind in KINDS if media.get(kind.grid) is not None]
    types = _token_types(vlm, input_ids)
    per_item = {kind: _tokens_per_item(vlm, media[kind.grid]).tolist() for kind in kinds}
    next_item, out = dict.fromkeys(kinds, 0), []
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        kwargs = {}
        for kind in kinds:
            n = int((types[s:e] == kind.type_id).sum())
            first, next_item[kind] = next_item[kind], _rows_of(per_item[kind], next_item[kind], n, f"[{s}, {e})")
            if n:
                kwargs[kind.grid] = media[kind.grid][first:next_item[kind]]
                if kind.type_id == 2 and media.get("second_per_grid_ts") is not None:
                    kwargs["second_per_grid_ts"] = media["second_per_grid_ts"][first:next_item[kind]]
        out.append(kwargs)
    return out


def mrope_positions(vlm, input_ids: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: torch.Tensor,
                    media: dict) -> torch.Tensor:
    """`[3, T]` mRoPE positions: a sequence without images or videos keeps its positions on all three rows; one
    with them gets transformers' `get_rope_index` of it alone, with its own grid rows (and video seconds)."""
    out = position_ids.expand(3, -1).clone()
    if all(media.get(kind.grid) is None for kind in KINDS):
        return out
    types = _token_types(vlm, input_ids)
    wants_types = "mm_token_type_ids" in inspect.signature(vlm.get_rope_index).parameters
    bounds = cu_seqlens.tolist()
    for s, e, kwargs in zip(bounds[:-1], bounds[1:], items_per_sequence(vlm, input_ids, cu_seqlens, media)):
        if not kwargs:
            continue
        if wants_types:  # transformers 5.2x: token types (0 text, 1 image, 2 video) instead of vision-start tokens
            kwargs["mm_token_type_ids"] = types[None, s:e]
        out[:, s:e] = vlm.get_rope_index(input_ids[None, s:e], **kwargs)[0][:, 0].to(out)
    return out


__all__ = ["KINDS", "MEDIA", "check_images", "items_per_sequence", "merge_images", "mrope_positions"]
