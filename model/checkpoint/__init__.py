"""grokserve.model.checkpoint: readers for the official, Hugging-Face and grokserve formats, and the writer.

`read_checkpoint` is the one entry point: any format → (config, {canonical name: param}, tokenizer path).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from grokserve.model.checkpoint.errors import CheckpointError
from grokserve.model.checkpoint.grokserve_format import GrokserveCheckpoint
from grokserve.model.checkpoint.hf import hf_config, iter_hf
from grokserve.model.checkpoint.official import iter_official
from grokserve.model.config import GrokConfig, get_preset
from grokserve.model.weights import Param, check_shape, expected_shapes

FORMATS: tuple[str, ...] = ("official", "hf", "grokserve")

__all__ = ["FORMATS", "CheckpointError", "LoadedCheckpoint", "iter_params", "read_checkpoint", "resolve_config"]


@dataclass
class LoadedCheckpoint:
    config: GrokConfig
    params: dict[str, Param]
    tokenizer_path: Path | None


def resolve_config(path: str | Path, fmt: str, config_file: str | Path | None) -> GrokConfig:
    if config_file is not None:
        return GrokConfig.from_json_file(config_file)
    if fmt == "grokserve":
        return GrokserveCheckpoint(path).config
    if fmt == "hf":
        return hf_config(path)
    if fmt == "official":
        return get_preset("grok-1")
    raise CheckpointError(f"unknown checkpoint format '{fmt}'; expected one of {', '.join(FORMATS)}")


def iter_params(path: str | Path, fmt: str, config: GrokConfig) -> Iterator[tuple[str, Param]]:
    """Stream (canonical name, param) from a checkpoint of any format (for conversion)."""
    if fmt == "official":
        yield from iter_official(path, config)
    elif fmt == "hf":
        yield from iter_hf(path)
    elif fmt == "grokserve":
        ckpt = GrokserveCheckpoint(path)
        yield from ckpt.load(ckpt.shapes).items()
    else:
        raise CheckpointError(f"unknown checkpoint format '{fmt}'; expected one of {', '.join(FORMATS)}")


def read_checkpoint(path: str | Path, fmt: str = "grokserve", config_file: str | Path | None = None
                    ) -> LoadedCheckpoint:
    """Load every parameter of a checkpoint and check it is complete and shaped as the config says."""
    config = resolve_config(path, fmt, config_file)
    params = dict(iter_params(path, fmt, config))
    for name, shape in expected_shapes(config):
        if name not in params:
            raise CheckpointError(f"{path}: parameter '{name}' is missing")
        check_shape(name, params[name], shape, str(path))
    tokenizer = GrokserveCheckpoint(path).tokenizer_path if fmt == "grokserve" else None
    return LoadedCheckpoint(config, params, tokenizer)
