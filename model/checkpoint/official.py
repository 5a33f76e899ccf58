"""Reader for xAI's official Grok-1 release (`ckpt-0/tensorNNNNN_000` pickles, int8 + bf16 scales).

The pickles are parsed by a restricted unpickler: the five globals the format uses are mapped to inert
stand-ins that build torch tensors from the raw bytes; any other global is refused before anything runs.
numpy and ml_dtypes code is never executed on file contents.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from grokserve.model.checkpoint.errors import CheckpointError
from grokserve.model.config import GrokConfig
from grokserve.model.weights import (
    Param,
    QuantizedTensor,
    embed_name,
    final_norm_name,
    layer_name,
)

# ---- restricted unpickling ---------------------------------------------------------------------

_DTYPES = {"f4": torch.float32, "f2": torch.float16, "i1": torch.int8, "bfloat16": torch.bfloat16}
_BYTE_ORDERS = {"<", "|", "="}


class _Bfloat16Type:
    """Stand-in for ml_dtypes.bfloat16 (a type object the pickle passes to numpy.dtype)."""


class _DType:
    """Stand-in for numpy.dtype(name, align, copy) + its __setstate__; records name and byte order."""

    def __init__(self, name, align=False, copy=True):
        if name is _Bfloat16Type:
            name = "bfloat16"
        if not isinstance(name, str) or name not in _DTYPES:
            raise pickle.UnpicklingError(f"dtype {name!r} is not allowed in a Grok-1 checkpoint")
        self.torch_dtype = _DTYPES[name]
        self.byte_order = "<"

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) < 2 or state[1] not in _BYTE_ORDERS:
            raise pickle.UnpicklingError(f"unsupported dtype state {state!r}")
        self.byte_order = state[1]


class _Array:
    """Stand-in for numpy.core.multiarray._reconstruct(ndarray, (0,), b'b') + ndarray.__setstate__."""

    def __init__(self, cls=None, shape=None, typecode=None):
        if cls is not _NdarrayType:
            raise pickle.UnpicklingError("only numpy.ndarray may be reconstructed")
        self.tensor: torch.Tensor | None = None

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) == 5):
            raise pickle.UnpicklingError("malformed ndarray state")
        _version, shape, dtype, fortran_order, raw = state
        if not isinstance(dtype, _DType):
            raise pickle.UnpicklingError("ndarray dtype is not an allowed numpy.dtype")
        if fortran_order:
            raise pickle.UnpicklingError("Fortran-ordered arrays are not part of the format")
        if not (isinstance(shape, tuple) and all(isinstance(s, int) and s >= 0 for s in shape)):
            raise pickle.UnpicklingError(f"malformed shape {shape!r}")
        if not isinstance(raw, bytes | bytearray):
            raise pickle.UnpicklingError("ndarray payload is not raw bytes")
        count = 1
        for s in shape:
            count *= s
        itemsize = torch.empty((), dtype=dtype.torch_dtype).element_size()
        if len(raw) != count * itemsize:
            raise pickle.UnpicklingError(
                f"payload has {len(raw)} bytes, shape {shape} of {dtype.torch_dtype} needs {count * itemsize}"
            )
        flat = torch.frombuffer(bytearray(raw), dtype=dtype.torch_dtype) if count else torch.empty(
            0, dtype=dtype.torch_dtype)
        self.tensor = flat.view(shape)


class _NdarrayType:
    """Stand-in for the numpy.ndarray class object."""


class _QuantizedWeight8bit:
    """Stand-in for __main__.QuantizedWeight8bit: holds `weight` (int8) and `scales` (bf16)."""

    def __setstate__(self, state):
        if not isinstance(state, dict) or set(state) != {"weight", "scales"}:
            raise pickle.UnpicklingError("QuantizedWeight8bit state must hold exactly 'weight' and 'scales'")
        self.weight, self.scales = state["weight"], state["scales"]


_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _Array,
    ("numpy._core.multiarray", "_reconstruct"): _Array,
    ("numpy", "ndarray"): _NdarrayType,
    ("numpy", "dtype"): _DType,
    ("ml_dtypes", "bfloat16"): _Bfloat16Type,
    ("__main__", "QuantizedWeight8bit"): _QuantizedWeight8bit,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals of the Grok-1 format, to inert stand-ins; refuses everything else."""

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a Grok-1 checkpoint") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed in a Grok-1 checkpoint")


