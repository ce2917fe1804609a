"""The byte-level decoder-only Transformer; its attention sub-layer comes from the variant registry.

Pre-norm blocks, learned absolute positions, GELU MLP, tied input/output
embeddings. Learned positions rather than rotary: they are added once at the
input, so every variant sees the same q/k projections; rotary would rotate q and
k inside the attention and interact differently with la's kernel features and
cka's block-mean summaries, mixing a positional-encoding effect into the
comparison of attention mechanisms.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .variants import Attention, build_attention

VOCAB = 256  # bytes


@dataclass(frozen=True)
class ModelConfig:
    variant: str
    d_model: int
    n_layers: int
    n_heads: int
    seq_len: int
    mlp_ratio: int = 4
    dropout: float = 0.0
    variant_options: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model, bias=False)
        self.down = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.down(F.gelu(self.up(x))))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_attn = nn.LayerNorm(cfg.d_model)
        self.attn = build_attention(cfg.variant, cfg.d_model, cfg.n_heads, cfg.seq_len, cfg.variant_options)
        if not self.attn.causal:  # a language model that sees the future reports an impossible bpb
            raise ValueError(f"variant {cfg.variant} with options {cfg.variant_options} is not causal; a language model needs causal attention")
        self.ln_mlp = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        x = x + self.dropout(self.attn(self.ln_attn(x)))
        return x + self.mlp(self.ln_mlp(x))


class ByteLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(VOCAB, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, VOCAB, bias=False)
        self.head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        # Residual projections scaled down with depth (GPT-2).
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.down.weight")):
                nn.init.normal_(p, std=0.02 / (2 * cfg.n_layers) ** 0.5)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    @property
    def attention_layers(self) -> list[Attention]:
        return [block.attn for block in self.blocks]

    @property
    def compile_options(self) -> dict[str, object]:
        """The Inductor settings its attention layers ask for, for torch.compile(model, options=...)."""
        return {key: value for attn in self.attention_layers for key, value in attn.compile_options.items()}

    def set_attention_path(self, path: str) -> None:
        for attn in self.attention_layers:
            attn.path = path

    def set_progress(self, fraction: float) -> None:
        for attn in self.attention_layers:
            attn.set_progress(fraction)

    @property
    def noisy_routing(self) -> bool:
        """Whether an attention layer routes by sampling in training (lca, sca), so evaluation has two readings."""
        return any(attn.noisy_routing for attn in self.attention_layers)

    @contextmanager
    def sampled_routing(self) -> Iterator[None]:
        """Evaluation that routes as training does, with noise (torch's generator; no balance loss)."""
        for attn in self.attention_layers:
            attn.sample_in_eval = True
        try:
            yield
        finally:
            for attn in self.attention_layers:
                attn.sample_in_eval = False

    def attention_stats(self) -> dict[str, torch.Tensor]:
        """The attention layers' diagnostics of the last forward (cluster sizes, ...), averaged over the layers
        (0-d tensors, see Attention.stats)."""
        per_layer = [attn.stats() for attn in self.attention_layers]
        keys = sorted(set().union(*per_layer))
        return {k: sum(s[k] for s in per_layer if k in s) / sum(k in s for s in per_layer) for k in keys}

    def aux_loss(self) -> torch.Tensor | None:
        """Sum of the auxiliary losses the attention layers set in the last forward, or None."""
        losses = [attn.aux_loss for attn in self.attention_layers if attn.aux_loss is not None]
        return torch.stack(losses).sum() if losses else None

    def with_aux_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The training objective: `loss` plus the attention layers' auxiliary losses of the last forward, if any."""
        aux = self.aux_loss()
        return loss if aux is None else loss + aux

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - (self.tok_emb.weight.numel() + self.pos_emb.weight.numel() if non_embedding else 0)

    def flops_per_token(self) -> int:
        """Training FLOPs per token, 6 N + 6 L T d as the design's gpu-notes.md counts them (N non-embedding
        parameters; the second term is causal softmax attention's score and value products, T / 2 keys per query on
        average, forward and backward): the count MFU uses for every variant, so MFU compares throughput at one
        fixed amount of work."""
        return 6 * self.num_params() + 6 * self.cfg.n_layers * self.cfg.seq_len * self.cfg.d_model

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """idx (B, T) bytes -> logits (B, T, 256), and the mean cross-entropy in nats when targets are given."""
        B, T = idx.shape
        if T > self.cfg.seq_len:
            raise ValueError(f"sequence length {T} exceeds the model's seq_len {self.cfg.seq_len}")
        pos = torch.arange(T, device=idx.device)
        x = self.dropout(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, VOCAB), targets.reshape(-1))
        return logits, loss


def save_model(model: ByteLM, path) -> None:
    """Write the weights and the config as plain data (loadable with weights_only=True), atomically."""
    from .files import atomic_path

    with atomic_path(path) as tmp:
        torch.save({"config": model.cfg.to_dict(), "state_dict": model.state_dict()}, tmp)


def load_model(path, device: str | torch.device = "cpu", expected: ModelConfig | None = None) -> ByteLM:
    """Load a model saved by `save_model`; refuse one whose config differs from `expected`."""
    blob = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(blob, dict) or not {"config", "state_dict"} <= blob.keys() or not isinstance(blob["config"], dict):
        found = f"keys {sorted(map(str, blob))[:6]}" if isinstance(blob, dict) else f"a {type(blob).__name__}"
        raise ValueError(f"{path} is not a model written by save_model (it holds {found}, no model config); "
                         "a training checkpoint or a bare state_dict cannot be loaded as a model")
    cfg = ModelConfig(**blob["config"])
    if expected is not None and cfg != expected:
        diff = {k: (v, expected.to_dict()[k]) for k, v in cfg.to_dict().items() if expected.to_dict()[k] != v}
        raise ValueError(f"{path} holds a different model than configured (saved vs configured: {diff})")
    model = ByteLM(cfg).to(device)
    model.load_state_dict(blob["state_dict"])
    return model
