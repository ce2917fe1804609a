"""ca's own cases: the mha limit, other block sizes and lookbacks, the band kernels' and the Flex path, Flex's tile
lists, options."""

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask

from attnbench.variants import build_attention, ca
from attnbench.variants.flex import TILE, band_block_mask
from tests.test_lca import triton_device
from tests.test_variants import FP32_RTOL, make_layer, rel_err, run_layer

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def ca_layer(T, H, D, seed=0, **options):
    torch.manual_seed(seed)
    return build_attention("ca", H * D, H, T, options)


def assert_same(out_a, grads_a, out_b, grads_b, label):
    assert rel_err(out_a, out_b) < FP32_RTOL, f"{label}: output rel err {rel_err(out_a, out_b):.2e}"
    for key in grads_b:
        assert rel_err(grads_a[key], grads_b[key]) < FP32_RTOL, f"{label}: grad of {key}"


@pytest.mark.parametrize("path", ["reference", "efficient"])
@pytest.mark.parametrize("block", [50, 64])
def test_one_block_without_lookback_is_mha(path, block):
    B, T, H, D = 2, 50, 2, 8
    layer = ca_layer(T, H, D, block=block, lookback=0)
    mha = make_layer("mha", T, H, D)
    mha.load_state_dict(layer.state_dict())
    x = torch.randn(B, T, H * D)
    assert_same(*run_layer(layer, x, path), *run_layer(mha, x, "efficient"), f"ca block={block} {path}")


@pytest.mark.parametrize("block,lookback", [(1, 0), (5, 0), (5, 2), (16, 1), (7, 100)], ids=str)
def test_chunked_path_equals_reference(block, lookback):
    B, T, H, D = 2, 37, 2, 8
    layer = ca_layer(T, H, D, block=block, lookback=lookback)
    x = torch.randn(B, T, H * D)
    out_ref, grads_ref = run_layer(layer, x, "reference")
    out_eff, grads_eff = run_layer(layer, x, "efficient")
    assert_same(out_eff, grads_eff, out_ref, grads_ref, f"ca block={block} lookback={lookback}")


@pytest.mark.parametrize("T,block,lookback", [(1, 16, 1), (37, 16, 1), (300, 16, 2), (300, 160, 1), (260, 32, 0)], ids=str)
def test_flex_path_equals_reference(T, block, lookback):
    B, H, D = 2, 2, 8
    layer = ca_layer(T, H, D, block=block, lookback=lookback)
    q, k, v = torch.randn(3, B, H, T, D).unbind(0)
    assert rel_err(layer.flex(q, k, v, None), layer.reference(q, k, v, None)) < FP32_RTOL


@pytest.mark.gpu
@pytest.mark.parametrize("T,block,lookback", [(37, 16, 1), (300, 16, 2), (260, 32, 0), (130, 64, 1), (40, 64, 1)], ids=str)
def test_band_path_equals_reference(T, block, lookback, monkeypatch):
    """The CUDA path (fused_band's kernels; the CPU under Triton's interpreter) against the reference, fp32: output and
    the gradients of q, k and v, views of one projection as in the model; T not a multiple of the block, lookback 0
    to 2, one block over everything (b >= T)."""
    device = triton_device()
    from attnbench.variants import fused_band

    monkeypatch.setattr(ca, "fused_band", fused_band)  # imported on CUDA machines only
    B, H, D = 2, 2, 8
    layer = ca_layer(T, H, D, block=block, lookback=lookback).to(device)
    qkv = torch.randn(B, T, 3, H, D, device=device, requires_grad=True)
    weight = torch.randn(B, H, T, D, device=device)

    def run(path):
        out = path(*qkv.permute(2, 0, 3, 1, 4), None)
        return out, *torch.autograd.grad((out * weight).sum(), qkv)

    for name, got, expected in zip(["output", "grad qkv"], run(layer.band), run(layer.reference)):
        assert rel_err(got, expected) < FP32_RTOL, f"{name}: rel err {rel_err(got, expected):.2e}"


def expand_tiles(block_mask, T):
    """Token-level (B, H, T, T) bool: pairs inside a key tile listed for their query tile."""
    return expand_tiles_dense(block_mask.to_dense().bool(), T)


def expand_tiles_dense(dense, T):
    """(B, H, n, n) tile flags -> (B, H, T, T) pair flags."""
    return dense.repeat_interleave(TILE, -1).repeat_interleave(TILE, -2)[..., :T, :T]


def random_segment_starts(B, H, T, clusters):
    """lo of lca's sorted order for random cluster ids: the start of each position's segment."""
    sorted_ids = torch.randint(0, clusters, (B, H, T)).sort(dim=-1).values
    return torch.searchsorted(sorted_ids, sorted_ids)  # first index holding the same id


@pytest.mark.parametrize("T", [1, 127, 128, 300, 700])
def test_band_tile_lists_cover_the_band(T):
    """Eager flex ignores the tile lists, so check them directly: every allowed pair lies in a listed tile."""
    layer = ca_layer(T, 1, 8, block=48, lookback=1)
    wide = ca_layer(T, 1, 8, block=160, lookback=2)  # a band several tiles wide: full tiles exist
    for lo in (layer.band_start(T, None).expand(1, 1, T), wide.band_start(T, None).expand(1, 1, T), random_segment_starts(2, 3, T, clusters=5)):
        pos = torch.arange(T)
        band = (lo.unsqueeze(-1) <= pos) & (pos <= pos.unsqueeze(-1))  # (B, H, T, T)
        block_mask = band_block_mask(lo)
        covered = expand_tiles(block_mask, T)
        assert not (band & ~covered).any(), "a pair inside the band lies in a tile the block mask skips"
        full_tiles = BlockMask.from_kv_blocks(block_mask.full_kv_num_blocks, block_mask.full_kv_indices).to_dense().bool()
        assert not (expand_tiles_dense(full_tiles, T) & ~band).any(), "a tile listed as full holds a pair outside the band"
        n = full_tiles.shape[-1]
        padded = torch.nn.functional.pad(band, (0, n * TILE - T, 0, n * TILE - T), value=True)  # padding: no constraint
        inside = padded.unflatten(-2, (n, TILE)).unflatten(-1, (n, TILE)).all(dim=(-3, -1))  # (B, H, n, n)
        below_diagonal = torch.ones(n, n, dtype=torch.bool).tril(-1)
        assert torch.equal(full_tiles, inside & below_diagonal), "full tiles are not exactly the off-diagonal tiles inside the band"
        # The backward's per-key-tile lists, built from ranges, against torch's transposition of the forward's.
        transposed = BlockMask.from_kv_blocks(block_mask.kv_num_blocks, block_mask.kv_indices, block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
        for ours, torchs in (("q_num_blocks", "q_indices"), ("full_q_num_blocks", "full_q_indices")):
            counts = getattr(block_mask, ours)
            assert torch.equal(counts, getattr(transposed, ours)), f"{ours} differs from the transposed forward lists"
            listed = torch.arange(n) < counts.unsqueeze(-1)
            assert torch.equal(getattr(block_mask, torchs)[listed], getattr(transposed, torchs)[listed]), f"{torchs} differs"


@pytest.mark.parametrize("options,message", [({"block": 0}, "(?s)block.*must be an integer >= 1 or 'auto'"), ({"lookback": -1}, "(?s)lookback.*must be an integer >= 0 or 'auto'")])
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        build_attention("ca", 16, 2, 32, options)
