"""dtllama models in torchtitan's trainer (torchtitan 0.3.0): its loop, data, optimizer, metrics and checkpoints;
dtllama's model, `parallelize`, fused loss and Hugging Face names.

    torchrun --nproc-per-node 2 -m dtllama.integrations.torchtitan --config dtllama_debug \\
        --hf_assets_path <HF tokenizer folder> --dataloader.dataset_path <folder of {"text": ...} JSON lines>

This module is a torchtitan config registry (`--module dtllama.integrations.torchtitan` for `torchtitan.train`,
implied when it is launched itself). What it plugs into torchtitan's extension points:

- `DtllamaForTitan`: `LlamaForCausalLM` as a torchtitan `BaseModel` (its `Config` builds it on the meta device).
  Its forward packs torchtitan's `[B, S]` batch (a sequence restarts wherever `positions` is 0, so attention
  stays within documents) and returns the final hidden states, never `[T, vocab]` logits.
- `parallelize_dtllama`: torchtitan's layout handed to `dtllama.parallel.parallelize` (FSDP2/HSDP, TP/SP,
  activation checkpointing, per-block compile), with torchtitan's gradient-sum convention.
- `DtllamaLoss`: the summed token cross-entropy from dtllama's chunked log-probs op over those hidden states,
  divided by the global token count as torchtitan's losses are.
- `DtllamaStateDictAdapter`: the identity, since dtllama's parameter names are Hugging Face's.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
from torch.distributed.fsdp import FSDPModule

_INSTALL = "run `pip install 'dtllama[titan]'`"
try:
    import torchtitan
    import torchtitan.tools.utils as _titan_utils
except ImportError as e:  # exercised only without the extra
    raise ImportError(f"dtllama.integrations.torchtitan needs torchtitan>=0.3.0; {_INSTALL}") from e
# torchtitan 0.2 registered models by `TrainSpec` (job-config callables), not by config registry: not supported.
_version = tuple(int(p) for p in torchtitan.__version__.split("+")[0].split(".")[:2])
if _version < (0, 3) and _version != (0, 0):  # 0.0: a source checkout, which is newer
    raise ImportError(f"dtllama.integrations.torchtitan needs torchtitan>=0.3.0 (its config registry), found "
                      f"{torchtitan.__version__}; {_INSTALL}")


class _HostDevice:
    """`torch.cpu` plus the memory queries torchtitan's metrics make of an accelerator (no device memory: zeros)."""

    def __getattr__(self, name):
        return getattr(torch.cpu, name)

    def current_device(self) -> int:
        return 0  # an index, as for accelerators (`barrier(device_ids=[...])`); torch.cpu says "cpu"

    def get_device_name(self, device=None) -> str:
        return "cpu"

    def get_device_properties(self, device=None):
        return SimpleNamespace(name="cpu", total_memory=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))

    def memory_stats(self, device=None) -> dict:
        return {}

    def reset_peak_memory_stats(self, device=None) -> None:
        return None

    def empty_cache(self) -> None:
        return None


def _use_host_device_without_accelerator() -> None:
    """torchtitan 0.3.0 takes CUDA as its device when torch sees no accelerator, and its modules copy that choice
    into their own globals when imported (`from torchtitan.tools.utils import device_type`). It has no option for
    the host, so on a machine without an accelerator this points `torchtitan.tools.utils` at the CPU (gloo)
    before the rest of torchtitan is imported: the only way in, hence a patch. On an accelerator it does nothing."""
    if _titan_utils.device_type != "cuda" or torch.cuda.is_available() or _titan_utils.device_module is not torch.cuda:
        return
    if "torchtitan.distributed.utils" in sys.modules:
        raise RuntimeError(
            "torchtitan was imported before dtllama.integrations.torchtitan on a host without an accelerator, so it "
            "bound CUDA as its device; launch `torchrun ... -m dtllama.integrations.torchtitan --config ...` instead "
            "of `-m torchtitan.train`"
        )
    _titan_utils.device_type, _titan_utils.device_module = "cpu", _HostDevice()


_use_host_device_without_accelerator()


