"""lca's own cases: the mha limit, long segments, the sorted path, the router learning, the balance loss, options."""

import pytest
import torch
import torch.nn.functional as F

from attnbench.variants import build_attention
from tests.test_variants import FP32_RTOL, assert_equals_mha, assert_sorted_forward_equals_reference, assert_prefix_unchanged, future_changed, rel_err, run_layer

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

ROUTERS = ["head", "shared"]


def lca_layer(T, H, D, name="lca", seed=0, **options):
    torch.manual_seed(seed)
    return build_attention(name, H * D, H, T, options)


@pytest.fixture
def one_thread():
    """The training tests run tiny tensors: threads only add overhead (and contention)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("path", ["reference", "efficient"])
def test_one_cluster_is_mha(path, router):
    B, T, H, D = 2, 50, 2, 8
    assert_equals_mha(lca_layer(T, H, D, clusters=1, router=router).train(), path, "lca C=1", B)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("clusters", [2, 3, 60])
def test_long_segments_match_reference_and_stay_causal(clusters, router, mode):
    """Clusters spanning several chunks (the shared tests' default clusters fit in one)."""
    B, T, H, D, t = 2, 100, 2, 8, 60
    layer = lca_layer(T, H, D, clusters=clusters, router=router).train(mode == "train")
    x, x_changed, weight = future_changed(B, T, H * D, t)
    out_ref, grads_ref = run_layer(layer, x, "reference", grad_weight=weight)
    out_a, grads_a = run_layer(layer, x, "efficient", grad_weight=weight)
    changed = run_layer(layer, x_changed, "efficient", grad_weight=weight)
    assert rel_err(out_a, out_ref) < FP32_RTOL, f"output rel err {rel_err(out_a, out_ref):.2e}"
    for key in grads_ref:
        assert rel_err(grads_a[key], grads_ref[key]) < FP32_RTOL, f"grad of {key} rel err {rel_err(grads_a[key], grads_ref[key]):.2e}"
    if mode == "train":
        assert grads_a["router.weight"].abs().sum() > 0, "no gradient reaches the router"
    assert_prefix_unchanged((out_a, grads_a), changed, t, f"lca C={clusters}")


@pytest.mark.parametrize("mode", ["train", "eval", "sampled"])
@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("T,clusters", [(1, 1), (37, 3), (300, 1), (300, 4), (300, 17)], ids=str)
def test_sorted_path_equals_reference(T, clusters, router, mode):
    """"sampled": evaluation with training's routing noise (`sample_in_eval`)."""
    H, D = 2, 8
    layer = lca_layer(T, H, D, clusters=clusters, router=router).train(mode == "train")
    layer.sample_in_eval = mode == "sampled"
    assert_sorted_forward_equals_reference(layer, B=2)


def train_on_uniform_attention(name, target, prepare=None, steps=200, lr=3e-2, seed=0, **options):
    """Train one layer whose queries are frozen at zero, so inside a cluster it can only average
    the values of earlier tokens: what it predicts depends on the partition alone.

    Tokens: x = [onehot(class) (2), u, 1, onehot(tag) (2), 0, 0]; the prediction is output channel 0.
    `target(u, same_class)` gives the regression target (B, T); `prepare(layer)` runs before training.
    Returns the eval-mode loss and the layer.
    """
    B, T, d = 32, 32, 8
    layer = lca_layer(T, 1, d, name=name, seed=seed, **options)
    with torch.no_grad():
        layer.qkv.weight[:d] = 0
    layer.qkv.weight.register_hook(lambda g: torch.cat([torch.zeros_like(g[:d]), g[d:]]))
    if prepare is not None:
        prepare(layer)
    trainable = [p for p in layer.parameters() if p.requires_grad]
    opt = torch.optim.Adam(trainable, lr=lr)

    def batch(n, generator):
        cls, tag = torch.randint(0, 2, (2, n, T), generator=generator)
        u = torch.randn(n, T, generator=generator)
        x = torch.cat([F.one_hot(cls, 2), u.unsqueeze(-1), torch.ones(n, T, 1), F.one_hot(tag, 2), torch.zeros(n, T, 2)], dim=-1)
        same_class = (cls.unsqueeze(-1) == cls.unsqueeze(-2)) & torch.ones(T, T, dtype=torch.bool).tril()
        return x, target(u, same_class)

    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        layer.set_progress(step / steps)
        x, y = batch(B, generator)
        loss = F.mse_loss(layer(x)[..., 0], y) + layer.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    layer.eval()
    with torch.no_grad():
        x, y = batch(256, torch.Generator().manual_seed(123))
        return F.mse_loss(layer(x)[..., 0], y).item(), layer


def class_mean(u, same_class):
    """Mean of u over the earlier tokens of the same class: solved exactly by clusters = classes."""
    return (same_class.float() @ u.unsqueeze(-1)).squeeze(-1) / same_class.sum(-1)


def running_mean(u, same_class):
    """Mean of u over all earlier tokens: best served by one cluster."""
    return u.cumsum(-1) / torch.arange(1, u.shape[-1] + 1)


def freeze_router_on_tag(layer):
    """A fixed random partition: route by the random tag alone."""
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 4] = layer.router.weight[1, 5] = 10.0
    layer.router.weight.requires_grad_(False)


