"""ByteLM's construction: tied embeddings and the depth-scaled initialisation of the residual projections."""

from __future__ import annotations

import pytest
import torch

from attnbench.model import VOCAB, ByteLM, ModelConfig


def test_output_head_shares_the_input_embedding():
    """Tied embeddings: head.weight is tok_emb.weight, one parameter, counted once (and as an embedding, so not
    among the non-embedding parameters)."""
    d, T, L = 32, 16, 2
    model = ByteLM(ModelConfig(variant="mha", d_model=d, n_layers=L, n_heads=2, seq_len=T))
    assert model.head.weight is model.tok_emb.weight
    attn = sum(p.numel() for p in model.blocks[0].attn.parameters())
    per_block = 2 * 2 * d + attn + 2 * 4 * d * d  # two LayerNorms, attention, MLP up and down
    assert model.num_params(non_embedding=False) == VOCAB * d + T * d + L * per_block + 2 * d
    assert model.num_params() == L * per_block + 2 * d


def test_residual_projections_are_initialised_smaller_with_depth():
    """GPT-2's init: the projections that write into the residual stream (attn.proj, mlp.down) have std
    0.02 / sqrt(2 n_layers), here 0.005; the other matrices 0.02."""
    torch.manual_seed(0)
    n_layers = 8
    model = ByteLM(ModelConfig(variant="mha", d_model=256, n_layers=n_layers, n_heads=4, seq_len=16))
    residual = 0.02 / (2 * n_layers) ** 0.5
    checked = set()
    for name, p in model.named_parameters():
        if p.dim() < 2:
            continue
        expected = residual if name.endswith(("attn.proj.weight", "mlp.down.weight")) else 0.02
        assert p.std().item() == pytest.approx(expected, rel=0.1), name
        checked.add(expected)
    assert checked == {residual, 0.02}
