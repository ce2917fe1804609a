"""A/B probe (device only): lca/sca with FlexAttention tiles 128 vs 64, and sca's mixing by sdpa vs bmm."""
import functools, json, logging, os, sys
import torch, torch.nn.functional as F
from attnbench import benchmark as bm
from attnbench.variants import lca, sca, flex

logging.basicConfig(level=logging.INFO, format="%(message)s")
OUT = os.environ["OUT"]
seq_lens = [int(s) for s in sys.argv[1].split(",")]
configs = sys.argv[2].split(",")
TILE_CONFIGS = {
    "t128": ((128, 128), None),
    "t64a": ((64, 64), dict(fwd_BLOCK_M=64, fwd_BLOCK_N=64, bwd_BLOCK_M1=64, bwd_BLOCK_N1=64, bwd_BLOCK_M2=64, bwd_BLOCK_N2=64)),
    "t64b": ((64, 64), dict(fwd_BLOCK_M=64, fwd_BLOCK_N=64, bwd_BLOCK_M1=32, bwd_BLOCK_N1=64, bwd_BLOCK_M2=64, bwd_BLOCK_N2=32)),
    "t128x64": ((128, 64), dict(fwd_BLOCK_M=128, fwd_BLOCK_N=64, bwd_BLOCK_M1=64, bwd_BLOCK_N1=64, bwd_BLOCK_M2=128, bwd_BLOCK_N2=64)),
}
original_flex, original_mix = lca.flex_band_attention, sca.SuperClusterAttention.mix


def mix_bmm(self, n, m, total):
    B, H, S, C, D = n.shape
    n, m, total = F.pad(n, (0, 0, 0, -C % 8)), F.pad(m, (0, 0, 0, -C % 8)), F.pad(total, (0, -C % 8))
    u = F.linear(n, self.supernode_query.weight.float())
    nonempty = (total > 0).unsqueeze(-2)
    has_keys = nonempty.any(dim=-1, keepdim=True)
    keys = nonempty | ~has_keys  # (B, R, S, 1, C8)
    scores = (u @ m.transpose(-2, -1)).float() * self.scale
    p = scores.masked_fill(~keys, float("-inf")).softmax(dim=-1)
    z = p.to(n.dtype) @ n
    return torch.where(has_keys, z, 0.0)[..., :C, :]


import traceback, re
CANDIDATES = {
    "t64c": ((64, 64), dict(BLOCK_M=64, BLOCK_N=64, BLOCK_M1=32, BLOCK_N1=64, BLOCK_M2=64, BLOCK_N2=32, num_stages=2, num_warps=4)),
    "t64d": ((64, 64), dict(BLOCK_M=64, BLOCK_N=64, BLOCK_M1=64, BLOCK_N1=64, BLOCK_M2=64, BLOCK_N2=64, num_stages=2, num_warps=4)),
    "t64e": ((64, 64), dict(fwd_BLOCK_M=64, fwd_BLOCK_N=64)),
    "t64f": ((64, 64), None),
}
TILE_CONFIGS.update(CANDIDATES)
if os.environ.get("MAX_AUTOTUNE") == "1":
    import torch._inductor.config as inductor_config
    inductor_config.max_autotune = True
for name in CANDIDATES if os.environ.get("CHECKS") == "1" else []:
    tile_shape, kernel_options = TILE_CONFIGS[name]
    try:
        q, k, v = (torch.randn(2, 8, 2048, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        lo = (torch.arange(2048, device="cuda") // 100 * 100).view(1, 1, -1)
        out = torch.compile(lambda q, k, v: original_flex(q, k, v, lo, 0.125, tile_shape, kernel_options))(q, k, v)
        out.sum().backward()
        print("small check", name, "ok", flush=True)
    except Exception as err:
        text = str(err)
        print("small check", name, "failed:", type(err).__name__, text[:600].replace("\n", " | "), flush=True)
    torch._dynamo.reset()
rows = []
for T in seq_lens:
    batch = 65536 // T
    rows.append(bm.run_point("attention", "sdpa", T, batch, lambda: bm.attention_step("sdpa", T, batch, 8, 64, None, "compiled"), 3, 10))
    for config in configs:
        variant, tiles, *mixing = config.split(":")
        tile_shape, kernel_options = TILE_CONFIGS[tiles]
        lca.flex_band_attention = functools.partial(original_flex, tiles=tile_shape, kernel_options=kernel_options)
        sca.SuperClusterAttention.mix = mix_bmm if mixing == ["bmm"] else original_mix
        row = bm.run_point("attention", config, T, batch, lambda: bm.attention_step(variant, T, batch, 8, 64, None, "compiled"), 3, 10,
                           trace=os.environ.get("TRACE") == "1" and T == 8192)
        rows.append(row)
        with open(f"{OUT}/probe.json", "w") as f:
            json.dump(rows, f, indent=1)
for r in rows:
    print(f"{r['variant']:>18} T={r['T']:6d} " + (f"{r['ms']:.3f} ms {r['mtok_per_s']:.1f} Mtok/s" if r["status"] == "ok" else r["status"][:1500]))
    for line in r.get("kernels", []):
        print("   ", line)