def _provide_set_timeout() -> None:
    """torchtitan 0.3.0 tightens the process groups' timeouts after the first step with
    `torch.distributed.set_timeout`, the public name later torch releases give to torch 2.13's
    `distributed_c10d._set_pg_timeout`; without it every run stops after step 1. This adds the name where torch
    lacks it (nothing else in torch changes): a patch, as torchtitan has no option that skips the call."""
    import torch.distributed as dist

    if not hasattr(dist, "set_timeout"):
        from torch.distributed.distributed_c10d import _set_pg_timeout

        dist.set_timeout = _set_pg_timeout


_provide_set_timeout()

from torchtitan.components.checkpoint import CheckpointManager  # noqa: E402 - after the two patches above
from torchtitan.components.loss import BaseLoss  # noqa: E402
from torchtitan.components.metrics import MetricsProcessor  # noqa: E402
from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw  # noqa: E402
from torchtitan.config import TORCH_DTYPE_MAP, ParallelismConfig, TrainingConfig  # noqa: E402
from torchtitan.distributed.activation_checkpoint import FullAC, SelectiveAC  # noqa: E402
from torchtitan.distributed.fsdp import disable_fsdp_gradient_division  # noqa: E402
from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataLoader  # noqa: E402
from torchtitan.protocols.model import BaseModel  # noqa: E402
from torchtitan.protocols.model_spec import ModelSpec  # noqa: E402
from torchtitan.protocols.state_dict_adapter import StateDictAdapter  # noqa: E402
from torchtitan.trainer import Trainer  # noqa: E402

from dtllama import flavors  # noqa: E402
from dtllama.models.config import ModelConfig  # noqa: E402
from dtllama.models.llama import LlamaForCausalLM  # noqa: E402
from dtllama.ops import linear_logprobs_entropy  # noqa: E402
from dtllama.parallel import CompileOptions, FSDPOptions, ParallelDims, parallelize  # noqa: E402


@dataclass
class HiddenStates:
    """What the model hands the loss: packed final hidden states `[T, hidden]` and the output weight that the
    loss multiplies them with chunk by chunk. Not a pytree: FSDP's root keeps its parameters gathered after
    forward (`reshard_after_forward=False`), so the weight the loss reads is the whole one."""

    hidden: torch.Tensor
    weight: torch.Tensor


class DtllamaForTitan(LlamaForCausalLM, BaseModel):
    """`LlamaForCausalLM` (HF parameter names, no prefix) built from a torchtitan model config."""

    @dataclass(kw_only=True, slots=True)
    class Config(BaseModel.Config):
        flavor: str = "debug"
        """A `dtllama.flavors` name."""
        overrides: dict = field(default_factory=dict)
        """`ModelConfig` fields to change, e.g. {"num_hidden_layers": 4}."""
        tokenizer_vocab: bool = False
        """Take `vocab_size` from the tokenizer in `hf_assets_path` (a random-init flavor on a real tokenizer)."""
        seed: int = 0

        def model_config(self) -> ModelConfig:
            return dataclasses.replace(flavors[self.flavor], **self.overrides)

        def update_from_config(self, *, config, **kwargs) -> None:
            """Fit the model to the trainer config: the tokenizer's vocabulary if asked, and a sequence length the
            positions cover."""
            if self.tokenizer_vocab:
                from tokenizers import Tokenizer

                path = os.path.join(config.hf_assets_path, "tokenizer.json")
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"tokenizer_vocab=True but {path} does not exist; set --hf_assets_path "
                                            "to a Hugging Face folder with tokenizer.json")
                self.overrides = {**self.overrides, "vocab_size": Tokenizer.from_file(path).get_vocab_size()}
            limit = self.model_config().max_position_embeddings
            if config.training.seq_len > limit:
                raise ValueError(f"--training.seq_len {config.training.seq_len} exceeds the model's "
                                 f"max_position_embeddings={limit}; use a seq_len <= {limit}")

        def get_nparams_and_flops(self, model, seq_len: int) -> tuple[int, int]:
            """Parameters and training FLOPs per token, torchtitan's formula: 6 per non-embedding parameter plus
            the attention scores (12 * layers * heads * head_dim * seq_len)."""
            c = model.config
            nparams = c.num_params()
            attention = 12 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * seq_len
            return nparams, 6 * (nparams - c.vocab_size * c.hidden_size) + attention

    def __init__(self, config: Config):
        super().__init__(config.model_config())
        self.seed = config.seed

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> HiddenStates:
        """torchtitan's `[B, S]` batch, packed: each row, and within it each document (`positions` back at 0),
        is its own sequence. `input_ids` keeps dtllama's name so `parallelize`'s batch check validates it."""
        b, s = input_ids.shape
        if positions is None:
            positions = torch.arange(s, device=input_ids.device).expand(b, s)
        starts = (positions == 0).clone()
        starts[:, 0] = True
        starts = starts.flatten().nonzero().flatten()
        total = torch.tensor([b * s], device=input_ids.device)
        cu_seqlens = torch.cat([starts, total]).to(torch.int32)
        hidden, _ = self._decode(input_ids.flatten(), positions.flatten(), cu_seqlens, None, None, None)
        # The weight as the activations' dtype: under dtllama's casts at use (no data parallelism) it is fp32.
        return HiddenStates(hidden, self.output_weight.to(hidden.dtype))

    def init_weights(self, seed: int | None = None, names: set[str] | None = None, buffer_device=None) -> None:
        """torchtitan calls `init_weights(buffer_device=...)`; dtllama's init (per-parameter seeded, independent
        of the sharding) recomputes its buffers where they already are."""
        super().init_weights(self.seed if seed is None else seed, names)

    def verify_module_protocol(self) -> None:
        """dtllama's submodules are plain torch modules: torchtitan's `Module` protocol serves its own sharding
        configs, and here dtllama's `parallelize` applies every parallelism instead."""
        return None


