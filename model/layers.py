"""The math of one Grok-1 layer as plain functions: RMSNorm, RoPE, attention, router, gated-GELU expert FFN.

Both halves of the model use these: the dense half (router replicas) and the expert half (workers).
The dtype flow follows the reference (docs/grok1.md §3): activations in `dtype`; norm, RoPE, softmax and
router internals in f32. Written for few tensor ops per call (decode steps are dominated by per-op
overhead): no-op casts are skipped, RoPE angles come from a table, the mask is inverted once per step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from grokserve.model.int8 import Int8Weight, int8_matmul, matmul, uses_kernel

MASK_FILL = -1e30  # finite, as in the reference: a fully masked row gives a uniform distribution


def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D] (any dtype), scale f32 [D] → x.dtype. Normalise in f32, multiply by the scale, round once:
    scale · (x · rsqrt(mean(x²) + eps)), which is exactly what torch's rms_norm computes in f32."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, scale.shape, scale, eps)
    return F.rms_norm(x.float(), scale.shape, scale, eps).to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """positions int [...] → cos, signed_sin f32 [..., head_dim] for `apply_rope`.

    Half-split layout: the angles are tiled twice; signed_sin is [-sin, sin] so that rotate_half(x)·sin
    = roll(x, d/2)·signed_sin.
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    angles = positions.to(torch.float32)[..., None] * inv_freq  # [..., d/2]
    sin = angles.sin()
    return torch.cat([angles, angles], dim=-1).cos(), torch.cat([-sin, sin], dim=-1)


class RopeTable:
    """cos and signed sin for every position of the context, computed once (the same values as
    `rope_cos_sin` computes per call), looked up per step."""

    def __init__(self, max_positions: int, head_dim: int, base: float, device: torch.device | str = "cpu"):
        self.cos, self.signed_sin = rope_cos_sin(torch.arange(max_positions, device=device), head_dim, base)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [...] → cos, signed_sin [..., 1, d] (broadcast over heads)."""
        return self.cos[positions].unsqueeze(-2), self.signed_sin[positions].unsqueeze(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x [..., H, d], cos/signed_sin [..., 1, d] → same dtype. Pairs (i, i+d/2) rotate together (NeoX /
    rotate_half), math in f32: x·cos + rotate_half(x)·sin, with rotate_half(x) = [-x₂, x₁] written as
    roll(x, d/2)·[-1, 1]."""
    xf = x if x.dtype == torch.float32 else x.float()
    out = torch.addcmul(xf * cos, xf.roll(x.shape[-1] // 2, dims=-1), signed_sin)
    return out if x.dtype == torch.float32 else out.to(x.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hidden: torch.Tensor, logit_multiplier: float,
              logit_cap: float) -> torch.Tensor:
    """Grouped-query attention with Grok-1's capped logits.

    q [B, T, Hq, d], k/v [B, S, Hkv, d], hidden bool [B, 1, 1, T, S] (True = key s is NOT visible to query t)
    → [B, T, Hq·d]. Query head h reads KV head h // (Hq/Hkv).
    """
    batch, steps, n_q, head_dim = q.shape
    n_kv = k.shape[2]
    group = n_q // n_kv
    qh = q.view(batch, steps, n_kv, group, head_dim).permute(0, 2, 3, 1, 4)  # [B, Hkv, G, T, d]
    qh = qh.reshape(batch, n_kv, group * steps, head_dim)  # the G query heads of a KV head as one matrix
    logits = torch.matmul(qh, k.permute(0, 2, 3, 1))  # [B, Hkv, G·T, S], in q's dtype (as the reference)
    if logits.dtype != torch.float32:
        logits = logits.float()
    logits = logits * logit_multiplier
    logits = torch.tanh(logits / logit_cap) * logit_cap
    logits = logits.view(batch, n_kv, group, steps, -1).masked_fill_(hidden, MASK_FILL)  # [B, Hkv, G, T, S]
    probs = torch.softmax(logits, dim=-1)
    if probs.dtype != v.dtype:
        probs = probs.to(v.dtype)
    out = torch.matmul(probs.view(batch, n_kv, group * steps, -1), v.transpose(1, 2))  # [B, Hkv, G·T, d]
    return out.view(batch, n_kv, group, steps, head_dim).permute(0, 3, 1, 2, 4).reshape(batch, steps, n_q * head_dim)


def select_experts(hidden: torch.Tensor, router_weight: torch.Tensor, top_k: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The MoE router: hidden [N, D] (pre-MoE norm output), router_weight f32 [E, D] → expert_ids int64 [N, K]
    and expert_probs f32 [N, K], the probability of each chosen expert (the reference's "gate").

    f32 softmax over all experts, then the top-k probabilities *without* renormalisation (docs/grok1.md §2).
    Ties go to the lower expert index, as jax.lax.top_k does.
    """
    x = hidden if hidden.dtype == torch.float32 else hidden.float()
    probs = torch.softmax(F.linear(x, router_weight), dim=-1)  # [N, E]
    expert_probs, expert_ids = torch.sort(probs, dim=-1, descending=True, stable=True)
    return expert_ids[:, :top_k], expert_probs[:, :top_k]


def expert_ffn(x: torch.Tensor, w_gate: torch.Tensor | Int8Weight, w_up: torch.Tensor | Int8Weight,
               w_down: torch.Tensor | Int8Weight, fast_down: bool = False) -> torch.Tensor:
    """One expert on its rows: x [n, D] → f32 [n, D]. linear_1(gelu_tanh(x·linear) · (x·linear_v)).

    The two input projections run in the activation dtype (bf16 results, as the reference); GELU and the
    product run in f32, and so does the down projection (docs/grok1.md §3): `w_down` is given in f32 (a
    bf16 weight converted once, exactly) unless `fast_down`, where it is a bf16 matmul with f32
    accumulation on the bf16-rounded product (the GPU path: no f32 weight copy; XLA itself would use TF32
    for that f32 dot on a GPU). Resident int8 weights (model/int8.py) take the same path with W8A16 matmuls;
    where the CPU int8 kernel runs (decode sizes) or `fast_down`, their down projection takes the bf16-rounded
    product.
    """
    gate = matmul(x, w_gate)  # [n, F]
    up = matmul(x, w_up)  # [n, F]
    if gate.dtype != torch.float32:
        gate, up = gate.float(), up.float()
    hidden = F.gelu(gate, approximate="tanh").mul_(up)  # [n, F] f32
    if isinstance(w_down, Int8Weight):
        rounded = x.dtype == torch.bfloat16 and (fast_down or uses_kernel(w_down, hidden.shape[0], hidden.device))
        return int8_matmul(hidden.to(torch.bfloat16) if rounded else hidden, w_down, torch.float32)  # [n, D]
    if fast_down and w_down.dtype != torch.float32:
        return F.linear(hidden.to(w_down.dtype), w_down).float()  # [n, D]
    return F.linear(hidden, w_down if w_down.dtype == torch.float32 else w_down.float())  # [n, D] f32