@pytest.mark.parametrize("name", ["lca"])
def test_router_learns_the_class_partition(name, one_thread):
    """Learned routing beats a fixed random partition by a wide margin (it finds clusters = classes)."""
    options = dict(clusters=2, router="shared", balance=0.1)
    learned, _ = train_on_uniform_attention(name, class_mean, **options)
    fixed, _ = train_on_uniform_attention(name, class_mean, prepare=freeze_router_on_tag, **options)
    assert learned < 0.2 * fixed, f"{name}: learned routing loss {learned:.4f} vs random fixed partition {fixed:.4f}"


def test_balance_loss_prevents_collapse(one_thread):
    """On a task one cluster serves best, balance 0.1 keeps the largest of 4 clusters under 60% of the
    tokens (uniform: a quarter; seeds 0-2 gave 0.44-0.55) over 200 steps, where balance 0 collapses into one."""
    _, balanced = train_on_uniform_attention("lca", running_mean, clusters=4, balance=0.1)
    _, free = train_on_uniform_attention("lca", running_mean, clusters=4, balance=0.0)
    assert balanced.stats()["max_cluster_frac"] < 0.6, balanced.stats()
    assert free.stats()["max_cluster_frac"] > 0.9, free.stats()


def test_tau_anneals_geometrically_and_aux_loss_is_training_only():
    layer = lca_layer(16, 2, 8, tau_start=2.0, tau_end=0.5)
    for progress, tau in [(0.0, 2.0), (0.5, 1.0), (1.0, 0.5)]:
        layer.set_progress(progress)
        assert layer.tau.item() == pytest.approx(tau)
    layer(torch.randn(1, 16, 16))
    assert layer.aux_loss is not None and layer.aux_loss.requires_grad
    assert set(layer.stats()) == {"max_cluster_frac", "empty_clusters", "pair_frac", "tau"}
    layer.eval()(torch.randn(1, 16, 16))
    assert layer.aux_loss is None
    assert set(layer.stats()) == {"max_cluster_frac", "empty_clusters", "pair_frac"}


@pytest.mark.parametrize("name", ["lca", "sca"])
def test_sampled_routing_in_evaluation_draws_as_training_does(name):
    """`sample_in_eval`: evaluation routes by training's draw (same seed, same clusters), not by the argmax, and
    sets no balance loss; without it evaluation takes the argmax of the logits."""
    layer = lca_layer(64, 2, 8, name=name, clusters=4).eval()
    x = torch.randn(2, 64, 16)
    layer(x)
    argmax = layer.last_clusters
    assert torch.equal(argmax, layer.router_logits(x).argmax(-1).transpose(1, 2))
    layer.sample_in_eval = True
    torch.manual_seed(1)
    out = layer(x)
    sampled = layer.last_clusters
    assert layer.aux_loss is None
    torch.manual_seed(1)
    trained = layer.train()(x)
    assert torch.equal(sampled, layer.last_clusters) and torch.equal(out, trained)
    assert not torch.equal(sampled, argmax)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["lca", "sca"])
