"""Pool task: the custom ops on DTensor inputs (tokens `Shard(0)`, weight replicated) against the same
op on whole plain tensors. Kept light: the pool's workers import this module."""

import torch
from helpers import rel_err
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

from dtllama.ops import CrossEntropy, linear_cross_entropy, linear_logprobs_entropy, rms_norm


def run_rank(seed: int, T: int, H: int, V: int):
    world = torch.distributed.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(seed)  # same on every rank: the whole tensors are the reference
    x, w = torch.randn(T, H, generator=g), torch.rand(H, generator=g) + 0.5
    dy = torch.randn(T, H, generator=g)
    head, labels = torch.randn(V, H, generator=g), torch.randint(0, V, (T,), generator=g)
    labels[::3] = -100
    out = {}

    ref_x, ref_w = x.clone().requires_grad_(), w.clone().requires_grad_()
    rms_norm(ref_x, ref_w, 1e-5).backward(dy)
    dx = distribute_tensor(x, mesh, [Shard(0)]).requires_grad_()
    dw = distribute_tensor(w, mesh, [Replicate()]).requires_grad_()
    y = rms_norm(dx, dw, 1e-5)
    y.backward(distribute_tensor(dy, mesh, [Shard(0)]))
    out["rms_norm placements"] = (y.placements, dx.grad.placements)
    out["rms_norm"] = [rel_err(a.full_tensor(), b)
                       for a, b in ((y, rms_norm(x, w, 1e-5)), (dx.grad, ref_x.grad), (dw.grad, ref_w.grad))]

    ref_h, ref_head = x.clone().requires_grad_(), head.clone().requires_grad_()
    lp, ent = linear_logprobs_entropy(ref_h, ref_head, labels, 0.8, 3)
    (lp.sum() + 0.5 * ent.sum()).backward()
    dh = distribute_tensor(x, mesh, [Shard(0)]).requires_grad_()
    dhead = distribute_tensor(head, mesh, [Replicate()]).requires_grad_()
    dlp, dent = linear_logprobs_entropy(dh, dhead, labels, 0.8, 3)
    out["logprobs placements"] = dlp.placements
    (dlp.sum() + 0.5 * dent.sum()).backward()
    out["logprobs"] = [rel_err(a.full_tensor(), b)
                       for a, b in ((dlp, lp), (dent, ent), (dh.grad, ref_h.grad), (dhead.grad, ref_head.grad))]

    opt = CrossEntropy(z_loss=1e-2, label_smoothing=0.1)
    ref_h, ref_head = x.clone().requires_grad_(), head.clone().requires_grad_()
    linear_cross_entropy(ref_h, ref_head, labels, opt, 3).backward()
    dh = distribute_tensor(x, mesh, [Shard(0)]).requires_grad_()
    dhead = distribute_tensor(head, mesh, [Replicate()]).requires_grad_()
    loss = linear_cross_entropy(dh, dhead, labels, opt, 3)
    out["loss placements"] = (loss.placements, dh.grad is None)
    loss.backward()
    out["loss"] = [rel_err(a.full_tensor(), b) for a, b in ((loss, linear_cross_entropy(x, head, labels, opt, 3)),
                                                            (dh.grad, ref_h.grad), (dhead.grad, ref_head.grad))]
    return out
