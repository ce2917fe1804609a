"""la's own case: the recurrent step function equals the parallel form."""

import torch

from attnbench.variants import build_attention
from attnbench.variants.la import chunked_linear_attention, feature_map
from tests.test_variants import rel_err


def test_step_equals_parallel_form():
    B, T, H, D = 2, 29, 3, 8
    torch.manual_seed(0)
    layer = build_attention("la", H * D, H, T)
    q, k, v = torch.randn(3, B, H, T, D).unbind(0)
    parallel = layer.reference(q, k, v, None)
    state = None
    steps = []
    for t in range(T):
        out_t, state = layer.step(q[:, :, t], k[:, :, t], v[:, :, t], state)
        steps.append(out_t)
    assert rel_err(torch.stack(steps, dim=2), parallel) < 1e-5


def test_chunk_size_does_not_change_the_result():
    torch.manual_seed(1)
    fq, fk = (feature_map(t) for t in torch.randn(2, 1, 2, 50, 8).unbind(0))
    v = torch.randn(1, 2, 50, 8)
    one = chunked_linear_attention(fq, fk, v, chunk=1, eps=1e-6)
    for chunk in (7, 16, 64):
        assert rel_err(chunked_linear_attention(fq, fk, v, chunk=chunk, eps=1e-6), one) < 1e-5, chunk
