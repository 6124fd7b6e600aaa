"""A tiny Qwen2.5-VL (transformers' own config classes) and packed batches of text and images, for the adapter's
VL tests: what each rank of a pool runs, and the single-device reference."""

from __future__ import annotations

import torch
import torch.distributed as dist

from dtllama.ops import IGNORE_INDEX, cu_seqlens_from_lengths, pad_to_multiple

IMAGE, VIDEO, START, END = 100, 101, 102, 103  # special token ids, above the random text ids
TEXT = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]})
# Patches of 2x2 pixels over 2 frames, merged 2x2 into one token; a window of 2x2 tokens, block 1 attending fully.
VISION = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=32, patch_size=2,
              spatial_merge_size=2, temporal_patch_size=2, window_size=8, fullatt_block_indexes=[1], in_channels=3)
PIXEL_WIDTH = 3 * 2 * 2 * 2  # channels x temporal patch x patch x patch
CONFIG = dict(model_type="qwen2_5_vl", text_config=TEXT, vision_config=VISION, image_token_id=IMAGE,
              video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END, tie_word_embeddings=False)


def hf_vl_config(**overrides):
    import transformers

    d = {k: v for k, v in CONFIG.items() if k != "model_type"}
    return transformers.Qwen2_5_VLConfig(**{**d, **overrides})


def sample(g: torch.Generator, n_before: int, n_after: int, grid: tuple[int, int, int] | None, kind: str | None):
    """One sequence: text, then (an `image` or `video` of `grid`) its start token, its t*h*w/4 tokens and end token,
    then text; returns (ids, the item's pixels or None, its grid row or None, kind)."""
    text = lambda n: torch.randint(3, 99, (n,), generator=g)  # noqa: E731
    if grid is None:
        return torch.cat([text(n_before), text(n_after)]), None, None, None
    t, h, w = grid
    tokens = torch.full((t * h * w // 4,), IMAGE if kind == "image" else VIDEO)
    ids = torch.cat([text(n_before), torch.tensor([START]), tokens, torch.tensor([END]), text(n_after)])
    return ids, torch.randn(t * h * w, PIXEL_WIDTH, generator=g), torch.tensor([grid]), kind


# A 4x4-patch image (4 tokens), a text-only sequence, a 2x4-patch image (2 tokens) late in its sequence, text, and a
# video of 2 temporal patches of 4x4 (8 tokens).
SEQUENCES = [(3, 5, (1, 4, 4), "image"), (6, 3, None, None), (9, 2, (1, 2, 4), "image"), (4, 1, None, None),
             (2, 3, (2, 4, 4), "video")]
SECONDS_PER_GRID = 0.5  # the video's seconds per temporal patch (spaces its temporal positions)


def random_batch(seed: int):
    """The sequences of `SEQUENCES` with fresh tokens and pixels, and their next-token labels (a fifth ignored)."""
    g = torch.Generator().manual_seed(seed)
    seqs = [sample(g, *s) for s in SEQUENCES]
    labels = []
    for ids, *_ in seqs:
        lab = torch.cat([ids[1:], torch.tensor([IGNORE_INDEX])])
        lab[torch.rand(len(ids), generator=g) < 0.2] = IGNORE_INDEX
        labels.append(lab)
    return seqs, labels


def images(seqs) -> dict:
    """The forward's visual arguments for the sequences' images and videos, in order (none: empty)."""
    out = {}
    for kind, pixels, grid in (("image", "pixel_values", "image_grid_thw"),
                               ("video", "pixel_values_videos", "video_grid_thw")):
        items = [(p, g) for _, p, g, k in seqs if k == kind]
        if items:
            out[pixels], out[grid] = torch.cat([p for p, _ in items]), torch.cat([g for _, g in items])
    if "video_grid_thw" in out:
        out["second_per_grid_ts"] = torch.full((out["video_grid_thw"].shape[0],), SECONDS_PER_GRID)
    return out


def token_types(ids: torch.Tensor) -> torch.Tensor:
    """transformers' `mm_token_type_ids`: 0 text, 1 image, 2 video."""
    return (ids == IMAGE).int() + 2 * (ids == VIDEO).int()


def objective(model, seqs, labels_list, n_global: int, dp: int, multiple: int = 1, cp_mesh=None):
    """Packed forward of `seqs` with their images: (loss scaled for FSDP's mean over dp, outputs of all tokens)."""
    from parallel_cases import ENTROPY_WEIGHT, cp_gather

    ids, labels = torch.cat([s[0] for s in seqs]), torch.cat(labels_list)
    p = pad_to_multiple(ids, cu_seqlens_from_lengths([len(s[0]) for s in seqs]), multiple, labels)
    out = model(p.input_ids, p.position_ids, p.cu_seqlens, p.max_seqlen, labels=p.labels, **images(seqs))
    loss = -(out.logprobs.sum() + ENTROPY_WEIGHT * out.entropy.sum())
    T = ids.numel()
    outs = {"logprobs": cp_gather(out.logprobs, cp_mesh)[:T], "entropy": cp_gather(out.entropy, cp_mesh)[:T]}
    return loss / n_global * dp, outs


def run_rank(layout: dict, seqs, labels_list, seed: int):
    """On every rank: the VL model on `layout`, this rank's sequences (and their images), one AdamW step."""
    from parallel_cases import _DIMS, model_config, step

    from dtllama.models.hf import HFCausalLM
    from dtllama.parallel import ParallelDims, parallelize

    config = model_config(dict(CONFIG, family="hf"))
    key = tuple(sorted(layout.items()))
    if key not in _DIMS:  # process groups are created once per layout and reused (as parallel_cases does)
        _DIMS[key] = ParallelDims(**layout).resolve(dist.get_world_size(), config)
        _DIMS[key].build_mesh("cpu")
    dims = _DIMS[key]
    with torch.device("meta"):
        model = HFCausalLM(config)
    parallelize(model, dims)
    model.to_empty(device="cpu")
    model.init_weights(seed)
    batch_rank, n_batch = dims.mesh("batch").get_local_rank(), dims.mesh("batch").size()
    mine = list(range(batch_rank, len(seqs), n_batch))
    n_global = sum(int((lab != IGNORE_INDEX).sum()) for lab in labels_list)
    loss, outs = objective(model, [seqs[i] for i in mine], [labels_list[i] for i in mine], n_global,
                           dims.mesh("dp").size(), dims.token_multiple, dims.mesh("cp") if dims.cp_enabled else None)
    grads, params, norm = step(model, loss)
    return {"indices": mine, "outs": outs, "grads": grads, "params": params, "norm": norm}


def reference(seqs, labels_list, seed: int):
    """The single-device model's outputs, gradients, parameters after AdamW and gradient norm."""
    from parallel_cases import model_config, step

    from dtllama.models.hf import HFCausalLM

    model = HFCausalLM(model_config(dict(CONFIG, family="hf")))
    model.init_weights(seed)
    n_global = sum(int((lab != IGNORE_INDEX).sum()) for lab in labels_list)
    loss, outs = objective(model, seqs, labels_list, n_global, 1)
    grads, params, norm = step(model, loss)
    return outs, grads, params, norm
