"""The GPT model shared by every stage: a decoder-only transformer whose
architecture choices are fields of `ModelConfig`.

Two layouts match `transformers` exactly (see `LAYOUTS` and `gpt/hf.py`):
`gpt2` (learned positions, LayerNorm with bias, tanh-approximated GELU, tied
embeddings) and `llama` (RoPE, RMSNorm, SwiGLU, no bias, grouped-query
attention). Other combinations train and generate but have no export target.

Shape key: B batch, T new tokens, S keys (cached plus new), C = n_embd,
H = n_head, K = n_kv_head, D = head_dim, V = vocab_size.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Literal, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt.config import option
from gpt.decoding import KVCache, decode_step

PosEncoding = Literal["learned", "rope", "alibi", "none"]
NormKind = Literal["layernorm", "rmsnorm"]
MlpKind = Literal["gelu", "swiglu"]


@dataclass
class ModelConfig:
    """Architecture of a GPT. Every experiment on the architecture is a change here."""

    vocab_size: int = option(8192, "number of token ids the embedding and output layer hold; pretraining sets it from the tokenizer")
    n_layer: int = option(6, "number of transformer blocks")
    n_head: int = option(6, "number of query heads per attention layer")
    n_kv_head: int | None = option(None, "number of key/value heads: None for n_head (multi-head), 1 for multi-query, a divisor of n_head for grouped-query attention")
    n_embd: int = option(384, "width of the residual stream (hidden size)")
    block_size: int = option(256, "maximum sequence length in tokens (the context window)")
    pos_encoding: PosEncoding = option("learned", "positional encoding: learned absolute embeddings, rope (rotary), alibi (linear attention biases) or none")
    norm: NormKind = option("layernorm", "normalization layer: layernorm or rmsnorm")
    mlp: MlpKind = option("gelu", "feed-forward block: gelu (tanh approximation, as GPT-2) or swiglu (gated, as Llama)")
    mlp_hidden: int | None = option(None, "hidden width of the feed-forward block; None for 4*n_embd (gelu) or 8/3*n_embd rounded up to a multiple of 64 (swiglu)")
    bias: bool = option(True, "add biases to linear layers and LayerNorm")
    dropout: float = option(0.0, "dropout probability on embeddings, attention weights and residual branches during training")
    tie_embeddings: bool = option(True, "share the token embedding matrix with the output layer")
    norm_eps: float = option(1e-5, "epsilon added inside the normalization layers")
    rope_theta: float = option(10000.0, "base of the rotary frequencies (rope only)")
    init_std: float = option(0.02, "standard deviation of the normal initialization of weights")
    qk_norm: bool = option(False, "RMSNorm over each head's queries and keys, before RoPE and the dot product (QK-norm per head, as Qwen3 and Gemma 3)")
    sliding_window: int | None = option(None, "attend to at most this many most recent positions, the token itself included (sliding-window attention, as Mistral); None for the whole context")

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def ffn_hidden(self) -> int:
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        if self.mlp == "gelu":
            return 4 * self.n_embd
        return 64 * math.ceil(8 * self.n_embd / 3 / 64)

    @classmethod
    def from_layout(cls, layout: str, **overrides) -> "ModelConfig":
        """Build a config with the fields of a named layout ("gpt2" or "llama"), then `overrides`."""
        if layout not in LAYOUTS:
            raise ValueError(f"unknown model layout {layout!r}; expected one of {sorted(LAYOUTS)}")
        return cls(**{**LAYOUTS[layout], **overrides})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model config fields {unknown}; known fields are {sorted(known)}")
        return cls(**values)

    def problems(self) -> list[str]:
        found = []
        for name in ("vocab_size", "n_layer", "n_head", "n_embd", "block_size"):
            if getattr(self, name) < 1:
                found.append(f"model.{name} must be a positive integer, got {getattr(self, name)}")
        if found:
            return found
        if self.n_embd % self.n_head:
            found.append(f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head}); choose n_embd = n_head * head_dim")
        n_kv_head = self.n_kv_head if self.n_kv_head is not None else self.n_head
        if n_kv_head < 1 or self.n_head % n_kv_head:
            found.append(f"model.n_kv_head ({n_kv_head}) must divide model.n_head ({self.n_head}): use 1 (multi-query), a divisor, or n_head")
        if self.pos_encoding == "rope" and self.n_embd % self.n_head == 0 and self.head_dim % 2:
            found.append(f"rope needs an even head_dim, got n_embd/n_head = {self.head_dim}; change n_embd or n_head")
        if not 0.0 <= self.dropout < 1.0:
            found.append(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.mlp_hidden is not None and self.mlp_hidden < 1:
            found.append(f"model.mlp_hidden must be positive or None, got {self.mlp_hidden}")
        if self.sliding_window is not None and self.sliding_window < 1:
            found.append(f"model.sliding_window must be a positive number of positions or None (no window), "
                         f"got {self.sliding_window}")
        return found


# Field values of the two layouts that export to `transformers` without loss.
LAYOUTS: dict[str, dict] = {
    "gpt2": dict(pos_encoding="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True, norm_eps=1e-5),
    "llama": dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False, norm_eps=1e-5),
}


class GPTOutput(NamedTuple):
    logits: torch.Tensor | None  # (B, T, V), None when compute_logits=False
    hidden: torch.Tensor | None  # (B, T, C) after the final norm, when return_hidden=True
    loss: torch.Tensor | None  # scalar, when targets are given


def alibi_slopes(n_head: int) -> torch.Tensor:
    """Head slopes of ALiBi (Press et al. 2022, "Train Short, Test Long", section 3).

    For a power of two n the slopes are 2^(-8i/n), i = 1..n; otherwise the
    slopes of the nearest lower power of two are followed by every other slope
    of the next power of two.
    """
    def powers(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_head).is_integer():
        return torch.tensor(powers(n_head))
    lower = 2 ** math.floor(math.log2(n_head))
    return torch.tensor(powers(lower) + powers(2 * lower)[0::2][: n_head - lower])


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines and sines of rotary embeddings for (B, T) positions, each (B, 1, T, D)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq  # (B, T, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (B, T, D): the rotate-half layout of Llama
    return angles.cos()[:, None], angles.sin()[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, D) queries or keys: pairs (i, i + D/2) turn by their position's angle."""
    half = x.size(-1) // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def packed_attention_mask(segments: torch.Tensor) -> torch.Tensor:
    """Build the causal mask of rows that pack several sequences.

    Args:
        segments: (B, T), the index of the sequence each token belongs to, -1 on padding.

    Returns:
        A boolean (B, 1, T, T) mask, True where a query may attend to a key: an earlier or
        the same position of its own sequence. Padding forms a segment of its own, so each
        padding query still attends to itself and no row of the softmax is empty.
    """
    T = segments.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    same_segment = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
    return (same_segment & causal)[:, None]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        kv_width = config.n_kv_head * config.head_dim
        self.q_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.k_proj = nn.Linear(config.n_embd, kv_width, bias=config.bias)
        self.v_proj = nn.Linear(config.n_embd, kv_width, bias=config.bias)
        self.o_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.q_norm = nn.RMSNorm(config.head_dim, eps=config.norm_eps) if config.qk_norm else None
        self.k_norm = nn.RMSNorm(config.head_dim, eps=config.norm_eps) if config.qk_norm else None
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, layer: int, rope: tuple[torch.Tensor, torch.Tensor] | None,
                attn_mask: torch.Tensor | None, kv_cache: KVCache | None) -> torch.Tensor:
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            # One gain vector of size D, shared by all heads; each head's vector is normalized alone.
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)  # (B, K, S, D)
        if attn_mask is not None and attn_mask.is_floating_point() and attn_mask.dtype != q.dtype:
            attn_mask = attn_mask.to(q.dtype)  # ALiBi biases follow autocast's dtype
        # Without a mask the keys are exactly the T new tokens, so the fast causal kernel applies.
        y = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=attn_mask,
            is_causal=attn_mask is None and T > 1,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_head != self.n_head,
        )
        y = y.transpose(1, 2).reshape(B, T, C)
        y = self.o_proj(y)
        return F.dropout(y, self.dropout, True) if self.training and self.dropout else y


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hidden = config.ffn_hidden
        self.gated = config.mlp == "swiglu"
        if self.gated:
            self.gate_proj = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.up_proj = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.down_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            h = F.silu(self.gate_proj(x)) * self.up_proj(x)
        else:
            h = F.gelu(self.up_proj(x), approximate="tanh")
        h = self.down_proj(h)
        return F.dropout(h, self.dropout, True) if self.training and self.dropout else h


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.norm_1 = make_norm(config)
        self.attn = Attention(config)
        self.norm_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, layer, rope, attn_mask, kv_cache):
        x = x + self.attn(self.norm_1(x), layer, rope, attn_mask, kv_cache)
        return x + self.mlp(self.norm_2(x))