def parallelize_dtllama(model: DtllamaForTitan, *, parallel_dims, training: TrainingConfig,
                        parallelism: ParallelismConfig, compile_config, ac_config, **kwargs) -> DtllamaForTitan:
    """torchtitan's layout applied by `dtllama.parallel.parallelize`. torchtitan divides the summed loss by the
    global token count itself, so FSDP sums gradients instead of averaging them (as torchtitan's own FSDP does)."""
    if parallel_dims.pp > 1 or parallel_dims.cp > 1:
        raise ValueError(
            f"pipeline_parallel_degree={parallel_dims.pp}, context_parallel_degree={parallel_dims.cp}: torchtitan "
            "splits those batches its own way; set both to 1 here, or use dtllama's recipe (recipes/train.py --pp/--cp)"
        )
    if parallelism.spmd_backend != "partial_dtensor":
        raise ValueError(f"parallelism.spmd_backend={parallelism.spmd_backend!r}: dtllama's plans are DTensor "
                         "plans; use --parallelism.spmd_backend partial_dtensor")
    dims = ParallelDims(dp_replicate=parallel_dims.dp_replicate, dp_shard=-1, tp=parallel_dims.tp,
                        ep=parallel_dims.ep).resolve(parallel_dims.world_size, model.config)
    dims.build_mesh(_titan_utils.device_type)
    param, reduce = (TORCH_DTYPE_MAP[training.mixed_precision_param], TORCH_DTYPE_MAP[training.mixed_precision_reduce])
    fsdp = FSDPOptions(param_dtype=None if param == TORCH_DTYPE_MAP[training.dtype] else param, reduce_dtype=reduce)
    compiled = compile_config.enable and "model" in compile_config.components
    parallelize(model, dims, ac=_ac_mode(ac_config), fsdp=fsdp,
                compile=CompileOptions(compile_config.backend) if compiled else False)
    disable_fsdp_gradient_division(model)
    if dims.mesh("world").device_type == "cpu":  # gloo has no PREMUL_SUM, which a divide factor of 1 would use
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_force_sum_reduction_for_comms(True)
    return model


def _ac_mode(ac_config) -> str:
    """torchtitan's activation-checkpointing config as dtllama's mode name."""
    if isinstance(ac_config, FullAC.Config):
        return "full"
    if isinstance(ac_config, SelectiveAC.Config):
        return "selective"
    if ac_config is None or type(ac_config).__name__ == "NoAC":
        return "none"
    raise ValueError(f"activation_checkpoint={type(ac_config).__qualname__} is not one dtllama applies; use "
                     "FullAC, SelectiveAC or none")


