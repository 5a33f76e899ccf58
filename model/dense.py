"""The dense half of Grok-1 (embedding, attention with KV cache, the four norms, router, tied head).

Router replicas hold this; the MoE FFNs are reached through an `ExpertBackend` (in process or over gRPC).
`GrokModel.forward` shows one engine step: for every layer, attention → route → experts → combine.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

import torch
import torch.nn.functional as F

from grokserve.model import layers
from grokserve.model.config import GrokConfig
from grokserve.model.kv_cache import KVCache, StepKV
from grokserve.model.weights import ATTN_MATRICES, NORMS, Param, embed_name, final_norm_name, layer_name, materialize


class ExpertBackend(Protocol):
    """Where a layer's MoE rows go: experts in this process (`LocalExperts`) or a dispatcher to workers."""

    async def forward(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
                      expert_probs: torch.Tensor) -> torch.Tensor:
        """hidden [N, D], expert_ids [N, K], expert_probs f32 [N, K] → probability-weighted expert sum [N, D]."""
        ...


def _multiplier(value: float, dtype: torch.dtype) -> float:
    """The reference multiplies bf16 tensors by the constant rounded to bf16 (78.5, 0.578125)."""
    return float(torch.tensor(value, dtype=dtype).float()) if dtype == torch.bfloat16 else value


class DenseModel:
    """Dense weights of all layers in `dtype` (big matrices) and f32 (embedding table, norms, router)."""

    def __init__(self, config: GrokConfig, dtype: torch.dtype, params: Mapping[str, Param],
                 device: torch.device | str = "cpu"):
        self.config = config
        self.dtype = dtype
        self.device = torch.device(device)
        self.embed = materialize(params[embed_name()], torch.float32).to(self.device)  # [V, D] f32
        self.embed_act = self.embed.to(dtype)  # [V, D] the reference casts the table at use
        self.final_norm = materialize(params[final_norm_name()], torch.float32).to(self.device)
        self.layers: list[dict[str, torch.Tensor]] = []
        for layer in range(config.n_layers):
            weights = {w: materialize(params[layer_name(layer, w)], dtype).to(self.device) for w in ATTN_MATRICES}
            for norm in (*NORMS, "router"):
                weights[norm] = materialize(params[layer_name(layer, norm)], torch.float32).to(self.device)
            self.layers.append(weights)
        self.embedding_multiplier = _multiplier(config.embedding_multiplier, dtype)
        self.output_multiplier = _multiplier(config.output_multiplier, dtype)

    # ---- the pieces of one layer ----------------------------------------------------------------

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] → h [B, T, D] = embedding × multiplier, in the activation dtype."""
        return self.embed_act[tokens] * self.embedding_multiplier

    def attention_block(self, layer: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        kv: StepKV) -> torch.Tensor:
        """h [B, T, D] → h + post_norm(attention(pre_norm(h)))."""
        c, w = self.config, self.layers[layer]
        batch, steps, _ = h.shape
        x = layers.rms_norm(h, w["attn_norm"], c.rms_eps)
        q = F.linear(x, w["wq"]).view(batch, steps, c.n_q_heads, c.head_dim)  # [B, T, Hq, d]
        k = F.linear(x, w["wk"]).view(batch, steps, c.n_kv_heads, c.head_dim)  # [B, T, Hkv, d]
        v = F.linear(x, w["wv"]).view(batch, steps, c.n_kv_heads, c.head_dim)  # [B, T, Hkv, d]
        q, k = layers.apply_rope(q, cos, sin), layers.apply_rope(k, cos, sin)
        k_all, v_all = kv.update(layer, k, v)  # [B, S, Hkv, d]
        a = layers.attention(q, k_all, v_all, kv.mask, c.attn_logit_multiplier, c.attn_logit_cap)  # [B, T, Hq·d]
        a = F.linear(a, w["wo"])  # [B, T, D]
        return h + layers.rms_norm(a, w["attn_post_norm"], c.rms_eps)

    def moe_input(self, layer: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h [N, D] → (normed x [N, D], expert_ids [N, K], expert_probs f32 [N, K])."""
        w = self.layers[layer]
        x = layers.rms_norm(h, w["moe_norm"], self.config.rms_eps)
        expert_ids, expert_probs = layers.select_experts(x, w["router"], self.config.n_experts_per_token)
        return x, expert_ids, expert_probs

    def moe_output(self, layer: int, h: torch.Tensor, moe_out: torch.Tensor) -> torch.Tensor:
        """h [N, D] + post_norm(moe_out [N, D])."""
        return h + layers.rms_norm(moe_out.to(h.dtype), self.layers[layer]["moe_post_norm"], self.config.rms_eps)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """h [..., D] → logits f32 [..., V]: final norm, tied embedding, × output multiplier (in act dtype)."""
        x = layers.rms_norm(h, self.final_norm, self.config.rms_eps)
        return (F.linear(x, self.embed_act) * self.output_multiplier).float()


class GrokModel:
    """Dense model + an expert backend = the whole Grok-1 forward for one engine step.

    The layer loop is a coroutine that awaits the expert backend in every MoE layer: in-process experts
    answer at once, a dispatcher's answer arrives over the network while the event loop serves other work.
    Whoever calls `forward` owns the event loop it runs on (and gives the same loop to a dispatcher).
    """

    def __init__(self, dense: DenseModel, experts: ExpertBackend):
        self.dense = dense
        self.experts = experts
        self.config = dense.config
        # (layer, expert_ids [N, K]) after each MoE router decision: per-expert load metrics
        self.expert_choice_observer: Callable[[int, torch.Tensor], None] | None = None

    async def forward(self, tokens: torch.Tensor, positions: torch.Tensor, query_valid: torch.Tensor,
                      cache: KVCache, storage: torch.Tensor) -> torch.Tensor:
        """One engine step. tokens/positions [B, T]; query_valid bool [B, T] (False = padding, whose outputs
        are never read); `storage` says where the rows live in `cache` (see KVCache.begin_step)
        → hidden [B, T, D] (pre-head).

        A key is visible when it is a real token (id ≠ pad, as the reference masks pad ids) at a position ≤
        the query's. Padding rows are left out of the MoE.
        """
        c, dense = self.config, self.dense
        key_valid = query_valid & (tokens != c.pad_id)
        kv = cache.begin_step(storage, positions, query_valid, key_valid)  # this call's mask and K/V writer
        cos, sin = layers.rope_cos_sin(positions, c.head_dim, c.rope_base)
        h = dense.embed_tokens(tokens)  # [B, T, D]
        flat_valid = query_valid.reshape(-1)
        for layer in range(c.n_layers):
            h = dense.attention_block(layer, h, cos, sin, kv)
            h_rows = h.reshape(-1, c.d_model)[flat_valid]  # [N, D] real tokens only
            x, expert_ids, expert_probs = dense.moe_input(layer, h_rows)
            if self.expert_choice_observer is not None:
                self.expert_choice_observer(layer, expert_ids)
            moe_out = await self.experts.forward(layer, x, expert_ids, expert_probs)  # [N, D]
            h = h.view(-1, c.d_model)  # fresh from the attention block: safe to update in place
            h[flat_valid] = dense.moe_output(layer, h_rows, moe_out)
            h = h.view(tokens.shape[0], tokens.shape[1], c.d_model)
        return h