@dataclass
class RawQuantized:
    """A QuantizedWeight8bit as stored: weight int8 [*lead, K, N], scales bf16 [*lead, G, N]."""

    weight: torch.Tensor
    scales: torch.Tensor


def load_pickled_tensor(data: bytes, source: str) -> torch.Tensor | RawQuantized:
    """Unpickle one checkpoint file's bytes into a tensor or a RawQuantized; errors name `source`."""
    try:
        obj = RestrictedUnpickler(io.BytesIO(data)).load()
    except CheckpointError:
        raise
    except Exception as exc:  # any malformed or hostile pickle ends here, nothing beyond the stand-ins ran
        raise CheckpointError(f"{source}: not a valid Grok-1 tensor pickle ({type(exc).__name__}: {exc})") from None
    if isinstance(obj, _Array) and obj.tensor is not None:
        return obj.tensor
    if isinstance(obj, _QuantizedWeight8bit):
        w, s = getattr(obj, "weight", None), getattr(obj, "scales", None)
        if not (isinstance(w, _Array) and isinstance(s, _Array) and w.tensor is not None and s.tensor is not None):
            raise CheckpointError(f"{source}: QuantizedWeight8bit without array weight/scales")
        if w.tensor.dtype != torch.int8 or s.tensor.dtype not in (torch.bfloat16, torch.float32):
            raise CheckpointError(f"{source}: quantized weight must be int8 with bf16 scales, "
                                  f"got {w.tensor.dtype} and {s.tensor.dtype}")
        return RawQuantized(w.tensor, s.tensor.to(torch.bfloat16))
    raise CheckpointError(f"{source}: pickle holds {type(obj).__name__}, not an array or QuantizedWeight8bit")


# ---- file order and naming ---------------------------------------------------------------------

# Within a layer block, lexicographic order of the haiku module paths (docs/grok1.md §4).
_LAYER_BLOCK = (
    "moe/linear/w", "moe/linear_1/w", "moe/linear_v/w",
    "multi_head_attention/key/w", "multi_head_attention/linear/w",
    "multi_head_attention/query/w", "multi_head_attention/value/w",
    "rms_norm/scale", "rms_norm_1/scale", "rms_norm_2/scale", "rms_norm_3/scale", "router/w",
)


def official_paths(n_layers: int) -> list[str]:
    """File index → official parameter path. Layers in *string* order: 0, 1, 10, 11, …, 19, 2, 20, …"""
    paths = ["language_model/in_out_embed/embeddings", "language_model/rms_norm/scale"]
    for layer in sorted(range(n_layers), key=str):
        paths += [f"transformer/decoder_layer_{layer}/{p}" for p in _LAYER_BLOCK]
    return paths


def _official_shape(config: GrokConfig, path: str) -> tuple[int, ...]:
    """Shape of an official parameter ([in, out] orientation, experts leading)."""
    c = config
    if path.startswith("language_model/"):
        return (c.vocab_size, c.d_model) if path.endswith("embeddings") else (c.d_model,)
    sub = path.split("/", 2)[2]
    return {
        "moe/linear/w": (c.n_experts, c.d_model, c.ffn_size),
        "moe/linear_v/w": (c.n_experts, c.d_model, c.ffn_size),
        "moe/linear_1/w": (c.n_experts, c.ffn_size, c.d_model),
        "multi_head_attention/key/w": (c.d_model, c.kv_width),
        "multi_head_attention/value/w": (c.d_model, c.kv_width),
        "multi_head_attention/query/w": (c.d_model, c.q_width),
        "multi_head_attention/linear/w": (c.q_width, c.d_model),
        "router/w": (c.d_model, c.n_experts),
    }.get(sub, (c.d_model,))


_ATTN = {"query": "wq", "key": "wk", "value": "wv", "linear": "wo"}
_NORM = {"rms_norm": "attn_norm", "rms_norm_1": "attn_post_norm", "rms_norm_2": "moe_norm",
         "rms_norm_3": "moe_post_norm"}
