"""The KV cache of GPT, and the one-token decoding step over it, with less work per
token than `GPT.forward`.

`KVCache` preallocates the keys and values of every layer; `GPT.forward` reads and
extends it (it is imported from gpt.model too).

`GPT.forward` hands a call to `decode_step` when it gets one new token per row and a
KV cache, without an attention mask, positions or targets, in eval mode with gradients
off: the call every generation loop makes once per token. The step computes what
`GPT.forward` computes for that call, up to float rounding, with fewer operations:

- Each layer calls F.layer_norm (or F.rms_norm) and matrix products on the modules'
  weights instead of calling the modules. On the CPU of docs/serving.md, an nn.Linear
  call took 3 microseconds longer than F.linear on its weights, against 7 for the whole
  product of one row with a 256 x 256 matrix, and a step made dozens of module calls.
- q, k and v come from one matrix product on their three weight matrices concatenated,
  and so do the gate and up projections of SwiGLU.
- On a CPU, each weight matrix is laid out once for the matrix product that was
  fastest for it (see `_Matmuls.matmul`).
- The positions, the RoPE angles and the attention mask are computed once per step for
  all layers. Without padding, ALiBi or a sliding window shorter than the sequence, no
  mask is built at all.
- Positions come from the cache: when decoding starts, every free column is given the
  position and key mask of a real token, so a step reads them instead of counting real
  tokens.

The concatenated and relaid weights are copies, made when a cache starts decoding and
dropped with the cache, so parameters, state dicts, LoRA adapters and exports only ever
see the model's own matrices. A projection or norm that is not exactly nn.Linear,
nn.LayerNorm or nn.RMSNorm, or that has forward hooks (a peft LoRA layer, for example),
is called as a module, so adapters and hooks still apply. A model whose blocks are of
other classes, or with global forward hooks, is not handled here: `decode_step` returns
None and `GPT.forward` runs its general path.

Limits: keys and values are sliced to the cached length, so tensor shapes change at
every step. That suits eager execution, but CUDA graphs or torch.compile would need a
fixed length with a mask over the unused columns. Hooks registered after a cache has
started decoding are not seen by its later steps.
NOTE: the weight copies double the weights' memory while a cache decodes, and a server
with several running batches keeps one set per batch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules import module as module_hooks

if TYPE_CHECKING:
    from gpt.model import GPT, Block, ModelConfig

Layer = Callable[[torch.Tensor], torch.Tensor]


class KVCache:
    """Preallocated keys and values of every layer for incremental decoding.

    Rows advance together: all B rows contain `length` cached positions, padding
    included, and `mask` marks which of them are real tokens. Columns from `length` on
    are free: the one-token step below fills their `positions` and `mask` ahead of its
    writes, and GPT.forward overwrites them when it writes there. A cache is only valid
    for the weights that filled it.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_length: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        shape = (config.n_layer, batch_size, config.n_kv_head, max_length, config.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.positions = torch.zeros(batch_size, max_length, device=device, dtype=torch.long)
        self.mask = torch.zeros(batch_size, max_length, device=device, dtype=torch.bool)
        self.length = 0
        self.max_length = max_length
        self.padded = False  # whether any cached position came with an attention mask
        # What the one-token steps reuse between calls (a DecodePlan), built at the first step.
        self.decode_plan = None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new (B, K, T, D) keys and values of `layer`; return all keys and values so far.

        They are returned in the dtype of `k`, so a cache kept in a lower precision is cast back
        for attention."""
        end = self.length + k.size(2)
        self.keys[layer, :, :, self.length:end] = k
        self.values[layer, :, :, self.length:end] = v
        keys, values = self.keys[layer, :, :, :end], self.values[layer, :, :, :end]
        return keys.to(k.dtype), values.to(v.dtype)

    def reorder(self, index: torch.Tensor) -> None:
        """Keep only the rows in `index` (for example the unfinished sequences of a batch)."""
        self.keys = self.keys[:, index]
        self.values = self.values[:, index]
        self.positions = self.positions[index]
        self.mask = self.mask[index]
        self.mark_changed()

    def trim_left(self) -> None:
        """Drop the leading columns that are padding in every row.

        After the longest rows leave a batch, the others keep padding columns that no row
        needs. Removing them makes the cache length equal to the longest remaining sequence,
        which the learned position layout needs (it rejects a cache longer than block_size),
        and attention gets cheaper too.
        """
        first_real = int(self.mask[:, :self.length].any(dim=0).long().argmax())
        if first_real == 0:
            return
        self.keys = self.keys[:, :, :, first_real:]
        self.values = self.values[:, :, :, first_real:]
        self.positions = self.positions[:, first_real:]
        self.mask = self.mask[:, first_real:]
        self.length -= first_real
        self.max_length -= first_real
        self.mark_changed()

    def mark_changed(self) -> None:
        """Make the decoding plan rebuild its views and masks, after rows, columns or masks
        changed by other means than a one-token step."""
        if self.decode_plan is not None:
            self.decode_plan.stale = True


def decode_step(model: GPT, idx: torch.Tensor, cache: KVCache,
                compute_logits: bool) -> tuple[torch.Tensor | None, torch.Tensor] | None:
    """Run one new token per row through `model`, reading and extending `cache`.

    Args:
        model: the GPT, in eval mode, called with gradients off.
        idx: (B, 1) token ids, all real tokens.
        cache: the KV cache of earlier positions; its length grows by one.
        compute_logits: False skips the output layer.

    Returns:
        (logits (B, 1, V) or None, hidden (B, 1, C) after the final norm), or None when
        the model has parts this step does not reproduce (see the module docstring), in
        which case the cache is left untouched.
    """
    plan = cache.decode_plan
    autocast = _cpu_autocast(cache.keys.device)
    if plan is None or plan.model is not model or plan.autocast != autocast:
        plan = DecodePlan(model, cache, autocast) if _supported(model) else _Unsupported(model, autocast)
        cache.decode_plan = plan
    if isinstance(plan, _Unsupported):
        return None
    return plan.step(idx, compute_logits)


class _Unsupported:
    """Kept on a cache whose model the step cannot run, so that the check runs once per cache."""

    def __init__(self, model: GPT, autocast: torch.dtype | None) -> None:
        self.model, self.autocast = model, autocast
        self.stale = False


def _cpu_autocast(device: torch.device) -> torch.dtype | None:
    # On a CPU the plan casts for autocast itself (see _Matmuls.matmul), so it is built for
    # one autocast state.
    if device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu")
    return None


def _supported(model: GPT) -> bool:
    # gpt.model imports this module, so its classes are imported here, once per cache.
    from gpt.model import MLP, Attention, Block

    if module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks:
        return False
    expected = [(block, Block) for block in model.blocks]
    expected += [(block.attn, Attention) for block in model.blocks] + [(block.mlp, MLP) for block in model.blocks]
    return all(_is_plain(module, cls) for module, cls in expected)


def _is_plain(module: nn.Module, cls: type) -> bool:
    """Return True when `module` is exactly `cls` without forward hooks, so that its functional form computes the same."""
    return type(module) is cls and not (module._forward_hooks or module._forward_pre_hooks)


class _Matmuls:
    """Builds the function each weight matrix is multiplied with, for `rows` rows of input
    and, on a CPU under autocast, the autocast dtype (None without autocast)."""

    def __init__(self, rows: int, autocast_dtype: torch.dtype | None) -> None:
        self.rows, self.autocast_dtype = rows, autocast_dtype

    def linear(self, module: nn.Module) -> Layer:
        if _is_plain(module, nn.Linear):
            return self.matmul(module.weight, module.bias)
        return module

    def fused(self, modules: list[nn.Module]) -> Layer | None:
        """Multiply by the weights of `modules` stacked by rows, so that the output is their
        outputs concatenated; None when one of them is not a plain nn.Linear."""
        if not all(_is_plain(m, nn.Linear) for m in modules):
            return None
        weight = torch.cat([m.weight for m in modules])
        bias = None
        if any(m.bias is not None for m in modules):
            bias = torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.out_features) for m in modules])
        return self.matmul(weight, bias)

    def matmul(self, weight: torch.Tensor, bias: torch.Tensor | None) -> Layer:
        """Return a function computing F.linear(x, weight, bias) for 2-D x, in the form that
        was fastest on a CPU. Measured with one thread on a 2-core AMD EPYC with AVX-512
        (torch 2.13: MKL, oneDNN 3.12), weights read from memory, on the matrices of the cpu
        preset:

        - oneDNN's linear on the weight reordered once for the number of rows, which is
          what torch.compile's CPU backend uses for frozen weights. In bfloat16 it took
          about half the time of F.linear, with the same result. In float32 it took about
          half the time for 4 to 16 rows, as long as the next form for 2 rows, and a
          quarter more for one row, so it serves several rows.
        - float32 and one row: a matrix with more rows than columns (q/k/v, up, lm_head)
          multiplied as a transposed contiguous copy, x @ W_t, in a third to a half of the
          time of F.linear's x @ W.T. Other matrices took as long or longer that way.
        - F.linear elsewhere: on other devices, in other dtypes, and without oneDNN.

        Under autocast the product runs in the autocast dtype, as F.linear's would: the
        weight is cast when reordered, and x at each call, because autocast casts the
        inputs of F.linear but not those of oneDNN's private operator.
        """
        plain = partial(F.linear, weight=weight, bias=bias)
        if weight.device.type != "cpu":
            return plain
        dtype = self.autocast_dtype or weight.dtype
        if dtype == torch.bfloat16 or (dtype == torch.float32 and self.rows > 1):
            if not _onednn_linear_works():
                return plain
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.to(dtype), self.rows)
            bias = bias.to(dtype) if bias is not None else None
            linear = partial(torch.ops.mkldnn._linear_pointwise, W=packed, B=bias, attr="none", scalars=[],
                             algorithm="")
            if self.autocast_dtype is None:
                return linear
            return lambda x: linear(x.to(dtype))
        if dtype != torch.float32 or weight.size(0) <= weight.size(1):
            return plain
        weight_t = weight.t().contiguous()
        if bias is None:
            return partial(torch.mm, mat2=weight_t)
        return partial(torch.addmm, bias, mat2=weight_t)


@functools.cache
def _onednn_linear_works() -> bool:
    """Check once whether this torch build has oneDNN's linear operators and whether they compute F.linear.

    They are private operators of torch (torch.compile's CPU backend calls them), so their
    presence and signature are tried on a small product instead of assumed.
    """
    if not torch.backends.mkldnn.is_available():
        return False
    generator = torch.Generator().manual_seed(0)
    x, weight, bias = (torch.randn(shape, generator=generator) for shape in ((3, 8), (5, 8), (5,)))
    # The first call can come from inside an autocast region (a training stage generating
    # its samples), where F.linear would compute in bfloat16: the check runs without it.
    try:
        with torch.inference_mode(), torch.autocast("cpu", enabled=False):
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, 3)
            y = torch.ops.mkldnn._linear_pointwise(x, W=packed, B=bias, attr="none", scalars=[], algorithm="")
            expected = F.linear(x, weight, bias)
    except (AttributeError, RuntimeError, TypeError):
        return False
    return y.dtype == expected.dtype and bool(torch.allclose(y, expected, atol=1e-5))


def _norm(module: nn.Module) -> Layer:
    if _is_plain(module, nn.LayerNorm):
        return partial(F.layer_norm, normalized_shape=module.normalized_shape, weight=module.weight,
                       bias=module.bias, eps=module.eps)
    if _is_plain(module, nn.RMSNorm):
        return partial(F.rms_norm, normalized_shape=module.normalized_shape, weight=module.weight, eps=module.eps)
    return module


def _embedding(module: nn.Module) -> Layer:
    if _is_plain(module, nn.Embedding) and module.max_norm is None:
        return partial(F.embedding, weight=module.weight)
    return module


class _LayerStep:
    """One Block's share of a decoding step: its weights as functions and its cache views.

    Shapes: B rows, one new token, C = n_embd, H query heads, K key/value heads, D = head_dim.
    """

    def __init__(self, block: Block, matmuls: _Matmuls, apply_rope: Callable) -> None:
        attn, mlp = block.attn, block.mlp
        self.apply_rope = apply_rope
        self.H, self.K, self.D = attn.n_head, attn.n_kv_head, attn.head_dim
        self.gqa = self.K != self.H
        self.norm_1, self.norm_2 = _norm(block.norm_1), _norm(block.norm_2)
        self.qkv = matmuls.fused([attn.q_proj, attn.k_proj, attn.v_proj])
        if self.qkv is None:
            self.q_proj, self.k_proj, self.v_proj = (matmuls.linear(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj))
        self.q_norm = _norm(attn.q_norm) if attn.q_norm is not None else None
        self.k_norm = _norm(attn.k_norm) if attn.k_norm is not None else None
        self.o_proj = matmuls.linear(attn.o_proj)
        self.gated = mlp.gated
        self.gate_up = matmuls.fused([mlp.gate_proj, mlp.up_proj]) if mlp.gated else None
        if mlp.gated and self.gate_up is None:
            self.gate_proj = matmuls.linear(mlp.gate_proj)
        if self.gate_up is None:
            self.up_proj = matmuls.linear(mlp.up_proj)
        self.down_proj = matmuls.linear(mlp.down_proj)
        self.keys = self.values = None  # (B, K, max_length, D) views of the cache, set by DecodePlan.refresh

    def __call__(self, x: torch.Tensor, column: int, rope: tuple[torch.Tensor, torch.Tensor] | None,
                 attn_mask: torch.Tensor | None) -> torch.Tensor:
        apply_rope = self.apply_rope
        B = x.size(0)
        H, K, D = self.H, self.K, self.D
        h = self.norm_1(x)  # (B, C)
        if self.qkv is not None:
            # With one token, (B, (H + 2K) * D) and (B, H + 2K, 1, D) share their memory layout.
            qkv = self.qkv(h).view(B, H + 2 * K, 1, D)
            if rope is not None and self.q_norm is None:
                qk, v = qkv.split([H + K, K], dim=1)
                q, k = apply_rope(qk, *rope).split([H, K], dim=1)
                rope = None
            else:
                q, k, v = qkv.split([H, K, K], dim=1)
        else:
            q = self.q_proj(h).view(B, H, 1, D)
            k = self.k_proj(h).view(B, K, 1, D)
            v = self.v_proj(h).view(B, K, 1, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)

        self.keys[:, :, column:column + 1] = k
        self.values[:, :, column:column + 1] = v
        keys, values = self.keys[:, :, :column + 1], self.values[:, :, :column + 1]  # (B, K, S, D)
        if keys.dtype != q.dtype:
            keys, values = keys.to(q.dtype), values.to(q.dtype)  # a cache kept in lower precision
        if attn_mask is not None and attn_mask.is_floating_point() and attn_mask.dtype != q.dtype:
            attn_mask = attn_mask.to(q.dtype)  # ALiBi biases follow autocast's dtype
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=attn_mask, enable_gqa=self.gqa)  # (B, H, 1, D)
        x = x + self.o_proj(y.reshape(B, H * D))

        h = self.norm_2(x)
        if self.gate_up is not None:
            gate, up = self.gate_up(h).chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.gated:
            h = F.silu(self.gate_proj(h)) * self.up_proj(h)
        else:
            h = F.gelu(self.up_proj(h), approximate="tanh")
        return x + self.down_proj(h)


class DecodePlan:
    """The state that the decoding steps of one KV cache reuse: the model's weights as
    functions, and views and masks of the cache. A cache keeps its plan in `KVCache.decode_plan`, and marks
    it stale when its rows or columns change by other means than a step."""

    def __init__(self, model: GPT, cache: KVCache, autocast: torch.dtype | None) -> None:
        from gpt.model import apply_rope, rope_cos_sin  # see _supported

        config = model.config
        self.model, self.cache, self.config, self.autocast = model, cache, config, autocast
        self.rope_cos_sin = rope_cos_sin
        matmuls = _Matmuls(rows=cache.keys.size(1), autocast_dtype=autocast)
        self.embed = _embedding(model.wte)
        self.position_embed = _embedding(model.wpe) if model.wpe is not None else None
        self.layers = [_LayerStep(block, matmuls, apply_rope) for block in model.blocks]
        self.norm_f = _norm(model.norm_f)
        self.lm_head = matmuls.linear(model.lm_head)
        self.alibi = model.alibi if config.pos_encoding == "alibi" else None  # (H,) slopes
        self.key_mask = None
        self.stale = True

    def refresh(self) -> None:
        """Take the cache views and the padding mask, and give every free column the position
        and mask value that GPT.forward would give a real token there."""
        cache = self.cache
        for index, layer in enumerate(self.layers):
            layer.keys, layer.values = cache.keys[index], cache.values[index]
        start = cache.length
        if cache.padded:
            # GPT.forward counts the real tokens before a new one to find its position.
            following = cache.mask[:, :start].sum(dim=-1)
        elif start > 0:
            following = cache.positions[:, start - 1] + 1
        else:
            following = torch.zeros(cache.positions.size(0), dtype=torch.long, device=cache.positions.device)
        offsets = torch.arange(cache.max_length - start, device=cache.positions.device)
        cache.positions[:, start:] = following[:, None] + offsets
        cache.mask[:, start:] = True
        self.key_mask = cache.mask[:, None, None, :] if cache.padded else None  # (B, 1, 1, max_length)
        self.stale = False

    def step(self, idx: torch.Tensor, compute_logits: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
        if self.stale:
            self.refresh()
        cache, config = self.cache, self.config
        column = cache.length
        positions = cache.positions[:, column:column + 1]  # (B, 1)
        B = idx.size(0)
        x = self.embed(idx.view(B))  # (B, C): one token per row, so hidden states stay 2-D
        if self.position_embed is not None:
            x = x + self.position_embed(positions.view(B))
        rope = None
        if config.pos_encoding == "rope":
            rope = self.rope_cos_sin(positions, config.head_dim, config.rope_theta)  # (B, 1, 1, D) each
        attn_mask = self._attention_mask(positions, column + 1)
        for layer in self.layers:
            x = layer(x, column, rope, attn_mask)
        cache.length = column + 1
        hidden = self.norm_f(x)
        logits = self.lm_head(hidden)[:, None] if compute_logits else None
        return logits, hidden[:, None]

    def _attention_mask(self, positions: torch.Tensor, S: int) -> torch.Tensor | None:
        """Return the mask GPT.forward builds for one real token at column S - 1.

        None when the token may attend to every key, else a boolean (B, 1, 1, S) mask, or a
        float (B, H, 1, S) bias for ALiBi."""
        allowed = self.key_mask[..., :S] if self.key_mask is not None else None
        window = self.config.sliding_window
        reaches_past_window = window is not None and S > window
        if self.alibi is None and not reaches_past_window:
            return allowed
        distance = positions - self.cache.positions[:, :S]  # (B, S)
        if reaches_past_window:
            inside = (distance < window)[:, None, None, :]
            allowed = inside if allowed is None else allowed & inside
        if self.alibi is None:
            return allowed
        bias = -self.alibi[None, :, None, None] * distance.clamp(min=0)[:, None, None, :].float()  # (B, H, 1, S)
        return bias if allowed is None else bias.masked_fill(~allowed, float("-inf"))
