"""Probe (stops 52-53): every Triton kernel of sca's layer step at T = 8192 (65,536 tokens, H 8, D 64, bf16) over tile
settings on this GPU. The inputs are captured from one real fwd+bwd of the layer; each op is then called alone with
each setting (do_bench), its outputs checked against the current setting's."""
import itertools, os, sys, time
import torch
from triton.testing import do_bench
from attnbench.variants import build_attention, fused_band, fused_mixing, fused_supernodes

torch.manual_seed(0)
T, B, H, D = 8192, 8, 8, 64
captured = {}

def capture(module, name):
    original = getattr(module, name)
    def wrapped(*args, **kwargs):
        captured.setdefault(name, (original, args, kwargs))
        return original(*args, **kwargs)
    setattr(module, name, wrapped)

for module, name in [(fused_supernodes, "prefix_means"), (fused_supernodes, "suffix_sums"), (fused_supernodes, "read_values"),
                     (fused_supernodes, "read_values_backward"), (fused_mixing, "supernode_mixing"),
                     (fused_mixing, "supernode_mixing_backward"), (fused_band, "band_attention_forward"),
                     (fused_band, "band_attention_backward")]:
    capture(module, name)

layer = build_attention("sca", H * D, H, T, {}).cuda().train()
q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
x = torch.randn(B, T, H * D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
with torch.autocast("cuda", dtype=torch.bfloat16):
    out = layer.efficient(q, k, v, x)
torch.autograd.backward([out, layer.aux_loss], [torch.randn_like(out), None])
torch.cuda.synchronize()
print("captured:", sorted(captured), flush=True)

def detach(a):
    return a.detach() if isinstance(a, torch.Tensor) else a

def outputs(name):
    fn, args, kwargs = captured[name]
    with torch.no_grad():
        result = fn(*[detach(a) for a in args], **kwargs)
    return [r for r in (result if isinstance(result, (tuple, list)) else [result]) if isinstance(r, torch.Tensor) and r.numel()]

def timed(name):
    fn, args, kwargs = captured[name]
    args = [detach(a) for a in args]
    def call():
        with torch.no_grad():
            fn(*args, **kwargs)
    return do_bench(call, warmup=10, rep=60) * 1e3

def error(a, b):
    return max(float((x.float() - y.float()).abs().max() / (y.float().abs().max() + 1e-12)) for x, y in zip(a, b))

def sweep(name, settings, apply, title=None):
    """settings: list of (label, value); apply(value) sets it and returns the restore function."""
    title = title or name
    base = outputs(name)
    results = []
    for label, value in settings:
        restore = apply(value)
        try:
            t0 = time.time()
            err = error(outputs(name), base)
            us = timed(name)
            results.append((us, label))
            print(f"{title:28s} {label:50s} {us:8.1f} us  err {err:.1e}  ({time.time() - t0:.1f} s)", flush=True)
        except Exception as e:
            print(f"{title:28s} {label:50s} failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
        finally:
            restore()
    best = min(results)
    print(f"BEST {title}: {best[1]} {best[0]:.1f} us (first = current: {results[0][0]:.1f} us)\n", flush=True)

def dict_setter(d, key=None):
    def apply(value):
        target = d if key is None else d[key]
        old = dict(target)
        target.clear(); target.update(value)
        def restore():
            target.clear(); target.update(old)
        return restore
    return apply

def with_warps(tiles_apply):
    def apply(value):
        tiles, warps = value
        restore_tiles = tiles_apply(tiles)
        old = fused_supernodes.NUM_WARPS
        fused_supernodes.NUM_WARPS = warps
        def restore():
            restore_tiles(); fused_supernodes.NUM_WARPS = old
        return restore
    return apply

only = set(sys.argv[1:])
def wanted(name):
    return not only or name in only

if wanted("supernode_mixing"):
    current = dict(fused_mixing.FORWARD_OPTIONS)
    grid = [dict(BLOCK=bm, BLOCK_N=bn, num_warps=w, num_stages=s) for bm, bn, w, s in itertools.product((64, 128), (32, 64), (4, 8), (2, 3))]
    sweep("supernode_mixing", [(str(c), c) for c in [current] + [c for c in grid if c != current]], dict_setter(fused_mixing.FORWARD_OPTIONS))
if wanted("supernode_mixing_backward"):
    current = dict(fused_mixing.WHOLE_OPTIONS)
    grid = [dict(BLOCK=bm, num_warps=w, num_stages=s) for bm, w, s in itertools.product((16, 32, 64), (2, 4, 8), (1, 2))]
    sweep("supernode_mixing_backward", [(str(c), c) for c in [current] + [c for c in grid if c != current]], dict_setter(fused_mixing.WHOLE_OPTIONS))
if wanted("prefix_means"):
    current = (dict(fused_supernodes.TILES["prefix"]), fused_supernodes.NUM_WARPS)
    grid = [(dict(BLOCK_S=s, BLOCK_L=l), w) for s, l, w in itertools.product((16, 32, 64), (16, 32, 64), (2, 4, 8))]
    sweep("prefix_means", [(str(c), c) for c in [current] + [c for c in grid if c != current]], with_warps(dict_setter(fused_supernodes.TILES, "prefix")))
if wanted("read_values_backward"):
    current = (dict(fused_supernodes.TILES["read_values_backward"]), fused_supernodes.NUM_WARPS)
    grid = [(dict(BLOCK_S=s, BLOCK_L=l), w) for s, l, w in itertools.product((32, 64), (16, 32, 64), (2, 4, 8))]
    sweep("read_values_backward", [(str(c), c) for c in [current] + [c for c in grid if c != current]], with_warps(dict_setter(fused_supernodes.TILES, "read_values_backward")))
if wanted("read_values"):
    current = (dict(fused_supernodes.TILES["read_values"]), fused_supernodes.NUM_WARPS)
    grid = [(dict(BLOCK_L=l), w) for l, w in itertools.product((16, 32, 64, 128), (2, 4, 8))]
    sweep("read_values", [(str(c), c) for c in [current] + [c for c in grid if c != current]], with_warps(dict_setter(fused_supernodes.TILES, "read_values")))
if wanted("suffix_sums"):
    current = (dict(fused_supernodes.TILES["suffix_sums"]), fused_supernodes.NUM_WARPS)
    grid = [(dict(BLOCK_C=c, STAGES=s), w) for c, s, w in itertools.product((4, 8, 16), (2, 3, 4), (2, 4))]
    sweep("suffix_sums", [(str(c), c) for c in [current] + [c for c in grid if c != current]], with_warps(dict_setter(fused_supernodes.TILES, "suffix_sums")))
for kernel, op in (("forward", "band_attention_forward"), ("dq", "band_attention_backward"), ("dkdv", "band_attention_backward")):
    if wanted(op) or wanted(kernel):
        current = dict(fused_band.TILES[kernel])
        grid = [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s) for m, n, w, s in itertools.product((32, 64), (32, 64), (4,), (2, 3, 4))]
        if kernel == "dkdv":
            grid += [dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=s) for s in (2, 3)]
        sweep(op, [(str(c), c) for c in [current] + [c for c in grid if c != current]], dict_setter(fused_band.TILES, kernel), f"band {kernel}")
