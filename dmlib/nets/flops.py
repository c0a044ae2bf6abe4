"""Size and cost of a network: parameters and forward-pass FLOPs, for the benchmark tables."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters (buffers such as a fixed positional embedding are not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """``Q K^T`` and ``softmax(.) V``: ``2 * B * heads * N_q * N_k * (d_qk + d_v)``."""
    *batch, n_q, d_qk = query_shape
    return 2 * math.prod(batch) * n_q * key_shape[-2] * (d_qk + value_shape[-1])


# PyTorch's counter knows the CUDA attention kernels and the math path (plain bmm, also used on
# meta) but not the fused CPU kernel, whose FLOPs it would silently count as zero.
_MISSING = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops}


def forward_flops(model: nn.Module, *example_inputs, **example_kwargs) -> int:
    """FLOPs of one forward pass ``model(*example_inputs, **example_kwargs)`` for the whole batch.

    Counted by ``torch.utils.flop_counter.FlopCounterMode``, which looks at the aten operators that
    run: matrix products, convolutions and attention count 2 FLOPs per multiply-add (a Linear(a, b)
    on n rows is ``2 * n * a * b``, its bias add not counted); elementwise operations (norms,
    activations, residual adds) are ignored. They are a small share of the arithmetic in these nets,
    though not of the memory traffic, so wall-clock time can rank networks differently.
    Works on the ``meta`` device: counting needs shapes only, so ``model.to("meta")`` with meta
    inputs costs no memory or time even for a large net.
    """
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_MISSING) as counter:
        model(*example_inputs, **example_kwargs)
    return counter.get_total_flops()


def describe(model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> dict:
    """One row of a benchmark table for an image network ``model(x, t, y)``."""
    flops = forward_flops(model, x, t) if y is None else forward_flops(model, x, t, y)
    return {
        "model": type(model).__name__,
        "params": count_parameters(model),
        "input": list(x.shape),
        "flops": flops,
        "gflops_per_sample": flops / x.shape[0] / 1e9,
    }
