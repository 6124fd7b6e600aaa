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

Importing this module changes nothing in torch or torchtitan. `apply_shims()` does what this torch and torchtitan
need (see its docstring); `main` (the `-m` entry point) and every config function call it first. The four names
above and `HiddenStates` live in `_torchtitan_parts` and load on first use, so after the shims where a caller
applies them.
"""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch

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

if TYPE_CHECKING:
    from torchtitan.protocols.model_spec import ModelSpec
    from torchtitan.trainer import Trainer

# torchtitan 0.3.0 modules that copy `torchtitan.tools.utils.device_type` / `device_module` into their own globals
# when imported (`from torchtitan.tools.utils import device_type`): the host-device shim must precede them.
_DEVICE_COPIERS = ("torchtitan.distributed.utils", "torchtitan.distributed.parallel_dims",
                   "torchtitan.components.metrics", "torchtitan.models.common.token_dispatcher")
# The torchtitan-facing classes, in `_torchtitan_parts`: their torchtitan bases import `_DEVICE_COPIERS`.
_PARTS = ("DtllamaForTitan", "DtllamaLoss", "DtllamaStateDictAdapter", "HiddenStates", "parallelize_dtllama")


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
    """Point torchtitan at the CPU (gloo) on a host without an accelerator; elsewhere, or once done, nothing.

    torchtitan 0.3.0 takes CUDA when torch sees no accelerator (`get_device_info`: `... or "cuda"`) and offers no
    option, environment variable or hook for the host; torch has no public way to name the CPU as the accelerator.
    So this sets the two attributes of `torchtitan.tools.utils` that everything reads, before `_DEVICE_COPIERS`
    copy them; once one has, it is too late, and this raises instead of training half on CUDA."""
    if _titan_utils.device_type != "cuda" or torch.cuda.is_available() or _titan_utils.device_module is not torch.cuda:
        return
    bound = [m for m in _DEVICE_COPIERS if m in sys.modules]
    if bound:
        raise RuntimeError(
            f"torchtitan's {bound[0]} was imported before dtllama.integrations.torchtitan.apply_shims() on a host "
            "without an accelerator, so it bound CUDA as its device; launch `torchrun ... -m "
            "dtllama.integrations.torchtitan --config ...` (not `-m torchtitan.train`), or call apply_shims() "
            "before importing torchtitan's trainer"
        )
    _titan_utils.device_type, _titan_utils.device_module = "cpu", _HostDevice()


def _provide_set_timeout() -> None:
    """Give torch 2.13 the `torch.distributed.set_timeout` that torchtitan 0.3.0 calls; where torch has it, nothing.

    torchtitan tightens the process groups' timeouts after the first step (`set_pg_timeouts`, no option skips it)
    with `torch.distributed.set_timeout`, the public name pytorch#187387 gives to torch 2.13's private
    `distributed_c10d._set_pg_timeout` (torch nightlies after 2.13); without it every run stops after step 1.
    This adds that one name, bound to the same function, and changes nothing else in torch."""
    import torch.distributed as dist

    if not hasattr(dist, "set_timeout"):
        from torch.distributed.distributed_c10d import _set_pg_timeout

        dist.set_timeout = _set_pg_timeout


def apply_shims() -> None:
    """Make torchtitan 0.3.0 run dtllama on this torch and host; idempotent (a second call changes nothing).

    - host device (torchtitan 0.3.0, hosts without an accelerator): `_use_host_device_without_accelerator`;
      must run before torchtitan's trainer is imported.
    - `torch.distributed.set_timeout` (torch <= 2.13 lacks it): `_provide_set_timeout`; before step 1 ends.
    """
    _use_host_device_without_accelerator()
    _provide_set_timeout()


def __getattr__(name: str) -> Any:
    """`DtllamaForTitan`, `DtllamaLoss`, ... from `_torchtitan_parts`, imported on first use: importing them
    imports `_DEVICE_COPIERS`, which must wait for `apply_shims()` on a host without an accelerator."""
    if name in _PARTS:
        from dtllama.integrations import _torchtitan_parts

        return getattr(_torchtitan_parts, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def model_registry(flavor: str, **config: Any) -> ModelSpec:
    """torchtitan's model spec of a dtllama flavor (`config`: fields of `DtllamaForTitan.Config`)."""
    # The hook for the shims under `torchtitan.train --module dtllama.integrations.torchtitan`: importing this
    # module does nothing, and a config function (each one here starts by calling this) is the first of our code
    # that runs, while torchtitan parses the command line: before `Trainer.__init__` sets the device and before
    # step 1's `set_timeout`. The model's build and `parallelize_dtllama` come after the device is set.
    apply_shims()
    from torchtitan.protocols.model_spec import ModelSpec

    from dtllama.integrations._torchtitan_parts import DtllamaForTitan, DtllamaStateDictAdapter, parallelize_dtllama

    return ModelSpec(name="dtllama", flavor=flavor, model=DtllamaForTitan.Config(flavor=flavor, **config),
                     parallelize_fn=parallelize_dtllama, pipelining_fn=None, post_optimizer_build_fn=None,
                     state_dict_adapter=DtllamaStateDictAdapter)


def dtllama_debug() -> Trainer.Config:
    """The `debug` flavor on the tokenizer of `--hf_assets_path` and JSON-lines text in
    `--dataloader.dataset_path` (read as torchtitan's `c4_test`: {"text": ...} rows), FSDP over all ranks."""
    spec = model_registry("debug", tokenizer_vocab=True)  # first: it applies the shims the imports below need
    from torchtitan.components.metrics import MetricsProcessor
    from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw
    from torchtitan.config import ParallelismConfig, TrainingConfig
    from torchtitan.distributed.activation_checkpoint import SelectiveAC
    from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataLoader
    from torchtitan.trainer import Trainer

    from dtllama.integrations._torchtitan_parts import DtllamaLoss

    return Trainer.Config(
        model_spec=spec,
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
    config = dtllama_debug()  # first: it applies the shims the imports below need
    from torchtitan.components.checkpoint import CheckpointManager
    from torchtitan.components.optimizer import default_adamw

    config.model_spec = model_registry("smollm2-135m")
    config.optimizer = default_adamw(lr=2e-5)
    config.checkpoint = CheckpointManager.Config(enable=True, initial_load_in_hf=True, interval=10**9)
    return config


def main(argv: list[str] | None = None) -> None:
    """`torchtitan.train` with this module as the config registry, the shims applied before torchtitan's trainer
    is imported (on a host without an accelerator, that order is what lets torchtitan run on the CPU)."""
    apply_shims()
    from torchtitan import train

    args = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--module" or a.startswith("--module=") for a in args):
        args = ["--module", "dtllama.integrations.torchtitan", *args]
    sys.argv = [sys.argv[0], *args]
    train.main()


if __name__ == "__main__":
    main()
