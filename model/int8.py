"""Resident int8 weights (weight mode `int8`): the release's int8 matrices and bf16 scales kept as they are,
multiplied without materialising a 16-bit copy of the matrix (W8A16).

A weight is int8 `q` [out, in] with bf16 scales `s` [out, G]: W[o, i] = q[o, i] · s[o, i // (in/G)], G = 1 for
the query/key/value and expert gate/up matrices, 8 contiguous input blocks for the attention output and the
expert down projection (docs/grok1.md §4). `int8_matmul(x, w)` computes x · Wᵀ two ways, chosen by the number
of rows and the device (measured in bench/int8.py):

- few rows (decode, memory-bound), bf16 activations, CPU: PyTorch's int8 weight-only kernel
  (`_weight_int8pack_mm`) per input block, INT8PACK_ROWS rows per call — it reads the int8 bytes once,
  accumulates the products of each block in f32 and applies the block's per-output scale; the blocks'
  results are added in f32 and rounded once. The kernel (torch 2.13, x86) reads activation rows with
  aligned vector loads, 16 (AVX-512) or 8 (AVX2) values at a time: it is used only where every block's
  width is a multiple of INT8PACK_K_MULTIPLE, and on weights and activations whose data start on an aligned
  address (copied to one when not: otherwise it reads past rows or faults);
- more rows (prefill, compute-bound), other activations, or CUDA (where PyTorch's kernel is a plain f32
  loop): the weight is dequantised a slab of output rows at a time into a small buffer — bf16(q · s),
  exactly the reference's bf16 weight, one `mul` from int8 and bf16 — and multiplied; the full 16-bit
  matrix never exists.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from grokserve.model.weights import Param, QuantizedTensor

INT8PACK_ROWS = 4  # rows per kernel call: its fast tile; 8 rows in one call cost 2.6 × 4 rows (bench/int8.py)
INT8PACK_MAX_ROWS = 16  # above this the dequantised-slab path is faster on CPU (bench/int8.py)
INT8PACK_K_MULTIPLE = 32  # the kernel's safe block widths (16 measured correct, 8/24/40/86 not)
ALIGN_BYTES = 64  # int8 blocks and activation rows handed to the kernel start on this boundary (it needs 32)
SLAB_BYTES = 4 << 20  # bf16 bytes of one dequantised slab of output rows


@dataclass
class Int8Weight:
    """An int8 matrix with bf16 block scales, resident as such. `blocks` holds the input blocks as contiguous
    int8 [out, in/G] tensors (the CPU kernel wants them so), `scales` bf16 [out, G]."""

    blocks: list[torch.Tensor]
    scales: torch.Tensor

    def __post_init__(self) -> None:
        # per block its scales as a contiguous [out] vector: the kernel reads them as one (a strided column
        # of `scales` gives wrong results)
        self.block_scales = [self.scales[:, g].contiguous() for g in range(len(self.blocks))]

    @classmethod
    def from_quantized(cls, param: QuantizedTensor, device: torch.device | str = "cpu") -> Int8Weight:
        weight = param.weight.to(device)
        groups = param.scales.shape[1]
        width = weight.shape[1] // groups
        blocks = [_aligned(weight[:, g * width:(g + 1) * width]) for g in range(groups)]  # (loaded tensors may
        # be views into a file at any offset)
        return cls(blocks, param.scales.to(device=device, dtype=torch.bfloat16).contiguous())

    @classmethod
    def concat(cls, weights: list[Int8Weight]) -> Int8Weight:
        """Stack along the output dimension (query, key and value into one matrix); block layouts must agree."""
        groups = {len(w.blocks) for w in weights}
        if len(groups) != 1:
            raise ValueError("int8 weights with different scale groups cannot be stacked")
        return cls([torch.cat([w.blocks[g] for w in weights]) for g in range(groups.pop())],
                   torch.cat([w.scales for w in weights]))

    @property
    def kernel_fits(self) -> bool:
        """Every input block's width suits the CPU int8 kernel."""
        return all(b.shape[1] % INT8PACK_K_MULTIPLE == 0 for b in self.blocks)

    @property
    def shape(self) -> tuple[int, int]:
        return self.blocks[0].shape[0], sum(b.shape[1] for b in self.blocks)

    @property
    def nbytes(self) -> int:
        scales = [self.scales, *self.block_scales]
        return sum(b.numel() for b in self.blocks) + sum(t.numel() * t.element_size() for t in scales)

    def dequantize(self, dtype: torch.dtype, rows: slice = slice(None)) -> torch.Tensor:
        """bf16(q · s) for output rows `rows`, in `dtype` [rows, in]: the reference's bf16 weight (exact in f32)."""
        # int8 and bf16 values are exact in f32, their product has ≤ 16 significant bits: one rounding to bf16
        if len(self.blocks) == 1:
            weight = torch.mul(self.blocks[0][rows], self.scales[rows])  # [rows, in] bf16
        else:  # the blocks side by side, each row's G scales broadcast over its blocks: two ops whatever G is
            q = torch.cat([b[rows] for b in self.blocks], dim=1)  # [rows, in] int8
            groups = len(self.blocks)
            weight = torch.mul(q.view(q.shape[0], groups, -1), self.scales[rows, :, None]).view(q.shape)
        return weight if dtype == torch.bfloat16 else weight.to(dtype)


