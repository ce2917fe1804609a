"""mha: multi-head causal softmax attention, the baseline every variant is measured against."""

from __future__ import annotations

import torch.nn.functional as F

from .base import Attention, causal_mask, masked_softmax_attention


class MultiHeadAttention(Attention):
    """out = softmax(q k^T * scale + log M) v."""

    def reference(self, q, k, v, x):
        return masked_softmax_attention(q, k, v, causal_mask(q.shape[-2], q.device), self.scale)

    def efficient(self, q, k, v, x):
        # Fused kernel (flash attention on GPU): O(T) memory.
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