def test_gpu_sampled_evaluation_equals_the_reference(name):
    """Evaluation with sampled routing on CUDA (torch's noise, not the fused routing's, and the band kernels given
    own gates outside training): the efficient path equals the reference under the same draw, in fp32."""
    T, H, D = 300, 2, 64
    layer = lca_layer(T, H, D, name=name, clusters=4).cuda().eval()
    layer.sample_in_eval = True
    if name == "sca":
        layer.gate.data.fill_(0.5)  # the supernodes' share of v', 0 at initialisation
    x = torch.randn(2, T, H * D, device="cuda")
    outs, clusters = [], []
    with torch.no_grad():
        for path in ("reference", "efficient"):
            layer.path = path
            torch.manual_seed(1)
            outs.append(layer(x))
            clusters.append(layer.last_clusters)
    assert torch.equal(*clusters)
    assert rel_err(outs[1], outs[0]) < FP32_RTOL, f"{name}: rel err {rel_err(outs[1], outs[0]):.2e}"


def test_a_model_samples_its_routing_only_inside_sampled_routing():
    from attnbench.model import ByteLM, ModelConfig

    model = ByteLM(ModelConfig("lca", d_model=16, n_layers=2, n_heads=2, seq_len=32)).eval()
    assert model.noisy_routing and not ByteLM(ModelConfig("mha", d_model=16, n_layers=1, n_heads=2, seq_len=32)).noisy_routing
    with model.sampled_routing():
        assert all(attn.sample_in_eval for attn in model.attention_layers)
    assert not any(attn.sample_in_eval for attn in model.attention_layers)


def test_annealing_tau_does_not_recompile_the_router():
    """Training sets a new tau every step; a compiled model that guarded on it would recompile each time."""
    from torch._dynamo.testing import CompileCounter

    layer = lca_layer(16, 2, 8).train()
    counter = CompileCounter()
    route = torch.compile(layer.route, backend=counter)
    x = torch.randn(1, 16, 16)
    route(x)
    frames = counter.frame_count
    for progress in (0.3, 0.6, 1.0):
        layer.set_progress(progress)
        route(x)
    assert counter.frame_count == frames, f"{counter.frame_count - frames} recompilations while tau annealed"


def test_gumbel_noise_is_fp32_for_bf16_logits():
    """Under autocast the router's logits are bf16; the noise and the soft assignment must still be fp32."""
    from attnbench.variants.routing import gumbel_noise, route

    logits = torch.zeros(1, 1, 4096, 2, dtype=torch.bfloat16)
    cluster, soft = route(logits, torch.tensor(1.0), gumbel_noise(logits))
    assert soft.dtype == torch.float32
    # y_0 = sigmoid(g_0 - g_1): with fp32 uniforms nearly every one of 4096 draws differs.
    assert soft[..., 0].unique().numel() > 4000


@pytest.mark.parametrize(
    "options,message",
    [({"clusters": 0}, "(?s)clusters.*must be an integer >= 1 or 'auto'"), ({"balance": -1.0}, "(?s)balance.*must be a number >= 0.0 or 'auto'"), ({"tau_end": 0}, "greater than 0")],
)
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        build_attention("lca", 16, 2, 32, options)


@pytest.mark.parametrize("T, C", [(1, 1), (5, 3), (64, 2), (65, 7), (300, 17), (1000, 32)])
def test_counting_sort_is_the_stable_sort(T, C):
    """sort_by_cluster against torch.sort(stable=True): T below, at and past whole counting-sort blocks."""
    from attnbench.variants.lca import sort_by_cluster

    torch.manual_seed(T)
    cluster = torch.randint(0, C, (2, 3, T))
    order, inverse, counts, starts = sort_by_cluster(cluster, C)
    assert torch.equal(order, torch.sort(cluster, dim=-1, stable=True).indices)
    assert torch.equal(inverse.gather(-1, order), torch.arange(T).expand_as(order))
    assert torch.equal(counts, F.one_hot(cluster, C).sum(dim=-2))
    assert torch.equal(starts, counts.cumsum(dim=-1) - counts)


def test_permute_backward_is_the_inverse_gather():
    """The sorted-order gathers carry their own backward (a gather by the inverse): it must equal autograd's scatter."""
    from attnbench.variants.lca import Permute

    B, H, T, D = 2, 3, 17, 4
    order = torch.stack([torch.randperm(T) for _ in range(B * H)]).view(B, H, T)
    inverse = torch.empty_like(order).scatter_(-1, order, torch.arange(T).expand_as(order))
    index, inverse_index = (i.unsqueeze(-1).expand(B, H, T, D) for i in (order, inverse))
    u = torch.randn(B, H, T, D, requires_grad=True)
    weight = torch.randn(B, H, T, D)
    (grad_custom,) = torch.autograd.grad((Permute.apply(u, index, inverse_index) * weight).sum(), u)
    (grad_autograd,) = torch.autograd.grad((u.gather(2, index) * weight).sum(), u)
    assert torch.equal(Permute.apply(u, index, inverse_index), u.gather(2, index))
    assert torch.equal(grad_custom, grad_autograd)