class GPT(nn.Module):
    """Decoder-only transformer returning logits, and on request the final hidden states and the loss."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        problems = config.problems()
        if problems:
            raise ValueError("invalid model config:\n  " + "\n  ".join(problems))
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.pos_encoding == "learned" else None
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        if config.pos_encoding == "alibi":
            self.register_buffer("alibi", alibi_slopes(config.n_head), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 initialization: N(0, init_std), with the residual output projections scaled
        by 1/sqrt(2 n_layer) so that the residual stream's variance does not grow with depth."""
        std = self.config.init_std
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                scale = 1 / math.sqrt(2 * self.config.n_layer) if name.endswith(("o_proj", "down_proj")) else 1.0
                nn.init.normal_(module.weight, mean=0.0, std=std * scale)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                module.reset_parameters()

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Count distinct parameters (a tied matrix counts once). With `exclude_embeddings`,
        leave out the token and position embeddings and the output layer, as scaling-law
        papers count N (Kaplan et al. 2020)."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= self.wte.weight.numel()
            if self.wpe is not None:
                total -= self.wpe.weight.numel()
            if not self.config.tie_embeddings:
                total -= self.lm_head.weight.numel()
        return total

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs (forward and backward) per token: 6 per weight used in a matmul, plus
        attention scores and values, 12 * n_layer * n_embd * seq_len (the PaLM paper's estimate,
        Chowdhery et al. 2022, appendix B). Causal masking is not discounted. Embedding lookups
        are free; the output layer counts. With a sliding window a query attends to at most
        sliding_window keys, so seq_len is capped there (the masked kernel still computes the
        whole score matrix, so this counts useful FLOPs, not executed ones)."""
        T = seq_len or self.config.block_size
        if self.config.sliding_window is not None:
            T = min(T, self.config.sliding_window)
        matmul_weights = sum(p.numel() for p in self.blocks.parameters() if p.dim() == 2)
        matmul_weights += self.lm_head.weight.numel()
        return 6 * matmul_weights + 12 * self.config.n_layer * self.config.n_embd * T

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        return_hidden: bool = False,
        compute_logits: bool = True,
        logits_to_keep: int = 0,
        loss_reduction: Literal["mean", "sum"] = "mean",
    ) -> GPTOutput:
        """Run the model on token ids.

        Args:
            idx: (B, T) token ids.
            targets: (B, T) next-token ids; -100 marks positions without loss.
            attention_mask: (B, T) or (B, S) with 1 for real tokens and 0 for padding, or
                a boolean (B, 1, T, S) mask used as is (True = may attend), for packed rows;
                a sliding window, when configured, still applies on top of it.
            position_ids: (B, T) positions; by default counted over real tokens only, so a
                left-padded row gets the positions it would have without padding.
            kv_cache: cache to read earlier keys from and append the new ones to. With one
                token per row and no mask, positions or targets, in eval mode without
                gradients, the call runs the one-token step of gpt/decoding.py.
            return_hidden: also return the final hidden states (B, T, C).
            compute_logits: skip the output layer when False (reward and value heads).
            logits_to_keep: when above 0, compute logits for the last `logits_to_keep`
                positions only (a generation prefill needs one); ignored with targets.
            loss_reduction: "mean" over target tokens, or "sum" for accumulation by token count.

        Returns:
            GPTOutput(logits, hidden, loss).
        """
        B, T = idx.shape
        past = kv_cache.length if kv_cache is not None else 0
        if past + T > self.config.block_size and self.config.pos_encoding == "learned":
            raise ValueError(f"sequence of {past + T} tokens exceeds block_size {self.config.block_size} of this model")
        if kv_cache is not None and past + T > kv_cache.max_length:
            raise ValueError(f"KV cache too small: it has room for {kv_cache.max_length} positions, {past + T} requested")
        if (kv_cache is not None and T == 1 and targets is None and attention_mask is None and position_ids is None
                and not self.training and not torch.is_grad_enabled()):
            # A step of a generation loop: gpt.decoding computes the same with less Python work.
            step = decode_step(self, idx, kv_cache, compute_logits)
            if step is not None:
                logits, hidden = step
                return GPTOutput(logits, hidden if return_hidden else None, None)
        if kv_cache is not None:
            kv_cache.mark_changed()

        key_mask, position_ids, custom_mask = self._masks_and_positions(idx, attention_mask, position_ids, kv_cache)
        if custom_mask is not None:
            attn_mask = custom_mask
            window = self._window_mask(position_ids, kv_cache, custom_mask.size(-1))
            if window is not None:
                attn_mask = attn_mask & window
            if self.config.pos_encoding == "alibi":
                attn_mask = self._alibi_bias(position_ids, kv_cache, attn_mask)
        else:
            attn_mask = self._attention_bias(key_mask, position_ids, kv_cache, T)

        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(position_ids)
        if self.training and self.config.dropout:
            x = F.dropout(x, self.config.dropout, True)
        rope = None
        if self.config.pos_encoding == "rope":
            rope = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta)
        for layer, block in enumerate(self.blocks):
            x = block(x, layer, rope, attn_mask, kv_cache)
        if kv_cache is not None:
            kv_cache.length += T
        hidden = self.norm_f(x)

        if targets is not None or (compute_logits and not logits_to_keep):
            logits = self.lm_head(hidden)
        elif compute_logits:
            logits = self.lm_head(hidden[:, -logits_to_keep:])
        else:
            logits = None
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=-100, reduction=loss_reduction)
        return GPTOutput(logits if compute_logits else None, hidden if return_hidden else None, loss)

    def _masks_and_positions(self, idx, attention_mask, position_ids, kv_cache):
        """Return the (B, S) key mask (None when every key is real), the (B, T) positions of the
        new tokens, and a custom 4-D mask when the caller gave one."""
        B, T = idx.shape
        past = kv_cache.length if kv_cache is not None else 0
        custom = None
        key_mask = None
        if attention_mask is not None and attention_mask.dim() == 4:
            custom = attention_mask.bool()
        elif attention_mask is not None:
            new_mask = attention_mask[:, -T:].bool()
            key_mask = new_mask if kv_cache is None else torch.cat([kv_cache.mask[:, :past], new_mask], dim=1)
        elif kv_cache is not None and past > 0 and kv_cache.padded:
            key_mask = torch.cat([kv_cache.mask[:, :past], idx.new_ones(B, T, dtype=torch.bool)], dim=1)

        if position_ids is None:
            if key_mask is not None:
                position_ids = (key_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                start = kv_cache.positions[:, past - 1:past] + 1 if past > 0 else 0
                position_ids = (torch.arange(T, device=idx.device)[None, :] + start).expand(B, T)
        if kv_cache is not None:
            kv_cache.positions[:, past:past + T] = position_ids
            kv_cache.mask[:, past:past + T] = True if key_mask is None else key_mask[:, -T:]
            # Set whenever a mask was given, without reading its values (a device sync per step).
            kv_cache.padded = kv_cache.padded or key_mask is not None
        return key_mask, position_ids, custom

    def _attention_bias(self, key_mask, position_ids, kv_cache, T):
        """Build the attention mask for SDPA: None for plain causal attention, otherwise a
        boolean (B, 1, T, S) mask, or a float (B, H, T, S) bias for ALiBi."""
        past = kv_cache.length if kv_cache is not None else 0
        S = past + T
        alibi = self.config.pos_encoding == "alibi"
        window = self._window_mask(position_ids, kv_cache, S)
        if key_mask is None and not alibi and window is None and (past == 0 or T == 1):
            return None  # causal over the new tokens, or one query that sees every key
        device = position_ids.device
        q_index = torch.arange(past, S, device=device)[:, None]
        allowed = (torch.arange(S, device=device)[None, :] <= q_index)[None, None]  # (1, 1, T, S)
        if window is not None:
            allowed = allowed & window
        if key_mask is not None:
            allowed = allowed & key_mask[:, None, None, :]
            # A padding query would attend to no key at all and SDPA would return NaN, so it
            # attends to itself.
            allowed = allowed | (torch.arange(S, device=device)[None, :] == q_index)[None, None]
        if not alibi:
            return allowed
        return self._alibi_bias(position_ids, kv_cache, allowed)

    def _alibi_bias(self, position_ids, kv_cache, allowed):
        """Build the float (B, H, T, S) ALiBi bias, -inf where the boolean mask `allowed` is False."""
        S = allowed.size(-1)
        key_positions = kv_cache.positions[:, :S] if kv_cache is not None else position_ids
        distance = (position_ids[:, :, None] - key_positions[:, None, :]).clamp(min=0)  # (B, T, S)
        bias = -self.alibi.to(position_ids.device)[None, :, None, None] * distance[:, None].float()  # (B, H, T, S)
        return bias.masked_fill(~allowed, float("-inf"))

    def _window_mask(self, position_ids, kv_cache, S):
        """Build the sliding window as a boolean (B, 1, T, S) mask, True where the key is fewer than
        sliding_window positions before the query; return None when no query reaches that far back.

        Distances are taken between positions, not cache columns, so left padding does not
        shorten a row's window. Keys after the query are left to the causal mask.
        """
        window = self.config.sliding_window
        # Positions grow by at most one per column (the default positions do; positions a caller
        # passes are assumed to), so with S <= window every key is inside the window.
        if window is None or S <= window:
            return None
        key_positions = kv_cache.positions[:, :S] if kv_cache is not None else position_ids
        distance = position_ids[:, :, None] - key_positions[:, None, :]  # (B, T, S)
        return (distance < window)[:, None]
