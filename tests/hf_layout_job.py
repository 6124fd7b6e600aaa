"""torchrun job: load an HF folder into a parallel layout, export it, and compare (used by a test)."""

import json
import sys

import torch
import torch.distributed as dist

import dtllama
from dtllama.models.hf_io import load_state_into
from dtllama.parallel import ParallelDims, parallelize


def main(src: str, dst: str, layout: str) -> None:
    dist.init_process_group("gloo")
    config = dtllama.ModelConfig.from_hf(src)
    dims = ParallelDims(**json.loads(layout)).resolve(dist.get_world_size(), config)
    dims.build_mesh("cpu")
    with torch.device("meta"):
        model = dtllama.LlamaForCausalLM(config)
    parallelize(model, dims)
    model.to_empty(device="cpu")
    load_state_into(model, src)  # each rank reads only its slices
    model.save_pretrained(dst, dtype=torch.float32, source=src, max_shard_bytes=200_000_000)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
