"""The math of one Grok-1 layer as plain functions: RMSNorm, RoPE, attention, router, gated-GELU expert FFN.

Both halves of the model use these: the dense half (router replicas) and the expert half (workers).
The dtype flow follows the reference (docs/grok1.md §3): activations in `dtype`; norm, RoPE, softmax and
router internals in f32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MASK_FILL = -1e30  # finite, as in the reference: a fully masked row gives a uniform distribution


def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D] (any dtype), scale f32 [D] → x.dtype. Normalise in f32, scale, round once."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (scale * y).to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """positions int [B, T] → cos, sin f32 [B, T, 1, head_dim] (half-split layout: angles tiled twice)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    angles = positions.to(torch.float32)[..., None] * inv_freq  # [B, T, d/2]
    angles = torch.cat([angles, angles], dim=-1)[:, :, None, :]  # [B, T, 1, d]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, d] → same dtype. Pairs (i, i+d/2) rotate together (NeoX / rotate_half), math in f32."""
    xf = x.float()
    half = x.shape[-1] // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    logit_multiplier: float,
    logit_cap: float,
) -> torch.Tensor:
    """Grouped-query attention with Grok-1's capped logits.

    q [B, T, Hq, d], k/v [B, S, Hkv, d], mask bool [B, T, S] (True = may attend) → [B, T, Hq·d].
    Query head h reads KV head h // (Hq/Hkv).
    """
    batch, steps, n_q, head_dim = q.shape
    n_kv = k.shape[2]
    q = q.view(batch, steps, n_kv, n_q // n_kv, head_dim)  # [B, T, Hkv, G, d]
    logits = torch.einsum("btkgd,bskd->bkgts", q, k)  # [B, Hkv, G, T, S], rounded to q.dtype like the reference
    logits = logits.float() * logit_multiplier
    logits = logit_cap * torch.tanh(logits / logit_cap)
    logits = logits.masked_fill(~mask[:, None, None, :, :], MASK_FILL)
    probs = torch.softmax(logits, dim=-1).to(v.dtype)
    out = torch.einsum("bkgts,bskd->btkgd", probs, v)  # [B, T, Hkv, G, d]
    return out.reshape(batch, steps, n_q * head_dim)


def select_experts(hidden: torch.Tensor, router_weight: torch.Tensor, top_k: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The MoE router: hidden [N, D] (pre-MoE norm output), router_weight f32 [E, D] → expert_ids int64 [N, K]
    and expert_probs f32 [N, K], the probability of each chosen expert (the reference's "gate").

    f32 softmax over all experts, then the top-k probabilities *without* renormalisation (docs/grok1.md §2).
    Ties go to the lower expert index, as jax.lax.top_k does.
    """
    probs = torch.softmax(F.linear(hidden.float(), router_weight.float()), dim=-1)  # [N, E]
    expert_probs, expert_ids = torch.sort(probs, dim=-1, descending=True, stable=True)
    return expert_ids[:, :top_k].contiguous(), expert_probs[:, :top_k].contiguous()


def expert_ffn(
    x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, fast_down: bool = False
) -> torch.Tensor:
    """One expert on its rows: x [n, D] → f32 [n, D]. linear_1(gelu_tanh(x·linear) · (x·linear_v)).

    The two input projections run in the activation dtype (bf16 results, as the reference); GELU and the
    product run in f32, and so does the down projection (docs/grok1.md §3) unless `fast_down`: then it
    is a bf16 matmul with f32 accumulation on the bf16-rounded product, avoiding an f32 copy of the weight
    per call (the GPU path; XLA itself would use TF32 for that f32 dot on a GPU).
    """
    gate = F.linear(x, w_gate).float()  # [n, F]
    up = F.linear(x, w_up).float()  # [n, F]
    hidden = F.gelu(gate, approximate="tanh") * up  # [n, F] f32
    if fast_down and w_down.dtype != torch.float32:
        return F.linear(hidden.to(w_down.dtype), w_down).float()  # [n, D]
    return F.linear(hidden, w_down.float())  # [n, D] f32
