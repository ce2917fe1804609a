"""mha: multi-head causal softmax attention, the baseline every variant is measured against.

Efficient path: the fused scaled_dot_product_attention, trying its kernels in the order of the
`kernels` option. cuDNN's first by default: on the H100 its fwd+bwd ran 1.5x flash's at T = 1024-32K
(benchmark, one run); the next one takes over wherever a kernel declines the inputs (CPU, shapes).
`kernels: [flash]` is a plain GPT's attention, the benchmark's baseline for training throughput.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from pydantic import Field
from torch.nn.attention import SDPBackend, sdpa_kernel

from .base import Attention, VariantOptions, causal_mask, masked_softmax_attention, register

SDPA_KERNELS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
Kernel = Literal["cudnn", "flash", "efficient", "math"]


class MultiHeadOptions(VariantOptions):
    kernels: list[Kernel] = Field(["cudnn", "flash", "efficient", "math"], min_length=1,
                                  description="fused sdpa kernels to try, in order of preference")


def sdpa_backends(kernels: list[str]) -> list[SDPBackend]:
    """The backend order for `kernels`, with the plain math kernel last so any input still runs."""
    return [SDPA_KERNELS[name] for name in dict.fromkeys([*kernels, "math"])]


@register("mha")
class MultiHeadAttention(Attention):
    """out = softmax(q k^T * scale + log M) v."""

    Options = MultiHeadOptions
    compute_exponent = 2.0

    def mean_keys(self) -> float:
        return (self.seq_len + 1) / 2

    def reference(self, q, k, v, x):
        return masked_softmax_attention(q, k, v, causal_mask(q.shape[-2], q.device), self.scale)

    def efficient(self, q, k, v, x):
        with sdpa_kernel(sdpa_backends(self.options.kernels), set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
