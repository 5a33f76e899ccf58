"""How one forward call's tokens are laid out: N flat tokens (no padding), and the groups of rows that attend.

The dense matmuls, the norms and the MoE run on the N real tokens of a call, whatever mix of prefill
chunks and decode tokens it holds. Only attention needs rows: an `AttentionGroup` is B rows of up to T
tokens ([B, T], right-padded) that attend against the KV cache together. A decode step is one group of
[B, 1] rows; a step that also prefills adds a group of its prefill rows, so a long prompt never pads the
decode rows (and their MoE) to its length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class AttentionGroup:
    """B rows of up to T tokens that attend together; `storage` says where their keys live in the cache."""

    storage: torch.Tensor  # cache rows [B] (contiguous cache) or block tables [B, max_blocks] (paged)
    positions: torch.Tensor  # [B, T]; padding slots hold 0
    query_valid: torch.Tensor  # bool [B, T]; False on padding
    # [B·T] the flat token of each slot (padding: token 0, whose result is never used), or None when the
    # call's N tokens are exactly this group's B·T slots in row-major order (no gather, no scatter)
    slots: torch.Tensor | None = None
    valid_slots: torch.Tensor | None = None  # [n] the slots that hold real tokens (None: all of them)
    valid_tokens: torch.Tensor | None = None  # [n] the flat token of each of those slots

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.positions.shape[0]), int(self.positions.shape[1])


@dataclass
class StepBatch:
    """One forward call: flat tokens and positions [N], and the attention groups covering them."""

    tokens: torch.Tensor  # int64 [N]
    positions: torch.Tensor  # int64 [N]
    groups: list[AttentionGroup]

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])


def group_rows(rows: Sequence[Sequence[int]], starts: Sequence[int], storage: torch.Tensor, first_token: int,
               total_tokens: int, device: torch.device) -> tuple[AttentionGroup, np.ndarray, np.ndarray]:
    """An attention group for `rows` (token ids of each row, row i at positions starts[i] …) whose tokens are
    the call's flat tokens first_token … first_token + Σ len(rows) - 1, in row order. Returns the group and
    the rows' flat tokens and positions (numpy, for the caller to concatenate)."""
    lengths = np.array([len(r) for r in rows], dtype=np.int64)
    batch, width = len(rows), int(lengths.max())
    tokens = np.concatenate([np.asarray(r, dtype=np.int64) for r in rows])
    positions = np.concatenate([np.arange(s, s + n, dtype=np.int64) for s, n in zip(starts, lengths, strict=True)])
    grid_positions = np.zeros((batch, width), dtype=np.int64)
    valid = np.arange(width)[None, :] < lengths[:, None]  # [B, T]
    grid_positions[valid] = positions
    flat_tokens = first_token + np.arange(len(tokens), dtype=np.int64)
    identity = first_token == 0 and len(tokens) == total_tokens and bool(valid.all())
    group = AttentionGroup(storage=storage, positions=torch.from_numpy(grid_positions).to(device),
                           query_valid=torch.from_numpy(valid).to(device))
    if not identity:
        slots = np.zeros((batch, width), dtype=np.int64)
        slots[valid] = flat_tokens
        group.slots = torch.from_numpy(slots.reshape(-1)).to(device)
        if not valid.all():
            group.valid_slots = torch.from_numpy(np.flatnonzero(valid.reshape(-1))).to(device)
        group.valid_tokens = torch.from_numpy(flat_tokens).to(device)
    return group, tokens, positions


def padded_batch(tokens: torch.Tensor, positions: torch.Tensor, query_valid: torch.Tensor,
                 storage: torch.Tensor) -> StepBatch:
    """A right-padded [B, T] batch (the reference engine's layout) as one attention group over its real tokens."""
    valid = query_valid.cpu().numpy()
    ids, pos = tokens.cpu().numpy(), positions.cpu().numpy()
    rows = [ids[b][valid[b]] for b in range(len(ids))]
    starts = [int(pos[b][valid[b]][0]) if valid[b].any() else 0 for b in range(len(ids))]
    total = int(valid.sum())
    group, flat_tokens, flat_positions = group_rows(rows, starts, storage, 0, total, tokens.device)
    device = tokens.device
    return StepBatch(torch.from_numpy(flat_tokens).to(device), torch.from_numpy(flat_positions).to(device), [group])
