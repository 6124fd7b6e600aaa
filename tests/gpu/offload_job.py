"""One GPU, one process: train the Llama-3.2-1B shape a few steps with FSDP2, with or without CPU offload.

    torchrun --nproc-per-node 1 tests/gpu/offload_job.py OUT.json [--cpu-offload]

Prints and writes the per-step losses and the peak GPU memory.
"""

import json
import sys

import torch
import torch.distributed as dist

import dtllama
from dtllama.ops import cu_seqlens_from_lengths, shift_labels
from dtllama.parallel import FSDPOptions, ParallelDims, parallelize


def main(out: str, offload: bool) -> None:
    torch.cuda.set_device(0)
    dist.init_process_group("cuda:nccl,cpu:gloo")
    config = dtllama.flavors["llama3.2-1b"]
    dims = ParallelDims().resolve(1, config)
    dims.build_mesh("cuda")
    with torch.device("meta"):
        model = dtllama.LlamaForCausalLM(config)
    parallelize(model, dims, fsdp=FSDPOptions(param_dtype=torch.bfloat16, cpu_offload=offload))
    # Offloaded shards live in host memory: materialize and initialize them there (torchtitan does the same).
    model.to_empty(device="cpu" if offload else "cuda")
    model.init_weights(0)
    model.model.rotary_emb.to("cuda")  # buffers are not FSDP's to move: RoPE's frequencies go to the GPU
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, fused=not offload)
    g = torch.Generator(device="cuda").manual_seed(0)
    lengths = [1024, 700, 324]
    losses = []
    for _ in range(3):
        ids = torch.randint(0, config.vocab_size, (sum(lengths),), device="cuda", generator=g)
        cu = cu_seqlens_from_lengths(lengths, device="cuda")
        labels = shift_labels(ids, cu)
        loss = -model(ids, cu_seqlens=cu, labels=labels).logprobs.sum() / (labels != -100).sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    row = {"cpu_offload": offload, "losses": losses, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    print(json.dumps(row))
    with open(out, "w") as f:
        json.dump(row, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], "--cpu-offload" in sys.argv[2:])
