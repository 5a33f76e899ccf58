"""The expert half of the model: any subset of (layer, expert) FFNs, computed with rows grouped by expert.

Expert workers hold one of these for their shard; the router holds one with every expert when it runs
the experts in process (then it is the `ExpertBackend` itself). Input rows carry their expert ids and the
router's probability of each; output is the probability-weighted sum.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

from grokserve.model import layers
from grokserve.model.config import GrokConfig
from grokserve.model.dtypes import check_weight_mode
from grokserve.model.int8 import resident_int8
from grokserve.model.weights import EXPERT_MATRICES, Param, expert_name, materialize

NO_EXPERT = -1  # an expert-id slot that this holder should ignore


class ExpertShardError(ValueError):
    """A request names a (layer, expert) that this module does not hold."""


class LocalExperts:
    """The experts of one shard, in this process: their weights per layer, and their FFN computation.

    For layer L: w_gate/w_up [E_L, F, D] and w_down [E_L, D, F] in the activation dtype (`stacks`), or with
    `weights="int8"` each expert's three matrices resident as int8 with bf16 scales in their original block
    layout (model/int8.py); `local_index[L][e]` = position of expert e in the layer's list (-1 when not held).
    On CPU in bf16 mode the down projection is kept in f32 (converted once, exactly): the reference's down
    projection is an f32 matmul, and converting the weight on every call would copy it each time.
    """

    def __init__(self, config: GrokConfig, shard: Mapping[int, Iterable[int]], dtype: torch.dtype,
                 params: Mapping[str, Param], device: torch.device | str = "cpu", weights: str = "dense"):
        self.config = config
        self.dtype = dtype
        self.device = torch.device(device)
        self.weight_mode = check_weight_mode(weights)
        self.shard: dict[int, tuple[int, ...]] = {int(k): tuple(sorted(set(v))) for k, v in shard.items()}
        self.fast_down = self.device.type == "cuda"  # see layers.expert_ffn
        down_dtype = dtype if self.fast_down else torch.float32
        self.stacks: dict[int, dict[str, torch.Tensor]] = {}
        self.local_index: dict[int, np.ndarray] = {}
        self.weights: dict[int, list[tuple[Any, Any, Any]]] = {}  # per expert: (w_gate, w_up, w_down)
        for layer, experts in self.shard.items():
            if not 0 <= layer < config.n_layers:
                raise ExpertShardError(f"layer {layer} out of range [0, {config.n_layers})")
            for e in experts:
                if not 0 <= e < config.n_experts:
                    raise ExpertShardError(f"expert {e} out of range [0, {config.n_experts})")
            if weights == "int8":  # nothing is dequantised: the int8 tensors are kept as loaded
                self.weights[layer] = []
                for e in experts:
                    gate, up, down = (resident_int8(params[expert_name(layer, e, what)], expert_name(layer, e, what),
                                                    self.device) for what in EXPERT_MATRICES)
                    self.weights[layer].append((gate, up, down))
            else:
                self.stacks[layer] = {
                    what: torch.stack([materialize(params[expert_name(layer, e, what)],
                                                   down_dtype if what == "w_down" else dtype) for e in experts])
                    .to(self.device).contiguous()
                    for what in EXPERT_MATRICES
                }
                # per expert (w_gate [F, D], w_up [F, D], w_down [D, F]): views made once, not per call
                self.weights[layer] = list(zip(*(self.stacks[layer][what].unbind(0) for what in EXPERT_MATRICES),
                                               strict=True))
            index = np.full(config.n_experts, -1, dtype=np.int64)
            index[list(experts)] = np.arange(len(experts))
            self.local_index[layer] = index  # host-side: routing plans are made on the host

    def resident_bytes(self) -> int:
        if self.weight_mode == "int8":
            return sum(w.nbytes for per_layer in self.weights.values() for expert in per_layer for w in expert)
        return sum(t.numel() * t.element_size() for stack in self.stacks.values() for t in stack.values())

    async def forward(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, expert_probs: torch.Tensor
                      ) -> torch.Tensor:
        """The `ExpertBackend` interface for experts in process: `compute`, which never waits."""
        return self.compute(layer, hidden, expert_ids, expert_probs)

    def compute(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, expert_probs: torch.Tensor,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """hidden [N, D], expert_ids int [N, K] (NO_EXPERT slots skipped), expert_probs f32 [N, K] → [N, D].

        Σ_k bf16-rounded-prob · expert(x) accumulated in f32, rounded once to `out_dtype` (docs/grok1.md §3).
        Rows are grouped by expert with a routing plan made on the host (numpy: microseconds, no device
        sync): per used expert one gather of its rows, three matmuls and one scatter-add.
        """
        if layer not in self.weights:
            raise ExpertShardError(f"layer {layer} is not held by this shard")
        n_rows = hidden.shape[0]
        out_dtype = out_dtype or self.dtype
        if n_rows == 0:
            return torch.zeros(0, self.config.d_model, dtype=out_dtype, device=hidden.device)
        ids = expert_ids.numpy() if expert_ids.device.type == "cpu" else expert_ids.cpu().numpy()  # [N, K]
        local = np.where(ids != NO_EXPERT, self.local_index[layer][np.clip(ids, 0, None)], -1)  # [N, K]
        if ((ids != NO_EXPERT) & (local < 0)).any():
            bad = sorted({int(e) for e in ids[(ids != NO_EXPERT) & (local < 0)]})
            raise ExpertShardError(f"layer {layer}: experts {bad} are not held by this shard")
        # The reference rounds the probability to the activation dtype before multiplying.
        probs = expert_probs if self.dtype == torch.float32 else expert_probs.to(self.dtype).float()
        probs_np = (probs.numpy() if probs.device.type == "cpu" else probs.cpu().numpy()).reshape(-1)  # [N·K]
        flat = local.reshape(-1)  # [N·K] slot → local expert (-1: not here)
        order = np.argsort(flat, kind="stable")
        counts = np.bincount(flat[flat >= 0], minlength=len(self.shard[layer]))
        start = int((flat < 0).sum())
        k = ids.shape[1]
        on_cpu = hidden.device.type == "cpu"
        weights = self.weights[layer]
        out = None
        for idx in np.flatnonzero(counts).tolist():
            slots = order[start:start + counts[idx]]  # flat (row, k) slots routed to this expert, row order
            start += counts[idx]
            rows_np = slots // k
            every_row = len(rows_np) == n_rows  # each row once, in order (sorted slots): no gather, no scatter
            slot_probs = torch.from_numpy(probs_np[slots][:, None])  # [n, 1]
            x = hidden
            if not every_row:
                rows = torch.from_numpy(rows_np)
                x = hidden.index_select(0, rows if on_cpu else rows.to(hidden.device, non_blocking=True))
            w_gate, w_up, w_down = weights[idx]
            y = layers.expert_ffn(x, w_gate, w_up, w_down, self.fast_down)  # [n, D] f32
            y.mul_(slot_probs if on_cpu else slot_probs.to(hidden.device, non_blocking=True))
            if every_row:
                out = y if out is None else out.add_(y)  # the first: 0 + y, exactly
            else:
                if out is None:
                    out = torch.zeros(n_rows, self.config.d_model, dtype=torch.float32, device=hidden.device)
                out.index_add_(0, rows if on_cpu else rows.to(hidden.device, non_blocking=True), y)
        if out is None:
            out = torch.zeros(n_rows, self.config.d_model, dtype=torch.float32, device=hidden.device)
        return out if out.dtype == out_dtype else out.to(out_dtype)