def uses_kernel(w: Int8Weight, n_rows: int, device: torch.device) -> bool:
    """Whether `int8_matmul` of `n_rows` bf16 rows runs PyTorch's int8 kernel (else dequantised slabs)."""
    return n_rows <= INT8PACK_MAX_ROWS and device.type == "cpu" and w.kernel_fits


def int8_matmul(x: torch.Tensor, w: Int8Weight, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [n, in] · Wᵀ → [n, out] in `out_dtype` (default x's dtype)."""
    out_dtype = out_dtype or x.dtype
    n = x.shape[0]
    if x.dtype == torch.bfloat16 and uses_kernel(w, n, x.device):
        return _kernel_matmul(x, w).to(out_dtype)
    out_rows = w.shape[0]
    slab = max(1, SLAB_BYTES // (2 * w.shape[1]))
    if slab >= out_rows:
        return F.linear(x, w.dequantize(x.dtype)).to(out_dtype)
    out = torch.empty(n, out_rows, dtype=out_dtype, device=x.device)
    for start in range(0, out_rows, slab):
        rows = slice(start, min(start + slab, out_rows))
        out[:, rows] = F.linear(x, w.dequantize(x.dtype, rows))
    return out


def _kernel_matmul(x: torch.Tensor, w: Int8Weight) -> torch.Tensor:
    """x bf16 [n, in] · Wᵀ with `_weight_int8pack_mm`, INT8PACK_ROWS rows per call → [n, out] (bf16 for one
    block, else the blocks' bf16 results summed in f32)."""
    if x.shape[0] > INT8PACK_ROWS:
        return torch.cat([_kernel_matmul(x[i:i + INT8PACK_ROWS], w) for i in range(0, x.shape[0], INT8PACK_ROWS)])
    if len(w.blocks) == 1:
        return torch.ops.aten._weight_int8pack_mm(_aligned(x), w.blocks[0], w.block_scales[0])
    width = w.blocks[0].shape[1]
    acc = torch.zeros(x.shape[0], w.shape[0], dtype=torch.float32, device=x.device)  # [n, out]
    for g, block in enumerate(w.blocks):
        acc.add_(torch.ops.aten._weight_int8pack_mm(_aligned(x[:, g * width:(g + 1) * width]), block,
                                                    w.block_scales[g]))
    return acc


def _aligned(x: torch.Tensor) -> torch.Tensor:
    """x as a contiguous tensor whose data starts on an ALIGN_BYTES boundary (a fresh copy when it does not)."""
    x = x.contiguous()
    return x if x.data_ptr() % ALIGN_BYTES == 0 else x.clone()


def matmul(x: torch.Tensor, w: torch.Tensor | Int8Weight) -> torch.Tensor:
    """x · Wᵀ for a dense weight (F.linear) or a resident int8 one."""
    return int8_matmul(x, w) if isinstance(w, Int8Weight) else F.linear(x, w)


def resident_int8(param: Param, name: str, device: torch.device | str = "cpu") -> Int8Weight:
    """A checkpoint's int8 parameter kept as int8; a float one is refused (int8 mode needs int8 weights)."""
    if not isinstance(param, QuantizedTensor):
        raise ValueError(f"weights: int8 needs an int8 checkpoint, but '{name}' is stored as {param.dtype}")
    return Int8Weight.from_quantized(param, device)
