"""Canonical parameter names and the int8 weight holder shared by every checkpoint reader and writer.

Readers (official, HF, grokserve) all produce `{canonical name: Tensor | QuantizedTensor}` in PyTorch
orientation ([out, in]); the dense model and the expert module are built from that mapping.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from grokserve.model.config import GrokConfig

# Layer-local weight names (PyTorch orientation).
ATTN_MATRICES = ("wq", "wk", "wv", "wo")
NORMS = ("attn_norm", "attn_post_norm", "moe_norm", "moe_post_norm")
EXPERT_MATRICES = ("w_gate", "w_up", "w_down")  # official: moe/linear, moe/linear_v, moe/linear_1


def embed_name() -> str:
    return "embed"


def final_norm_name() -> str:
    return "final_norm"


def layer_name(layer: int, what: str) -> str:
    return f"layers.{layer}.{what}"


def expert_name(layer: int, expert: int, what: str) -> str:
    return f"layers.{layer}.experts.{expert}.{what}"


@dataclass
class QuantizedTensor:
    """Symmetric int8 weight with bf16 scales per output row and `groups` contiguous input blocks.

    weight: int8 [out, in]; scales: bf16 [out, groups]; W[o, i] = weight[o, i] · scales[o, i // (in/groups)].
    """

    weight: torch.Tensor
    scales: torch.Tensor

    def __post_init__(self) -> None:
        if self.weight.dtype != torch.int8 or self.weight.dim() != 2:
            raise ValueError(f"quantized weight must be 2-D int8, got {self.weight.dtype} {tuple(self.weight.shape)}")
        out_dim, in_dim = self.weight.shape
        if self.scales.dim() != 2 or self.scales.shape[0] != out_dim or in_dim % self.scales.shape[1]:
            raise ValueError(
                f"scales {tuple(self.scales.shape)} do not fit weight {tuple(self.weight.shape)} "
                "(need [out, groups] with groups dividing in)"
            )

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    @property
    def nbytes(self) -> int:
        return self.weight.numel() + self.scales.numel() * self.scales.element_size()

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """int8 × scale multiplied exactly in f32 (7 + 8 significant bits), then rounded once to `dtype`."""
        out_dim, in_dim = self.weight.shape
        groups = self.scales.shape[1]
        w = self.weight.to(torch.float32).view(out_dim, groups, in_dim // groups)  # [O, G, I/G]
        w = w * self.scales.to(torch.float32)[:, :, None]
        return w.view(out_dim, in_dim).to(dtype)


Param = torch.Tensor | QuantizedTensor


def materialize(param: Param, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(param, QuantizedTensor):
        return param.dequantize(dtype)
    return param.to(dtype)


def expected_shapes(config: GrokConfig) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Every canonical parameter with its PyTorch-orientation shape."""
    c = config
    yield embed_name(), (c.vocab_size, c.d_model)
    yield final_norm_name(), (c.d_model,)
    for layer in range(c.n_layers):
        yield layer_name(layer, "wq"), (c.q_width, c.d_model)
        yield layer_name(layer, "wk"), (c.kv_width, c.d_model)
        yield layer_name(layer, "wv"), (c.kv_width, c.d_model)
        yield layer_name(layer, "wo"), (c.d_model, c.q_width)
        for norm in NORMS:
            yield layer_name(layer, norm), (c.d_model,)
        yield layer_name(layer, "router"), (c.n_experts, c.d_model)
        for expert in range(c.n_experts):
            yield expert_name(layer, expert, "w_gate"), (c.ffn_size, c.d_model)
            yield expert_name(layer, expert, "w_up"), (c.ffn_size, c.d_model)
            yield expert_name(layer, expert, "w_down"), (c.d_model, c.ffn_size)


def is_expert_param(name: str) -> bool:
    return ".experts." in name


def check_shape(name: str, param: Param, shape: tuple[int, ...], source: str) -> None:
    if tuple(param.shape) != tuple(shape):
        raise ValueError(f"{source}: parameter '{name}' has shape {tuple(param.shape)}, config expects {shape}")
