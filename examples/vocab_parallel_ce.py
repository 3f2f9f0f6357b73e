"""Vocabulary-parallel cross-entropy with ``softjac.distributed``.

Each rank holds a contiguous block of the classifier's rows (uneven when V is not divisible by
the number of ranks) and computes the loss of the whole vocabulary, the same on every rank,
with label smoothing over the *global* vocabulary:

    torchrun --nproc-per-node 2 examples/vocab_parallel_ce.py

(gloo on CPU; use the "nccl" backend and CUDA tensors on GPUs.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

import softjac.distributed as sd


def run(group=None) -> float:
    """Build the same input, classifier and targets on every rank, shard the classifier, and
    check the sharded losses and gradients against single-device PyTorch. Returns the loss."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    n, d, v = 8, 16, 1001
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen)
    w_full = torch.randn(v, d, generator=gen) / d**0.5
    target = torch.randint(0, v, (n,), generator=gen)

    sizes = [v // world + (1 if r < v % world else 0) for r in range(world)]
    start = sum(sizes[:rank])
    w_shard = w_full[start : start + sizes[rank]].clone().requires_grad_()

    # 1) from sharded logits: two all-reduces forward, none in the backward
    logits_shard = x @ w_shard.T
    loss = sd.cross_entropy(logits_shard, target, group=group, label_smoothing=0.1)
    loss.backward()

    # 2) the fused head: no N × V_r logits; every rank gets the full input gradient
    x2 = x.clone().requires_grad_()
    w2 = w_shard.detach().clone().requires_grad_()
    fused = sd.linear_cross_entropy(x2, w2, target, group=group, label_smoothing=0.1)
    fused.backward()

    # single-device reference on the full classifier
    wr = w_full.clone().requires_grad_()
    xr = x.clone().requires_grad_()
    ref = F.cross_entropy(xr @ wr.T, target, label_smoothing=0.1)
    ref.backward()
    block = slice(start, start + sizes[rank])
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(fused, ref)
    torch.testing.assert_close(w_shard.grad, wr.grad[block])
    torch.testing.assert_close(w2.grad, wr.grad[block])
    torch.testing.assert_close(x2.grad, xr.grad)
    if rank == 0:
        print(f"world {world}: loss {loss.item():.5f} (single device {ref.item():.5f}); classes "
              f"per rank {sizes}; gradients match")  # fmt: skip
    return loss.item()


def main() -> None:
    dist.init_process_group("gloo")
    try:
        run()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
