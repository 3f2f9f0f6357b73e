"""Vocabulary-parallel softmax, log-softmax, VJP and cross-entropy on ``torch.distributed``.

The class (vocabulary) dimension is split into contiguous shards, one per rank of a process
group, in rank order (uneven sizes allowed) or placed by ``vocab_start=``; logits may also be a
DTensor sharded on the class dimension (``Shard(-1)``) on a 1-D or N-D mesh. Every function
gives each rank its shard of what the single-device function gives on the gathered logits, and
:func:`cross_entropy` gives the same loss on every rank — global label smoothing, class weights,
the weighted mean, ``ignore_index``, probability targets and z-loss included — with at most two
all-reduces forward and none in the backward of class-index targets.

Not imported by ``import softjac``: ``import softjac.distributed``.
"""

from softjac.distributed._api import (
    cross_entropy,
    linear_cross_entropy,
    log_softmax,
    softmax,
    vjp,
)

__all__ = ["softmax", "log_softmax", "vjp", "cross_entropy", "linear_cross_entropy"]