def test_balance_loss_matches_its_definition():
    """C * mean_t sum_c F_t[c] p_t[c], F_t from the blocks before t's, written out with loops."""
    from attnbench.variants.routing import balance_loss

    B, R, T, C, block = 2, 3, 11, 4, 4
    logits = torch.randn(B, R, T, C, dtype=torch.float64)
    cluster = torch.randint(0, C, (B, R, T))
    p = logits.softmax(dim=-1)
    total = 0.0
    for b in range(B):
        for r in range(R):
            for t in range(T):
                seen = cluster[b, r, : t // block * block]
                share = torch.bincount(seen, minlength=C).double() / max(len(seen), 1)
                total += (share * p[b, r, t]).sum()
    expected = C * total / (B * R * T)
    assert torch.allclose(balance_loss(logits, cluster, block), expected)


def triton_device():
    """Where the fused routing's Triton kernels run: CUDA, or the CPU under Triton's interpreter (TRITON_INTERPRET=1)."""
    import importlib.util
    import os

    if importlib.util.find_spec("triton") is None:
        pytest.skip("needs Triton")
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    pytest.skip("needs a CUDA device (or TRITON_INTERPRET=1)")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B,T,R,C,block", [(2, 37, 3, 5, 8), (1, 1, 2, 1, 1), (2, 300, 1, 91, 32), (1, 129, 8, 17, 16), (1, 300, 2, 7, 128),
                                            (1, 40, 2, 170, 16)], ids=str)
def test_fused_routing_equals_plain(B, T, R, C, block, dtype):
    """fused_routing's kernels against routing's definitions on the same noise: cluster ids, own gates,
    balance loss, and the logits' gradient through both (the router learns through both), the fused kernels
    reading rows padded to `padded_width` as lca gives them. C = 170: rows of 176, whose tail tile reaches past them."""
    device = triton_device()
    from attnbench.variants import fused_routing
    from attnbench.variants.routing import balance_from_block_sums, balance_loss, route, straight_through

    torch.manual_seed(0)
    logits = (torch.randn(B, T, R, C, device=device) * 3).to(dtype).requires_grad_(True)
    tau = torch.tensor(0.7, device=device)
    seed = fused_routing.draw_seed(device)
    grad_own, weight = torch.randn(B, T, R, device=device), 0.37

    padded = F.pad(logits, (0, fused_routing.padded_width(C) - C))  # zero logits past C, as lca's router gives them
    cluster, y_own, sums, *_ = fused_routing.gumbel_route(padded, seed, tau, block, C)
    fused_balance = balance_from_block_sums(sums, cluster.transpose(1, 2), block)
    fused_loss = (grad_own * straight_through(y_own)).sum() + weight * fused_balance
    fused_grad, padded_grad = torch.autograd.grad(fused_loss, (logits, padded))

    plain_cluster, soft = route(logits, tau, fused_routing.gumbel_noise(seed, [B, T, R, C]))
    plain_own = soft.gather(-1, plain_cluster.unsqueeze(-1)).squeeze(-1)
    plain_balance = balance_loss(logits.transpose(1, 2), plain_cluster.transpose(1, 2), block)
    plain_loss = (grad_own * straight_through(plain_own)).sum() + weight * plain_balance
    (plain_grad,) = torch.autograd.grad(plain_loss, logits)

    assert torch.equal(cluster, plain_cluster)
    assert rel_err(y_own, plain_own) < 1e-5
    assert rel_err(fused_balance, plain_balance) < 1e-5
    assert fused_grad.dtype == dtype
    assert not padded_grad[..., C:].any()  # the padding's zero weight rows would pass a NaN on to x's gradient
    err = rel_err(fused_grad, plain_grad)
    assert err < (1e-5 if dtype == torch.float32 else 1e-2), \
        f"logits' gradient rel err {err:.2e}: max |fused| {fused_grad.abs().max():.2e}, max |plain| {plain_grad.abs().max():.2e}"