_MOE = {"linear": "w_gate", "linear_v": "w_up", "linear_1": "w_down"}


def official_to_canonical(path: str) -> str:
    """An official path → canonical name; for stacked MoE weights a name with `{expert}` to fill in."""
    if path == "language_model/in_out_embed/embeddings":
        return embed_name()
    if path == "language_model/rms_norm/scale":
        return final_norm_name()
    _, layer_part, rest = path.split("/", 2)
    layer = int(layer_part.removeprefix("decoder_layer_"))
    module = rest.split("/")
    if module[0] == "moe":
        return f"layers.{layer}.experts.{{expert}}.{_MOE[module[1]]}"
    if module[0] == "multi_head_attention":
        return layer_name(layer, _ATTN[module[1]])
    if module[0] in _NORM:
        return layer_name(layer, _NORM[module[0]])
    if module[0] == "router":
        return layer_name(layer, "router")
    raise CheckpointError(f"unknown official parameter path '{path}'")


def _to_torch_orientation(value: torch.Tensor | RawQuantized) -> Param:
    """[in, out] → [out, in]; quantized scales [G, out] → [out, G]."""
    if isinstance(value, RawQuantized):
        return QuantizedTensor(value.weight.t().contiguous(), value.scales.t().contiguous())
    return value.t().contiguous() if value.dim() == 2 else value


def _check_official(config: GrokConfig, path: str, value: torch.Tensor | RawQuantized, source: str) -> None:
    shape = _official_shape(config, path)
    got = tuple(value.weight.shape if isinstance(value, RawQuantized) else value.shape)
    if got != shape:
        raise CheckpointError(f"{source}: parameter '{path}' has shape {got}, config expects {shape}")
    if isinstance(value, RawQuantized):
        s = value.scales.shape
        if s[:-2] != got[:-2] or s[-1] != got[-1] or got[-2] % s[-2]:
            raise CheckpointError(f"{source}: parameter '{path}' scales {tuple(s)} do not fit weight {got}")
    elif value.dtype != torch.float32:
        raise CheckpointError(f"{source}: parameter '{path}' must be float32, got {value.dtype}")


def resolve_ckpt_dir(path: str | Path) -> Path:
    """Accept the folder holding `ckpt-0/` (run.py's checkpoint_path) or `ckpt-0/` itself."""
    path = Path(path)
    if (path / "ckpt-0").is_dir():
        return path / "ckpt-0"
    if path.is_dir():
        return path
    raise CheckpointError(f"{path}: no such checkpoint directory")


def iter_official(path: str | Path, config: GrokConfig) -> Iterator[tuple[str, Param]]:
    """Yield (canonical name, parameter) for every tensor of an official checkpoint, in file order."""
    ckpt = resolve_ckpt_dir(path)
    paths = official_paths(config.n_layers)
    extra = sorted(p.name for p in ckpt.glob("tensor*_000") if int(p.name[6:11]) >= len(paths))
    if extra:
        raise CheckpointError(f"{ckpt / extra[0]}: unexpected file; config has {len(paths)} tensors "
                              f"({config.n_layers} layers) — wrong --config?")
    for index, official_path in enumerate(paths):
        file = ckpt / f"tensor{index:05d}_000"
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (parameter '{official_path}')")
        value = load_pickled_tensor(file.read_bytes(), f"{file} ('{official_path}')")
        _check_official(config, official_path, value, str(file))
        name = official_to_canonical(official_path)
        if "{expert}" in name:  # stacked experts [E, in, out] → one parameter per expert
            for e in range(config.n_experts):
                part = (RawQuantized(value.weight[e], value.scales[e]) if isinstance(value, RawQuantized)
                        else value[e])
                yield name.format(expert=e), _to_torch_orientation(part)
        elif name == embed_name():  # a lookup table [V, D], not an [in, out] matrix
            assert isinstance(value, torch.Tensor)  # _check_official: the embedding is a float array
            yield name, value
        else:
            yield name, _to_torch_orientation(value)
