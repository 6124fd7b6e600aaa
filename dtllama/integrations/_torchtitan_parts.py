"""What `dtllama.integrations.torchtitan` plugs into torchtitan's extension points: the model, the parallelize
function, the loss and the state-dict adapter. A module of its own because its torchtitan bases import
`torchtitan.distributed.utils`, which copies torchtitan's device choice when imported: kept out of the entry
module, importing that module leaves the choice to `apply_shims()`. Import it through
`dtllama.integrations.torchtitan`, which re-exports these names on first use."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torchtitan.tools.utils as _titan_utils
from torch.distributed.fsdp import FSDPModule
from torchtitan.components.loss import BaseLoss
from torchtitan.config import TORCH_DTYPE_MAP, ParallelismConfig, TrainingConfig
from torchtitan.distributed.activation_checkpoint import FullAC, SelectiveAC
from torchtitan.distributed.fsdp import disable_fsdp_gradient_division
from torchtitan.protocols.model import BaseModel
from torchtitan.protocols.state_dict_adapter import StateDictAdapter

from dtllama.models.config import ModelConfig
from dtllama.models.flavors import flavors
from dtllama.models.llama import LlamaForCausalLM
from dtllama.ops import CrossEntropy, linear_cross_entropy
from dtllama.parallel import CompileOptions, FSDPOptions, ParallelDims, parallelize


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
        hidden = self.hidden_states(input_ids.flatten(), positions.flatten(), cu_seqlens)
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
    """Summed token cross-entropy of `HiddenStates` by `dtllama.ops.linear_cross_entropy` (token chunks, gradients
    made in forward, never `[T, vocab]` logits; vocab-parallel under TP), over torchtitan's global count of valid
    tokens."""

    @dataclass(kw_only=True, slots=True)
    class Config(BaseLoss.Config):
        chunk_size: int | None = None
        """Tokens per chunk of logits (None: a buffer the size of the hidden states)."""

    def __init__(self, config: Config, *, compile_config=None):
        self.chunk_size = config.chunk_size

    def __call__(self, pred: HiddenStates, labels: torch.Tensor, global_valid_tokens: torch.Tensor | None = None,
                 **kwargs: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # The labels are the inputs' token stream shifted by one, so the model's batch check has validated them.
        normalizer = 1.0 if global_valid_tokens is None else global_valid_tokens
        loss = linear_cross_entropy(pred.hidden, pred.weight, labels.flatten(), CrossEntropy(normalizer=normalizer),
                                    self.chunk_size, check=False)
        return loss, {}


class DtllamaStateDictAdapter(StateDictAdapter):
    """Hugging Face names are dtllama's names: both directions are the identity (a new dict, same tensors)."""

    def to_hf(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        return dict(state_dict)

    def from_hf(self, hf_state_dict: dict[str, Any]) -> dict[str, Any]:
        return dict(hf_state_dict)