@pytest.mark.gpu
def test_fused_noise_is_gumbel_and_fixed_by_the_seed():
    """Gumbel(0, 1): mean Euler's gamma 0.5772, standard deviation pi / sqrt(6) = 1.2825; a manual seed repeats it."""
    device = triton_device()
    from attnbench.variants import fused_routing

    shape = [64, 64, 64] if device == "cuda" else [16, 32, 32]  # the interpreter is slow
    torch.manual_seed(3)
    noise = fused_routing.gumbel_noise(fused_routing.draw_seed(device), shape)
    torch.manual_seed(3)
    again = fused_routing.gumbel_noise(fused_routing.draw_seed(device), shape)
    other = fused_routing.gumbel_noise(fused_routing.draw_seed(device), shape)
    assert torch.equal(noise, again) and not torch.equal(noise, other)
    assert noise.mean().item() == pytest.approx(0.5772, abs=0.02)
    assert noise.std().item() == pytest.approx(1.2825, abs=0.02)


@pytest.mark.parametrize("C", [91, 182], ids=["one-tile", "two-tiles"])
def test_route_kernels_are_read_as_writing_their_outputs_alone(C, monkeypatch):
    """Inductor copies every tensor that torch's analysis of a user Triton kernel (a triton_op's) reads as written,
    before each call. A route backward read as writing the logits and y cost two copies of them per step, 0.19 ms at
    32K on the H200 (stop 31). Without a GPU the analysis compiles the kernels to Triton IR for an sm90 target."""
    pytest.importorskip("triton")
    from torch._higher_order_ops import triton_kernel_wrap

    if not hasattr(triton_kernel_wrap, "identify_accessed_tensors"):
        pytest.skip("this torch's analysis of Triton kernels has another interface")
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    from attnbench.variants import fused_routing

    if not torch.cuda.is_available():
        class Sm90:
            def get_current_target(self):
                return GPUTarget("cuda", 90, 32)

        monkeypatch.setattr(driver, "_active", Sm90())
    B, T, R, block = 1, 64, 2, 16
    W, n_blocks = fused_routing.padded_width(C), T // block
    tiles = fused_routing.column_tiles(W)
    logits = torch.zeros(B, T, R, W, dtype=torch.bfloat16)
    rows = dict(cluster_ptr=torch.zeros(B, T, R, dtype=torch.int64), own_ptr=torch.zeros(B, T, R),
                soft_ptr=torch.zeros_like(logits), stats_ptr=torch.zeros(B, T, R, 2))
    sizes = dict(T=T, R=R, C=C, W=W, n_blocks=n_blocks, block=block, ROWS=fused_routing.ROWS, HEAD=tiles["HEAD"], TAIL=tiles["TAIL"])

    def written(kernel, **kwargs):
        accesses = triton_kernel_wrap.identify_accessed_tensors(kernel, kwargs, {})
        return sorted(access.name for access in accesses.read_writes.writes)

    assert written(fused_routing.route_kernel, logits_ptr=logits, seed_ptr=torch.zeros(1, dtype=torch.int64), tau_ptr=torch.ones(1),
                   sums_ptr=torch.zeros(B, R, n_blocks, C), BLOCK_C=tiles["BLOCK_C"], **rows, **sizes) == sorted([*rows, "sums_ptr"])
    assert written(fused_routing.route_backward_kernel, logits_ptr=logits, tau_ptr=torch.ones(1), grad_own_ptr=torch.zeros(B, T, R),
                   grad_sums_ptr=torch.zeros(B, R, n_blocks, C), grad_ptr=torch.zeros_like(logits), parts=1, **rows, **sizes) == ["grad_ptr"]


def test_models_pass_on_their_variants_compile_options():
    """lca (and sca, its subclass) ask Inductor not to pad their router logits' rows; a model holding them passes
    that to torch.compile, and the key is an Inductor setting (an unknown one would fail only when compiling)."""
    from torch._inductor import config as inductor_config

    from attnbench.model import ByteLM, ModelConfig

    for name in ("lca", "sca"):
        options = ByteLM(ModelConfig(name, d_model=16, n_layers=2, n_heads=2, seq_len=8)).compile_options
        assert options == {"comprehensive_padding": False}, name
        assert all(hasattr(inductor_config, key) for key in options)
    assert ByteLM(ModelConfig("mha", d_model=16, n_layers=2, n_heads=2, seq_len=8)).compile_options == {}


