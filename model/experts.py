"""The expert half of the model: any subset of (layer, expert) FFNs, computed with rows grouped by expert.

Expert workers hold one of these for their shard; the router holds one with every expert when it runs
the experts in process (then it is the `ExpertBackend` itself). Input rows carry their expert ids and the
router's probability of each; output is the probability-weighted sum.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from grokserve.model import layers
from grokserve.model.config import GrokConfig
from grokserve.model.weights import EXPERT_MATRICES, Param, expert_name, materialize

NO_EXPERT = -1  # an expert-id slot that this holder should ignore


class ExpertShardError(ValueError):
    """A request names a (layer, expert) that this module does not hold."""


class LocalExperts:
    """The experts of one shard, in this process: stacked weights per layer, and their FFN computation.

    For layer L: w_gate/w_up [E_L, F, D], w_down [E_L, D, F], and `local_index[L][e]` = row of expert e
    in the stacks (-1 when not held).
    """

    def __init__(self, config: GrokConfig, shard: Mapping[int, Iterable[int]], dtype: torch.dtype,
                 params: Mapping[str, Param], device: torch.device | str = "cpu"):
        self.config = config
        self.dtype = dtype
        self.device = torch.device(device)
        self.shard: dict[int, tuple[int, ...]] = {int(k): tuple(sorted(set(v))) for k, v in shard.items()}
        self.fast_down = self.device.type == "cuda"  # see layers.expert_ffn
        self.stacks: dict[int, dict[str, torch.Tensor]] = {}
        self.local_index: dict[int, torch.Tensor] = {}
        for layer, experts in self.shard.items():
            if not 0 <= layer < config.n_layers:
                raise ExpertShardError(f"layer {layer} out of range [0, {config.n_layers})")
            for e in experts:
                if not 0 <= e < config.n_experts:
                    raise ExpertShardError(f"expert {e} out of range [0, {config.n_experts})")
            self.stacks[layer] = {
                what: torch.stack([materialize(params[expert_name(layer, e, what)], dtype) for e in experts])
                .to(self.device).contiguous()
                for what in EXPERT_MATRICES
            }
            index = torch.full((config.n_experts,), -1, dtype=torch.int64)
            index[list(experts)] = torch.arange(len(experts))
            self.local_index[layer] = index  # host-side: routing plans are made on the host

    def resident_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for stack in self.stacks.values() for t in stack.values())

    async def forward(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, expert_probs: torch.Tensor
                      ) -> torch.Tensor:
        """The `ExpertBackend` interface for experts in process: `compute`, which never waits."""
        return self.compute(layer, hidden, expert_ids, expert_probs)

    def compute(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, expert_probs: torch.Tensor,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """hidden [N, D], expert_ids int [N, K] (NO_EXPERT slots skipped), expert_probs f32 [N, K] → [N, D].

        Σ_k bf16-rounded-prob · expert(x) accumulated in f32, rounded once to `out_dtype` (docs/grok1.md §3).
        Rows are grouped by expert: one gathered matmul chain per held expert, no per-token loop.
        """
        if layer not in self.stacks:
            raise ExpertShardError(f"layer {layer} is not held by this shard")
        stack = self.stacks[layer]
        n_rows, _ = hidden.shape
        out = torch.zeros(n_rows, self.config.d_model, dtype=torch.float32, device=hidden.device)  # [N, D]
        if n_rows == 0:
            return out.to(out_dtype or self.dtype)
        # The reference rounds the probability to the activation dtype before multiplying.
        probs = expert_probs.to(self.dtype).float()
        # The routing plan is made on the host (ids arrive there on a worker): no device sync in a layer.
        flat_ids = expert_ids.reshape(-1).cpu()  # [N·K]
        valid = flat_ids != NO_EXPERT
        local = torch.where(valid, self.local_index[layer][flat_ids.clamp(min=0)], -1)  # [N·K]
        if bool((valid & (local < 0)).any()):
            bad = sorted({int(e) for e in flat_ids[valid & (local < 0)].tolist()})
            raise ExpertShardError(f"layer {layer}: experts {bad} are not held by this shard")
        order = torch.argsort(local, stable=True)
        counts = torch.bincount(local[local >= 0], minlength=len(self.shard[layer])).tolist()
        start = int((local < 0).sum())
        order = order.to(hidden.device, non_blocking=True)
        k = expert_ids.shape[1]
        flat_probs = probs.reshape(-1)
        for idx, count in enumerate(counts):
            if count == 0:
                continue
            slots = order[start:start + count]  # flat (row, k) slots routed to this expert
            start += count
            rows = slots // k
            y = layers.expert_ffn(hidden[rows], stack["w_gate"][idx], stack["w_up"][idx], stack["w_down"][idx],
                                  self.fast_down)
            out.index_add_(0, rows, y * flat_probs[slots, None])
        return out.to(out_dtype or self.dtype)
