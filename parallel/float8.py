"""float8 training through torchao (an optional extra: `pip install 'dtllama[fp8]'`).

Every linear of the decoder layers but the routers (and so not the embedding, the output head or a value head,
which live outside the layers) is swapped for torchao's `Float8Linear`: its matmuls run in float8 with dynamic
scales, tensor-wise or row-wise; names, init and checkpoints stay the model's (the swap keeps `weight`). Applied
first in `parallelize`, on the meta-device model, as torchtitan's converters are: with tensor-wise scales FSDP2 then
all-gathers the weights in float8 (their scale from the whole weight's amax, one all-reduce for all of them after
each optimizer step: `precompute_scales`); TP shards them with its usual styles, its activations communicated in the
compute dtype (torchao's float8 TP styles, which all-gather in float8, are not used: gloo has no float8 collectives
to test them on). The router's logits and the head's log-probs stay in the activations' dtype: they decide routing
and are the loss.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from dtllama.models import protocol as P

from .options import Float8Options

RECIPES = ("tensorwise", "rowwise")


def _torchao():
    try:
        import torchao.float8 as f8
    except ImportError as e:
        raise ImportError("float8 training needs torchao: pip install 'dtllama[fp8]' (torchao>=0.16)") from e
    return f8


def check_float8(options: Float8Options, device_type: str) -> None:
    """Refuse, before anything is built, a recipe torchao does not have or a GPU without float8 matmuls."""
    if options.recipe not in RECIPES:
        raise ValueError(f"float8 recipe {options.recipe!r}: choose one of {list(RECIPES)}")
    if options.float8_all_gather and options.recipe != "tensorwise":
        raise ValueError(f"fsdp_all_gather=True needs tensor-wise scales; the {options.recipe} recipe all-gathers "
                         "weights in the parameter dtype: set fsdp_all_gather=False")
    if device_type == "cuda":
        cap = torch.cuda.get_device_capability()
        if cap < (8, 9):
            raise ValueError(f"float8 training needs float8 matmuls (compute capability 8.9+: Ada, Hopper, "
                             f"Blackwell); this GPU ({torch.cuda.get_device_name()}) is sm_{cap[0]}{cap[1]}: "
                             "drop float8")
    _torchao()


def _expert_count(config) -> int | None:
    return next((getattr(config, f) for f in ("num_local_experts", "num_experts", "n_routed_experts")
                 if getattr(config, f, None)), None)


def float8_linears(model: nn.Module) -> list[str]:
    """The module names that compute in float8: each decoder layer's `nn.Linear`s but its routers (the layer plan's
    `Router` style, or a linear to one logit per expert: a transformers MoE's gate), both dimensions multiples of 16
    (what float8 matmuls take)."""
    names, experts = [], _expert_count(model.config)
    for key, layer in model.model.layers.items():
        routers = {path for path, style in model.layer_plan(layer).tp.items() if isinstance(style, P.Router)}
        for path, module in layer.named_modules():
            if (isinstance(module, nn.Linear) and path not in routers and module.out_features != experts
                    and module.in_features % 16 == 0 and module.out_features % 16 == 0):
                names.append(f"model.layers.{key}.{path}")
    return names


def apply_float8(model: nn.Module, options: Float8Options, device_type: str) -> nn.Module:
    """Swap the decoder layers' linears (`float8_linears`) for torchao's `Float8Linear`, in place; returns `model`."""
    check_float8(options, device_type)
    f8 = _torchao()
    names = set(float8_linears(model))
    if not names:
        raise ValueError(f"no decoder linear of this {model.config.model_type} model has both dimensions a multiple "
                         "of 16, which float8 matmuls need: drop float8")
    # Packed batches have any number of tokens T, the inner dim of the weight-gradient matmul, which float8 GPU
    # matmuls take in multiples of 16 only: torchao pads it there (a copy only when T is not one).
    config = dataclasses.replace(f8.Float8LinearConfig.from_recipe_name(options.recipe), pad_inner_dim=True)
    if options.recipe == "tensorwise":
        config = dataclasses.replace(config, enable_fsdp_float8_all_gather=options.float8_all_gather)
    f8.convert_to_float8_training(model, config=config, module_filter_fn=lambda module, fqn: fqn in names)
    for name in names:  # read back by `after_optimizer_step`, on the whole model or a pipeline rank's part of it
        model.get_submodule(name).precompute_scales = options.float8_all_gather and options.precompute_scales
    return model


def after_optimizer_step(model: nn.Module) -> None:
    """With float8 all-gathers: every float8 weight's scale for the next step, in one all-reduce of their amaxes
    (torchao's `precompute_float8_dynamic_scale_for_fsdp`); a no-op for any other model."""
    if any(getattr(m, "precompute_scales", False) for m in model.modules()):  # the model, or a pipeline rank's part
        _torchao().precompute_float8_dynamic_scale_for_fsdp(model)


__all__ = ["RECIPES", "after_optimizer_step", "apply_float8", "check_float8", "float8_linears"]