def test_route_soft_assignment_is_softmax_of_noisy_logits_over_tau():
    """Training's soft assignment "y_t = softmax((r_t + g_t) / tau)" and c_t = argmax y_t, at tau = 0.5 (where
    dividing and multiplying by tau differ)."""
    from attnbench.variants.routing import route

    torch.manual_seed(0)
    logits, noise = torch.randn(2, 3, 7, 5), torch.randn(2, 3, 7, 5)
    cluster, soft = route(logits, torch.tensor(0.5), noise)
    expected = ((logits + noise) / 0.5).softmax(dim=-1)
    assert torch.allclose(soft, expected, atol=1e-6), (soft - expected).abs().max()
    assert torch.equal(cluster, expected.argmax(dim=-1))


@pytest.mark.parametrize("path", ["reference", "efficient"])
def test_balance_loss_reads_the_noiseless_router_probabilities(path):
    """aux_loss = balance * C * mean_t sum_c F_t[c] p_t[c] with "p_t = softmax(r_t)": the router's logits without the
    Gumbel noise, and F_t from the clusters training routed by (the noisy draw)."""
    from attnbench.variants.routing import balance_loss

    T, H, D = 40, 2, 8
    layer = lca_layer(T, H, D, clusters=4, balance=0.5).train()
    layer.path = path
    x = torch.randn(2, T, H * D)
    layer(x)
    with torch.no_grad():
        logits = layer.router_logits(x).transpose(1, 2)  # (B, R, T, C), noiseless
        expected = 0.5 * balance_loss(logits, layer.last_clusters, layer.balance_block)
    assert torch.allclose(layer.aux_loss.detach(), expected, rtol=1e-5), (layer.aux_loss.item(), expected.item())


@pytest.mark.parametrize("name", ["lca", "sca"])
def test_fresh_layer_starts_at_tau_start(name):
    """"tau anneals from tau_start to tau_end over training": before any set_progress a layer's tau is tau_start."""
    layer = lca_layer(16, 2, 8, name=name, tau_start=2.0, tau_end=0.5)
    assert layer.tau.item() == pytest.approx(2.0)


@pytest.mark.parametrize("router, rows", [("head", 3 * 5), ("shared", 5)])
def test_router_has_one_router_per_head_or_one_shared(router, rows):
    """"logits r_t = W_r x_t (W_r: d_model x C, per head or shared across heads: router: head|shared)": H C rows per
    head, C when shared."""
    H, D = 3, 4
    layer = lca_layer(16, H, D, clusters=5, router=router)
    assert tuple(layer.router.weight.shape) == (rows, H * D)
    assert tuple(layer.router_logits(torch.randn(2, 16, H * D)).shape) == (2, 16, rows // 5, 5)


def test_options_default_to_the_documented_choices():
    """lca.py's choices where the spec is open: "tau_start = 1, tau_end = 0.1"; the balance loss's blocks are "the
    smallest power of two >= sqrt(seq_len)", with no floor of 16 (1 at T = 1, 4 at T = 16, 8 at T = 37)."""
    from attnbench.variants.lca import LearnedClusterOptions

    options = LearnedClusterOptions()
    assert (options.tau_start, options.tau_end) == (1.0, 0.1)
    layer = build_attention("lca", 16, 2, 16)
    assert (layer.options.tau_start, layer.options.tau_end, layer.tau.item()) == (1.0, 0.1, 1.0)
    assert [build_attention("lca", 16, 2, T).balance_block for T in (1, 16, 37)] == [1, 4, 8]


def test_gumbel_noise_has_the_gumbel_mean_and_spread():
    """"Gumbel noise as -log(-log u)": a standard Gumbel has mean Euler's gamma 0.5772 and std pi / sqrt(6) 1.2825
    (an exponential, -log u, has both 1). 10^6 seeded draws: standard errors ~0.0013, tolerance 0.02."""
    from attnbench.variants.routing import gumbel_noise

    torch.manual_seed(0)
    g = gumbel_noise(torch.zeros(1000, 1000)).double()
    assert g.mean().item() == pytest.approx(0.5772, abs=0.02)
    assert g.std().item() == pytest.approx(1.2825, abs=0.02)