class DtllamaLoss(BaseLoss):
    """Summed token cross-entropy of `HiddenStates` by `dtllama.ops.linear_logprobs_entropy` (token chunks,
    never `[T, vocab]` logits; vocab-parallel under TP), over torchtitan's global count of valid tokens."""

    @dataclass(kw_only=True, slots=True)
    class Config(BaseLoss.Config):
        chunk_size: int = 1024
        """Tokens per chunk of logits."""

    def __init__(self, config: Config, *, compile_config=None):
        self.chunk_size = config.chunk_size

    def __call__(self, pred: HiddenStates, labels: torch.Tensor, global_valid_tokens: torch.Tensor | None = None,
                 **kwargs: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # The labels are the inputs' token stream shifted by one, so the model's batch check has validated them.
        logprobs, _ = linear_logprobs_entropy(pred.hidden, pred.weight, labels.flatten(), 1.0, self.chunk_size,
                                              check=False)
        loss = -logprobs.sum()
        return (loss if global_valid_tokens is None else loss / global_valid_tokens), {}


class DtllamaStateDictAdapter(StateDictAdapter):
    """Hugging Face names are dtllama's names: both directions are the identity (a new dict, same tensors)."""

    def to_hf(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        return dict(state_dict)

    def from_hf(self, hf_state_dict: dict[str, Any]) -> dict[str, Any]:
        return dict(hf_state_dict)


def model_registry(flavor: str, **config: Any) -> ModelSpec:
    """torchtitan's model spec of a dtllama flavor (`config`: fields of `DtllamaForTitan.Config`)."""
    return ModelSpec(name="dtllama", flavor=flavor, model=DtllamaForTitan.Config(flavor=flavor, **config),
                     parallelize_fn=parallelize_dtllama, pipelining_fn=None, post_optimizer_build_fn=None,
                     state_dict_adapter=DtllamaStateDictAdapter)


def dtllama_debug() -> Trainer.Config:
    """The `debug` flavor on the tokenizer of `--hf_assets_path` and JSON-lines text in
    `--dataloader.dataset_path` (read as torchtitan's `c4_test`: {"text": ...} rows), FSDP over all ranks."""
    return Trainer.Config(
        model_spec=model_registry("debug", tokenizer_vocab=True),
        loss=DtllamaLoss.Config(),
        optimizer=default_adamw(lr=3e-3),
        lr_scheduler=LRSchedulersContainer.Config(warmup_steps=2, decay_ratio=0.8, decay_type="linear"),
        training=TrainingConfig(local_batch_size=4, seq_len=256, steps=10, mixed_precision_param="float32",
                                disable_cuda_graphs=True),
        dataloader=HuggingFaceTextDataLoader.Config(dataset="c4_test"),
        metrics=MetricsProcessor.Config(log_freq=1, disable_color_printing=True),
        parallelism=ParallelismConfig(spmd_backend="partial_dtensor"),
        activation_checkpoint=SelectiveAC.Config(),
    )


def dtllama_smollm2_135m() -> Trainer.Config:
    """SmolLM2-135M fine-tuned from the HF folder `--hf_assets_path` (its weights read by DCP's HF reader through
    the identity adapter, each rank its own shards), on `--dataloader.dataset_path`."""
    config = dtllama_debug()
    config.model_spec = model_registry("smollm2-135m")
    config.optimizer = default_adamw(lr=2e-5)
    config.checkpoint = CheckpointManager.Config(enable=True, initial_load_in_hf=True, interval=10**9)
    return config


def main(argv: list[str] | None = None) -> None:
    """`torchtitan.train` with this module as the config registry (on a host without an accelerator, importing
    this module first is what lets torchtitan run on the CPU)."""
    from torchtitan import train

    args = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--module" or a.startswith("--module=") for a in args):
        args = ["--module", "dtllama.integrations.torchtitan", *args]
    sys.argv = [sys.argv[0], *args]
    train.main()


if __name__ == "__main__":
    main()
