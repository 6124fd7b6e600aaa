"""Images in a packed batch, for the Hugging Face adapter's vision-language models (Qwen2.5-VL).

transformers' VL forward embeds `[B, S]` rows, scatters the vision tower's features into the image tokens and
derives 3-row mRoPE positions from the padded rows. On a packed batch the adapter does the same per sequence of
`cu_seqlens`, with transformers' own pieces (`get_image_features`, `get_rope_index`), before the decoder's inputs
hook: context parallelism then slices the merged embeddings and the `[3, T]` positions together, as verl does.
A rank without images runs the tower on a dummy image whose output is added times 0, so that FSDP's collectives
(and every tower parameter's gradient) are the same on every rank.
"""

from __future__ import annotations

import inspect

import torch

MEDIA = ("pixel_values", "image_grid_thw")


def _tokens_per_image(vlm, grid: torch.Tensor) -> torch.Tensor:
    merge = vlm.config.vision_config.spatial_merge_size
    return grid.long().prod(-1) // merge**2


def check_images(vlm, input_ids: torch.Tensor, media: dict) -> None:
    """Refuse images the model cannot place: videos, pixels without grids, a grid whose patches are not the pixels'
    rows, or image tokens in `input_ids` that are not the images' feature count."""
    unknown = sorted(k for k, v in media.items() if v is not None and k not in MEDIA)
    if unknown:
        raise ValueError(f"{unknown}: the Hugging Face adapter takes images only ({list(MEDIA)}); videos are not "
                         "supported yet")
    pixels, grid = media.get("pixel_values"), media.get("image_grid_thw")
    n_tokens = int((input_ids == vlm.config.image_token_id).sum())
    if (pixels is None) != (grid is None):
        raise ValueError("pixel_values and image_grid_thw come together (as the processor makes them); got one")
    if pixels is None:
        if n_tokens:
            raise ValueError(f"input_ids hold {n_tokens} image tokens (id {vlm.config.image_token_id}) but no "
                             "pixel_values were given")
        return
    if grid.dim() != 2 or grid.shape[1] != 3:
        raise ValueError(f"image_grid_thw of shape {tuple(grid.shape)}: one (t, h, w) row per image, [N, 3]")
    if int(grid.long().prod(-1).sum()) != pixels.shape[0]:
        raise ValueError(f"image_grid_thw {grid.tolist()} holds {int(grid.long().prod(-1).sum())} patches but "
                         f"pixel_values has {pixels.shape[0]} rows")
    n_features = int(_tokens_per_image(vlm, grid).sum())
    if n_features != n_tokens:
        raise ValueError(f"input_ids hold {n_tokens} image tokens (id {vlm.config.image_token_id}) but the images "
                         f"give {n_features} features; each image needs t*h*w/merge^2 tokens")


def _features(vlm, pixels: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """The vision tower's merged features `[N tokens, hidden]` of all images, in order."""
    out = vlm.get_image_features(pixels, grid)
    out = getattr(out, "pooler_output", out)  # transformers 5 returns an output object, earlier a tuple
    return torch.cat(list(out)) if isinstance(out, (tuple, list)) else out


def merge_images(vlm, embeds: torch.Tensor, input_ids: torch.Tensor, media: dict) -> torch.Tensor:
    """`embeds [T, hidden]` with the images' features in place of their tokens' embeddings; without images, a
    dummy image's features times 0 (the tower's collectives and gradients as on a rank with images)."""
    pixels, grid = media.get("pixel_values"), media.get("image_grid_thw")
    if pixels is None:
        vision = vlm.config.vision_config
        merge = vision.spatial_merge_size
        width = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        grid = torch.tensor([[1, merge, merge]], device=embeds.device)
        pixels = torch.zeros(merge * merge, width, device=embeds.device, dtype=embeds.dtype)
        return embeds + 0.0 * _features(vlm, pixels, grid).sum().to(embeds.dtype)
    features = _features(vlm, pixels, grid).to(embeds.dtype)
    mask = (input_ids == vlm.config.image_token_id)[:, None].expand_as(embeds)
    return embeds.masked_scatter(mask, features)


def mrope_positions(vlm, input_ids: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: torch.Tensor,
                    grid: torch.Tensor | None) -> torch.Tensor:
    """`[3, T]` mRoPE positions: a sequence without images keeps its positions on all three rows; one with images
    gets transformers' `get_rope_index` of it alone, with its images' grid rows."""
    if grid is None:
        return position_ids.expand(3, -1)
    image = input_ids == vlm.config.image_token_id
    per_image = _tokens_per_image(vlm, grid).tolist()
    wants_types = "mm_token_type_ids" in inspect.signature(vlm.get_rope_index).parameters
    out, k = position_ids.expand(3, -1).clone(), 0
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        n = int(image[s:e].sum())
        if not n:
            continue
        first, count = k, 0
        while count < n and k < len(per_image):
            count, k = count + per_image[k], k + 1
        if count != n:
            raise ValueError(f"the sequence at tokens [{s}, {e}) holds {n} image tokens, which do not end at an "
                             f"image's last ({per_image} tokens per image): a cut through an image")
        kwargs = dict(input_ids=input_ids[None, s:e], image_grid_thw=grid[first:k])
        if wants_types:  # transformers 5.2x: token types (0 text, 1 image) instead of vision-start tokens
            kwargs["mm_token_type_ids"] = image[None, s:e].int()
        out[:, s:e] = vlm.get_rope_index(**kwargs)[0][:, 0].to(out)
    return out


__all__ = ["MEDIA", "check_images", "merge_images", "mrope_positions"]
