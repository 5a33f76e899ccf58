"""The dense half of Grok-1 (embedding, attention with KV cache, the four norms, router, tied head).

Router replicas hold this; the MoE FFNs are reached through an `ExpertBackend` (in process or over gRPC).
`GrokModel.forward` shows one engine step: for every layer, attention → route → experts → combine.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from grokserve.model import layers
from grokserve.model.batch import AttentionGroup, StepBatch
from grokserve.model.config import GrokConfig
from grokserve.model.dtypes import check_weight_mode
from grokserve.model.int8 import Int8Weight, matmul, resident_int8
from grokserve.model.kv_cache import KVCache, StepKV
from grokserve.model.weights import NORMS, Param, embed_name, final_norm_name, layer_name, materialize


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
    """Dense weights of all layers: the big matrices in `dtype` (or, with `weights="int8"`, resident int8 with
    bf16 scales, model/int8.py) and f32 (embedding table, norms, router).

    The query, key and value projections of a layer are stacked into one matrix `wqkv` [Hq·d + 2·Hkv·d, D]:
    one matmul instead of three, with the same dot products.
    """

    def __init__(self, config: GrokConfig, dtype: torch.dtype, params: Mapping[str, Param],
                 device: torch.device | str = "cpu", weights: str = "dense"):
        self.config = config
        self.dtype = dtype
        self.device = torch.device(device)
        self.embed = materialize(params[embed_name()], torch.float32).to(self.device)  # [V, D] f32
        self.embed_act = self.embed.to(dtype)  # [V, D] the reference casts the table at use
        self.final_norm = materialize(params[final_norm_name()], torch.float32).to(self.device)
        self.weights = check_weight_mode(weights)
        self.layers: list[dict[str, Any]] = []
        for layer in range(config.n_layers):
            names = [layer_name(layer, w) for w in ("wq", "wk", "wv", "wo")]
            if weights == "int8":
                q8, k8, v8, o8 = (resident_int8(params[n], n, self.device) for n in names)
                matrices: dict[str, Any] = {"wqkv": Int8Weight.concat([q8, k8, v8]), "wo": o8}
            else:
                q, k, v, o = (materialize(params[n], dtype) for n in names)
                matrices = {"wqkv": torch.cat([q, k, v]).to(self.device),  # [Hq·d + 2·Hkv·d, D]
                            "wo": o.to(self.device)}
            for norm in (*NORMS, "router"):
                matrices[norm] = materialize(params[layer_name(layer, norm)], torch.float32).to(self.device)
            self.layers.append(matrices)
        self.embedding_multiplier = _multiplier(config.embedding_multiplier, dtype)
        self.output_multiplier = _multiplier(config.output_multiplier, dtype)
        self.rope = layers.RopeTable(config.max_seq_len, config.head_dim, config.rope_base, self.device)

    # ---- the pieces of one layer ----------------------------------------------------------------

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] → h [B, T, D] = embedding × multiplier, in the activation dtype."""
        return self.embed_act[tokens] * self.embedding_multiplier

    def attention_block(self, layer: int, h: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor,
                        groups: list[tuple[AttentionGroup, StepKV]]) -> torch.Tensor:
        """h [N, D] → h + post_norm(attention(pre_norm(h))), added into h in place. Projections, RoPE and norms
        run on the N flat tokens; attention runs per group of rows against the KV cache."""
        c, w = self.config, self.layers[layer]
        n_tokens = h.shape[0]
        x = layers.rms_norm(h, w["attn_norm"], c.rms_eps)
        qkv = matmul(x, w["wqkv"]).view(n_tokens, c.n_q_heads + 2 * c.n_kv_heads, c.head_dim)  # [N, H, d]
        n_qk = c.n_q_heads + c.n_kv_heads
        qkv = torch.cat([layers.apply_rope(qkv[:, :n_qk], cos, signed_sin), qkv[:, n_qk:]], dim=1)  # rotate q, k
        if len(groups) == 1 and groups[0][0].slots is None:  # the N tokens are the group's [B, T] rows
            (group, kv), = groups
            attended = self._attend(layer, qkv.view(*group.shape, *qkv.shape[1:]), kv).view(n_tokens, -1)
        else:
            attended = qkv.new_empty(n_tokens, c.q_width)  # [N, Hq·d]
            for group, kv in groups:
                assert group.slots is not None and group.valid_tokens is not None
                rows = self._attend(layer, qkv.index_select(0, group.slots).view(*group.shape, *qkv.shape[1:]), kv)
                rows = rows.view(-1, c.q_width)  # [B·T, Hq·d]
                if group.valid_slots is not None:
                    rows = rows.index_select(0, group.valid_slots)
                attended.index_copy_(0, group.valid_tokens, rows)
        return h.add_(layers.rms_norm(matmul(attended, w["wo"]), w["attn_post_norm"], c.rms_eps))

    def _attend(self, layer: int, qkv: torch.Tensor, kv: StepKV) -> torch.Tensor:
        """qkv [B, T, Hq + 2·Hkv, d] (q and k rotated) → attention output [B, T, Hq·d]; writes this call's K/V."""
        c = self.config
        q, k, v = (qkv[:, :, :c.n_q_heads], qkv[:, :, c.n_q_heads:c.n_q_heads + c.n_kv_heads],
                   qkv[:, :, c.n_q_heads + c.n_kv_heads:])
        k_all, v_all = kv.update(layer, k, v)  # [B, S, Hkv, d]
        return layers.attention(q, k_all, v_all, kv.hidden, c.attn_logit_multiplier, c.attn_logit_cap)

    def moe_input(self, layer: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h [N, D] → (normed x [N, D], expert_ids [N, K], expert_probs f32 [N, K])."""
        w = self.layers[layer]
        x = layers.rms_norm(h, w["moe_norm"], self.config.rms_eps)
        expert_ids, expert_probs = layers.select_experts(x, w["router"], self.config.n_experts_per_token)
        return x, expert_ids, expert_probs

    def moe_output(self, layer: int, h: torch.Tensor, moe_out: torch.Tensor) -> torch.Tensor:
        """h [N, D] + post_norm(moe_out [N, D]), added into h in place."""
        if moe_out.dtype != h.dtype:
            moe_out = moe_out.to(h.dtype)
        return h.add_(layers.rms_norm(moe_out, self.layers[layer]["moe_post_norm"], self.config.rms_eps))

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """h [..., D] → logits f32 [..., V]: final norm, tied embedding, × output multiplier (in act dtype)."""
        x = layers.rms_norm(h, self.final_norm, self.config.rms_eps)
        logits = F.linear(x, self.embed_act).mul_(self.output_multiplier)
        return logits if logits.dtype == torch.float32 else logits.float()


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

    async def forward(self, batch: StepBatch, cache: KVCache) -> torch.Tensor:
        """One engine step over the batch's N flat tokens → hidden [N, D] (pre-head).

        A key is visible when it is a real token (id ≠ pad, as the reference masks pad ids) at a position ≤
        the query's; each attention group says which rows attend together and where their keys live.
        """
        c, dense = self.config, self.dense
        groups = []
        for group in batch.groups:
            group_tokens = batch.tokens.view(*group.shape) if group.slots is None else \
                batch.tokens[group.slots].view(*group.shape)
            key_valid = group.query_valid & (group_tokens != c.pad_id)
            groups.append((group, cache.begin_step(group.storage, group.positions, group.query_valid, key_valid)))
        cos, signed_sin = dense.rope.lookup(batch.positions)  # [N, 1, d]
        h = dense.embed_tokens(batch.tokens)  # [N, D]
        for layer in range(c.n_layers):
            h = dense.attention_block(layer, h, cos, signed_sin, groups)
            x, expert_ids, expert_probs = dense.moe_input(layer, h)
            if self.expert_choice_observer is not None:
                self.expert_choice_observer(layer, expert_ids)
            moe_out = await self.experts.forward(layer, x, expert_ids, expert_probs)  # [N, D]
            h = dense.moe_output(layer, h, moe_out)  # in place
        return h
