"""Inference copies of a network for CPUs with native bfloat16: batch norms folded into their
convolutions, every parameter in bfloat16.

Under ``torch.autocast("cpu", bfloat16)`` each call casts the float32 weights to bfloat16 again,
batch norms and concatenations of mixed dtypes run in float32, and the activations are converted
back and forth between the layers. A network that is bfloat16 throughout (channels last) skips
that: GeNSeg-Net's U-Net ran about 1.25x faster on 2 AVX-512 BF16 cores
(``benchmarks/bench_cpu_bf16.py``). GeNSeg-Net uses it for its U-Net only (see
``GenSegNet._bf16_copy``): the val AJI of the shipped weights moved by at most 0.0014 and the nuclei
matched those of autocast with F1 >= 0.998 at IoU 0.5 on the CMU slide and on every val set.

The training code never sees these copies: :func:`inference_copy` deep-copies the module.
"""

from __future__ import annotations

import copy
from typing import Any


def fold_batch_norms(net: Any) -> Any:
    """Fold every ``BatchNorm2d`` that directly follows a ``Conv2d`` in a container into that
    convolution (eval-mode statistics); the norm becomes ``Identity``. In place; returns ``net``."""
    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    def visit(mod: nn.Module) -> None:
        names = list(mod._modules)
        for i, name in enumerate(names):
            child = mod._modules[name]
            nxt = mod._modules[names[i + 1]] if i + 1 < len(names) else None
            if isinstance(child, nn.Conv2d) and isinstance(nxt, nn.BatchNorm2d) and nxt.track_running_stats:
                mod._modules[name] = fuse_conv_bn_eval(child, nxt)
                mod._modules[names[i + 1]] = nn.Identity()
            elif child is not None:
                visit(child)

    visit(net.eval())
    return net


def inference_copy(net: Any) -> Any:
    """A bfloat16, channels-last, batch-norm-folded copy of ``net`` for CPU inference (``net`` untouched)."""
    import torch

    out = fold_batch_norms(copy.deepcopy(net).eval())
    return out.to(dtype=torch.bfloat16, memory_format=torch.channels_last)
