"""grokserve's own checkpoint layout: safetensors with every (layer, expert) tensor separately addressable.

    DIR/config.json                 GrokConfig
    DIR/tokenizer.model             optional SentencePiece model
    DIR/index.json                  {"format": "grokserve", "version": 1, "tensors": {name: file}}
    DIR/dense.safetensors           embedding, final norm, attention, norms, routers
    DIR/experts/layer-LLLLL.safetensors   that layer's experts

An int8 weight is stored as `NAME.qweight` (int8 [out, in]) + `NAME.scales` (bf16 [out, groups]), so the
official release converts losslessly at its own size. Tensors are read one by one with positioned reads
(safetensors_reads.py, no memory map): a worker reads only its shard's bytes, the router only the dense
file, and `lazy()` reads each tensor when it is looked up so a consumer that converts it keeps only the
result.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from grokserve.model.checkpoint.errors import CheckpointError
from grokserve.model.checkpoint.safetensors_reads import SafetensorsError, SafetensorsFile
from grokserve.model.config import GrokConfig
from grokserve.model.weights import (
    Param,
    QuantizedTensor,
    check_shape,
    expected_shapes,
    expert_name,
    is_expert_param,
)

FORMAT_NAME = "grokserve"
FORMAT_VERSION = 1
_QWEIGHT, _SCALES = ".qweight", ".scales"


def _file_for(name: str) -> str:
    if is_expert_param(name):
        layer = int(name.split(".")[1])
        return f"experts/layer-{layer:05d}.safetensors"
    return "dense.safetensors"


def write_checkpoint(out_dir: str | Path, config: GrokConfig, params: Iterable[tuple[str, Param]],
                     tokenizer_file: str | Path | None = None, total: int | None = None) -> Path:
    """Write (name, param) pairs (any order) to the grokserve layout; checks every shape against `config`."""
    out = Path(out_dir)
    (out / "experts").mkdir(parents=True, exist_ok=True)
    shapes = dict(expected_shapes(config))
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    index: dict[str, str] = {}
    for name, param in tqdm(params, total=total, desc="converting", unit="tensor", disable=None):
        if name not in shapes:
            raise CheckpointError(f"parameter '{name}' is not part of a {config.name} model")
        check_shape(name, param, shapes[name], "input checkpoint")
        file = _file_for(name)
        if isinstance(param, QuantizedTensor):
            groups[file][name + _QWEIGHT] = param.weight.contiguous()
            groups[file][name + _SCALES] = param.scales.contiguous()
        else:
            groups[file][name] = param.contiguous()
        index[name] = file
        if file != "dense.safetensors" and _layer_complete(groups[file], config):
            save_file(groups.pop(file), str(out / file))
    missing = sorted(set(shapes) - set(index))
    if missing:
        raise CheckpointError(f"input checkpoint lacks {len(missing)} parameters, e.g. '{missing[0]}'")
    for file, tensors in groups.items():
        save_file(tensors, str(out / file))
    (out / "config.json").write_text(config.to_json())
    (out / "index.json").write_text(json.dumps(
        {"format": FORMAT_NAME, "version": FORMAT_VERSION, "tensors": dict(sorted(index.items()))}, indent=1))
    if tokenizer_file is not None:
        (out / "tokenizer.model").write_bytes(Path(tokenizer_file).read_bytes())
    return out


def _layer_complete(tensors: dict[str, torch.Tensor], config: GrokConfig) -> bool:
    names = {k.removesuffix(_QWEIGHT).removesuffix(_SCALES) for k in tensors}
    return len(names) == 3 * config.n_experts


class GrokserveCheckpoint:
    """A grokserve-layout checkpoint, read lazily tensor by tensor."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index_file = self.path / "index.json"
        if not index_file.is_file():
            raise CheckpointError(f"{index_file}: missing — not a grokserve checkpoint (convert it first)")
        try:
            index = json.loads(index_file.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{index_file}: not valid JSON ({exc})") from None
        if index.get("format") != FORMAT_NAME or index.get("version") != FORMAT_VERSION:
            raise CheckpointError(f"{index_file}: format {index.get('format')!r} v{index.get('version')!r}, "
                                  f"expected {FORMAT_NAME!r} v{FORMAT_VERSION}")
        self.index: dict[str, str] = index["tensors"]
        try:
            self.config = GrokConfig.from_json_file(self.path / "config.json")
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{self.path / 'config.json'}: {exc}") from None
        self.shapes = dict(expected_shapes(self.config))
        tokenizer = self.path / "tokenizer.model"
        self.tokenizer_path: Path | None = tokenizer if tokenizer.is_file() else None
        self._files: dict[Path, SafetensorsFile] = {}  # headers parsed once

    def dense_names(self) -> list[str]:
        return [n for n in self.shapes if not is_expert_param(n)]

    def expert_names(self, shard: Mapping[int, Iterable[int]]) -> list[str]:
        return [expert_name(layer, e, what) for layer, experts in shard.items() for e in experts
                for what in ("w_gate", "w_up", "w_down")]

    def load(self, names: Iterable[str], progress: str | None = None) -> dict[str, Param]:
        """Read exactly these tensors; every shape checked."""
        lazy = self.lazy(names, progress)
        out = {name: lazy[name] for name in lazy}
        lazy.close()
        return out

    def lazy(self, names: Iterable[str], progress: str | None = None) -> LazyParams:
        """These tensors, each read (and its shape checked) when looked up and not kept."""
        wanted = list(dict.fromkeys(names))
        for name in wanted:
            if name not in self.index:
                raise CheckpointError(f"{self.path}: parameter '{name}' is not in index.json")
        return LazyParams(self, wanted, progress)

    def read(self, name: str) -> Param:
        """One parameter from its file (an int8 weight with its scales)."""
        full = self.path / self.index[name]
        if not full.is_file():
            raise CheckpointError(f"{full}: missing (holds '{name}')")
        try:
            file = self._files.get(full) or self._files.setdefault(full, SafetensorsFile(full))
            if name + _QWEIGHT in file.entries:
                param: Param = QuantizedTensor(file.read(name + _QWEIGHT), file.read(name + _SCALES))
            elif name in file.entries:
                param = file.read(name)
            else:
                raise CheckpointError(f"{full}: parameter '{name}' is missing from the file")
        except CheckpointError:
            raise
        except (SafetensorsError, KeyError, ValueError, OSError) as exc:  # incl. a qweight without its scales
            raise CheckpointError(f"{full}: unreadable safetensors file ({exc})") from None
        check_shape(name, param, self.shapes[name], str(full))
        return param


class LazyParams(Mapping[str, Param]):
    """Parameters of a checkpoint read from disk when looked up (once each, in any order), not kept."""

    def __init__(self, ckpt: GrokserveCheckpoint, names: list[str], progress: str | None):
        self.ckpt = ckpt
        self.names = names
        self._known = set(names)
        self._bar = tqdm(total=len(names), desc=progress, unit="tensor", disable=progress is None or None)

    def __getitem__(self, name: str) -> Param:
        if name not in self._known:
            raise KeyError(name)
        param = self.ckpt.read(name)
        self._bar.update(1)
        return param

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def close(self) -> None:
        self._bar.close()
