"""Expert parallelism for mixture-of-experts layers (Llama 4): routed experts sharded over the `ep` mesh.

Each MoE layer's routed experts (`feed_forward.experts`: `gate_up_proj [E, H, 2I]`, `down_proj [E, I, H]`) become
DTensors `Shard(0)` over `ep`: rank j of an EP group holds experts `[j*E/ep, (j+1)*E/ep)`. The model routes its own
tokens and hands the experts module the routed rows sorted by expert with the count of each (the module boundary
`Llama4TextExperts.forward(x, counts)`); two hooks on that module do the rest, torchtitan's `ExpertParallel`:
- dispatch: the counts are exchanged (an all-to-all of `[E]` int64), then each rank sends the rows of rank j's
  experts (one contiguous block, since rows are sorted by expert) to rank j (an all-to-all of uneven splits),
  and reorders what it received from `(source rank, local expert)` to `(local expert, source rank)`;
- the experts run on this rank's local shards (loop or grouped GEMM, as on one device);
- combine: the reverse reorder and the reverse all-to-all return each row to the rank it came from, which
  scatter-adds it into its tokens as on one device.
Both all-to-alls are autograd functions whose backward is the reverse all-to-all (`all_to_all_v`, as Ulysses'
`all_to_all` beside it in `cp.py`); gloo runs them (alltoallv) as NCCL does.

The EP ranks are carved from `dp_shard x cp x tp` (`ParallelDims`): they all hold distinct tokens at the MoE
(TP's sequence parallel deals tokens over the TP ranks), so each expert's gradient is the sum over its EP group's
tokens. FSDP then shards the experts over the remaining ranks (`efsdp`), whose reduce-scatter adds the other
groups' tokens (`shard_experts`), divided by the data-parallel degree as every other gradient is.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import Shard, distribute_module, distribute_tensor

from .options import FSDPOptions


def all_to_all_v(x: torch.Tensor, out_splits: list[int], in_splits: list[int], ep_mesh: DeviceMesh) -> torch.Tensor:
    """Autograd all-to-all over dim 0 of `x` with uneven splits: rows `in_splits[j]` go to rank j, and the output
    holds `out_splits[i]` rows from rank i; its backward is the reverse all-to-all (splits swapped)."""
    out = funcol.all_to_all_single_autograd(x.contiguous(), out_splits, in_splits, ep_mesh)
    return funcol.wait_tensor(out)


def _group_by_expert(recv: torch.Tensor, total: int) -> torch.Tensor:
    """The row order that turns the `total` received rows, grouped `(source rank, local expert)` with `recv[s, l]`
    rows each, into `(local expert, source rank)` groups: every local expert's rows contiguous, sources in rank
    order. `total` (known on the host) spares the device a sync for each output size."""
    starts = (recv.flatten().cumsum(0) - recv.flatten()).view_as(recv)  # where block (s, l) begins
    sizes, starts = recv.t().flatten(), starts.t().flatten()  # blocks in (l, s) order
    first = torch.repeat_interleave(sizes.cumsum(0) - sizes, sizes, output_size=total)  # row's block start
    rows = torch.arange(total, device=recv.device)
    return torch.repeat_interleave(starts, sizes, output_size=total) + rows - first


class _Dispatch(NamedTuple):
    """What combine needs of the dispatch it undoes: the splits and the row order."""

    in_splits: list[int]
    out_splits: list[int]
    order: torch.Tensor


def dispatch(x: torch.Tensor, counts: torch.Tensor, ep_mesh: DeviceMesh
             ) -> tuple[torch.Tensor, torch.Tensor, _Dispatch]:
    """`x [N, H]` rows sorted by global expert with `counts [E]` -> `(rows of this rank's experts grouped by
    local expert, their counts [E/ep], the dispatch)`."""
    ep = ep_mesh.size()
    recv = funcol.wait_tensor(funcol.all_to_all_single(counts.contiguous(), None, None, ep_mesh)).view(ep, -1)
    # The one device-to-host copy of the layer (a sync on GPUs): both splits at once, for dispatch and combine.
    in_splits, out_splits = torch.stack([counts.view(ep, -1).sum(1), recv.sum(1)]).tolist()
    rows = all_to_all_v(x, out_splits, in_splits, ep_mesh)
    order = _group_by_expert(recv, sum(out_splits))
    return rows[order], recv.sum(0), _Dispatch(in_splits, out_splits, order)


def combine(y: torch.Tensor, d: _Dispatch, ep_mesh: DeviceMesh) -> torch.Tensor:
    """The experts' outputs `[rows, H]` (dispatch's order) back to the ranks and rows they came from: `[N, H]`."""
    back = y[torch.argsort(d.order)]
    return all_to_all_v(back, d.in_splits, d.out_splits, ep_mesh)


class ExpertParallel:
    """Shards one experts module over `ep_mesh` and runs it between dispatch and combine (forward hooks).

    One instance per module: forward keeps its dispatch for its combine (a stack, so a recompute under
    activation checkpointing pairs up as well)."""

    def __init__(self, ep_mesh: DeviceMesh):
        self.ep_mesh = ep_mesh
        self._pending: list[_Dispatch] = []

    def apply(self, experts: nn.Module) -> None:
        distribute_module(experts, self.ep_mesh, self._shard, self._dispatch, self._combine)

    @staticmethod
    def _shard(name: str, module: nn.Module, mesh: DeviceMesh) -> None:
        for pname, p in list(module.named_parameters(recurse=False)):
            module.register_parameter(pname, nn.Parameter(distribute_tensor(p, mesh, [Shard(0)])))

    def _dispatch(self, module, inputs, mesh):
        x, counts = inputs
        rows, local_counts, d = dispatch(x, counts, mesh)
        self._pending.append(d)
        return rows, local_counts

    def _combine(self, module, out, mesh):
        return combine(out, self._pending.pop(), mesh)


def routed_experts(model: nn.Module) -> list[nn.Module]:
    """The routed experts modules of the model's layers (the model protocol's `LayerPlan.experts`), in layer order."""
    return [layer.get_submodule(p) for layer in model.model.layers.values() if (p := model.layer_plan(layer).experts)]


def apply_ep(model: nn.Module, ep_mesh: DeviceMesh) -> nn.Module:
    """Shard every MoE layer's routed experts over the 1-D `ep_mesh`, in place. Call after TP, before AC, compile
    and FSDP (`parallelize` does), on a model whose layout `ParallelDims.check_model` accepted."""
    for module in routed_experts(model):
        experts = next(module.parameters()).shape[0]
        if experts % ep_mesh.size():
            raise ValueError(f"ep={ep_mesh.size()} does not divide num_local_experts={experts}; choose ep among "
                             "its divisors (ParallelDims.check_model names the valid degrees)")
        ExpertParallel(ep_mesh).apply(module)
    return model


_OUTSIDE_ROOT = object()


def _keep_root_quiet(experts: nn.Module) -> None:
    """Run the experts' FSDP hooks in a checkpointed layer's recompute as in its forward.

    In forward the experts run inside the model's root forward; in backward's recompute they run outside it,
    and FSDP2 makes the first module forwarded there its iteration root, with one more profiler op
    (`FSDP::root_pre_forward`). Selective checkpointing replays ops by their per-op call count, so that extra op
    fails the recompute (when the experts' FSDP has nothing to all-gather in forward, e.g. one `efsdp` rank).
    Marking the iteration as rooted for the experts' call in backward keeps their hooks the same in both (the
    root's own setup ran in forward). Private FSDP2 state (`_state_ctx`, torch 2.13): a torch that renames it
    fails at the first recompute with an AttributeError naming it."""
    state = experts._get_fsdp_state()

    def enter(module, args):
        in_backward = torch._C._current_graph_task_id() != -1  # a recompute, not the forward
        if in_backward and state._state_ctx.iter_forward_root is None:
            state._state_ctx.iter_forward_root = _OUTSIDE_ROOT

    def leave(module, args, out):
        if state._state_ctx.iter_forward_root is _OUTSIDE_ROOT:
            state._state_ctx.iter_forward_root = None

    experts.register_forward_pre_hook(enter, prepend=True)
    experts.register_forward_hook(leave)


def shard_experts(model: nn.Module, efsdp_mesh: DeviceMesh, options: FSDPOptions, divide_factor: int) -> None:
    """FSDP-shard every MoE layer's routed experts over `efsdp_mesh` (the data-parallel ranks outside their EP
    group), before the layers themselves are sharded (which then leave the experts be).

    Every rank's expert gradient already sums its EP group's tokens, and the reduce-scatter adds the other
    groups': dividing by `divide_factor` (the data-parallel degree, by which every other gradient is averaged)
    rather than the mesh size makes it the same mean. Under TP with ep=1 this is also what sums the gradients of
    the TP ranks' token shards (`efsdp` spans them)."""
    reshard = options.reshard_after_forward
    for experts in routed_experts(model):
        fully_shard(experts, mesh=efsdp_mesh,
                    reshard_after_forward=efsdp_mesh.size() > 1 if reshard is None else reshard,
                    mp_policy=MixedPrecisionPolicy(param_dtype=options.param_dtype, reduce_dtype=options.reduce_dtype),
                    offload_policy=CPUOffloadPolicy() if options.cpu_offload else OffloadPolicy())
        _keep_root_quiet(experts)
        experts.set_gradient_divide_factor(float(divide_factor))
        # gloo has no PREMUL_SUM: sum, then divide. Not over one shard rank, where torch 2.13 then divides twice
        # (and, with no reduce-scatter to run, never needs the op).
        if efsdp_mesh.device_type == "cpu" and efsdp_mesh.shape[-1] > 1:
            experts.set_force_sum_reduction_for_comms(True)


@torch.no_grad()
def balance_experts(model: nn.Module, dims, update: bool = True) -> None:
    """Aux-loss-free balancing's step, after each optimizer step on every rank: the tokens each MoE block sent each
    expert since the last call (`model.balanced_moe()`, the model protocol), summed over all ranks that hold other
    tokens of the same layers (`dp` and `tp`: data-parallel and CP ranks other sequences or shards, TP ranks other
    token shards; a pipeline stage's ranks only, whose layers they are), move every block's bias
    (`MoEBlock.update_bias`); `update=False` (a skipped step) drops the counts instead. Nothing for a model that
    does not balance by bias."""
    blocks = model.balanced_moe()
    if not blocks:
        return
    counts = torch.stack([b.tokens_per_expert for b in blocks])
    for name in ("dp", "tp"):
        mesh = dims.mesh(name)
        if mesh.size() > 1:
            torch.distributed.all_reduce(counts, group=mesh.get_group())
    for block, c in zip(blocks, counts):
        if update:
            block.update_bias(c)
        else:
            block.reset_balance(bias=False)


__all__ = ["ExpertParallel", "all_to_all_v", "apply_ep", "balance_experts", "combine", "dispatch", "routed_experts",
           "shard_experts"]
