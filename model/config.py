"""GrokConfig: the shape and constants of a Grok-1-architecture model, with named presets.

Every other part (checkpoint readers, dense model, expert workers, cluster spec) reads its sizes from here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class GrokConfig(BaseModel):
    """Architecture of a Grok-1-style MoE transformer (docs/grok1.md §1). Immutable."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = "custom"
    vocab_size: int = Field(gt=0)
    d_model: int = Field(gt=0)
    n_layers: int = Field(gt=0)
    n_q_heads: int = Field(gt=0)
    n_kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    widening_factor: float = Field(gt=0)
    n_experts: int = Field(gt=0)
    n_experts_per_token: int = Field(gt=0)
    max_seq_len: int = Field(gt=0)
    embedding_multiplier: float = math.sqrt(6144)
    output_multiplier: float = 1 / math.sqrt(3)
    attn_logit_multiplier: float = 1 / math.sqrt(128)
    attn_logit_cap: float = 30.0
    rms_eps: float = 1e-5
    rope_base: float = 10000.0
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2

    @model_validator(mode="after")
    def _check_shapes(self) -> GrokConfig:
        if self.n_q_heads % self.n_kv_heads:
            raise ValueError(f"n_q_heads ({self.n_q_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for RoPE")
        if not 0 < self.n_experts_per_token <= self.n_experts:
            raise ValueError("n_experts_per_token must be in [1, n_experts]")
        return self

    @property
    def ffn_size(self) -> int:
        """Per-expert FFN width: int(wf·D)·2//3 rounded up to a multiple of 8 (model.py ffn_size)."""
        size = int(self.widening_factor * self.d_model) * 2 // 3
        return size + (-size) % 8

    @property
    def q_per_kv(self) -> int:
        return self.n_q_heads // self.n_kv_heads

    @property
    def q_width(self) -> int:
        return self.n_q_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.n_kv_heads * self.head_dim

    # ---- persistence -------------------------------------------------------------------------

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    @classmethod
    def from_json_file(cls, path: str | Path) -> GrokConfig:
        """Read either grokserve's own config.json or an official LanguageModelConfig/TransformerConfig JSON."""
        data = json.loads(Path(path).read_text())
        if "LanguageModelConfig" in data or "TransformerConfig" in data:
            return cls.from_official(data, name=Path(path).stem)
        return cls.model_validate(data)

    @classmethod
    def from_official(cls, data: dict, name: str = "official") -> GrokConfig:
        """Map the official run.py `LanguageModelConfig` / `TransformerConfig` fields (string notes ignored)."""
        lm = data.get("LanguageModelConfig", {})
        tc = data.get("TransformerConfig", {})

        def pick(section: dict, key: str, default=None):
            value = section.get(key, default)
            # The vectors' config.json annotates some fields with prose; only numbers count.
            if isinstance(value, str) or value is None:
                if default is None:
                    raise ValueError(f"official config: field '{key}' is missing or not a number")
                return default
            return value

        return cls(
            name=name,
            vocab_size=pick(lm, "vocab_size", 128 * 1024),
            d_model=pick(tc, "emb_size", pick(lm, "model_size", 6144)),
            n_layers=pick(tc, "num_layers", 64),
            n_q_heads=pick(tc, "num_q_heads", 48),
            n_kv_heads=pick(tc, "num_kv_heads", 8),
            head_dim=pick(tc, "key_size", 128),
            widening_factor=pick(tc, "widening_factor", 8),
            n_experts=pick(tc, "num_experts", 8),
            n_experts_per_token=pick(tc, "num_selected_experts", 2),
            max_seq_len=pick(lm, "sequence_len", 8192),
            embedding_multiplier=pick(lm, "embedding_multiplier_scale", math.sqrt(6144)),
            output_multiplier=pick(lm, "output_multiplier_scale", 1 / math.sqrt(3)),
            attn_logit_multiplier=pick(tc, "attn_output_multiplier", 1 / math.sqrt(128)),
            pad_id=pick(lm, "pad_token", 0),
            eos_id=pick(lm, "eos_token", 2),
        )


_GROK1_CONSTANTS: dict[str, Any] = dict(
    embedding_multiplier=78.38367176906169,
    output_multiplier=0.5773502691896257,
    attn_logit_multiplier=0.08838834764831845,
)

PRESETS: dict[str, GrokConfig] = {
    # xai-org/grok-1 run.py's configuration, exactly (docs/grok1.md §1).
    "grok-1": GrokConfig(
        name="grok-1", vocab_size=131072, d_model=6144, n_layers=64, n_q_heads=48, n_kv_heads=8,
        head_dim=128, widening_factor=8, n_experts=8, n_experts_per_token=2, max_seq_len=8192,
        **_GROK1_CONSTANTS,
    ),
    # The tiny model of tests/data/grok1-tiny (xAI's code, random weights).
    "grok-1-tiny-ref": GrokConfig(
        name="grok-1-tiny-ref", vocab_size=512, d_model=128, n_layers=2, n_q_heads=16, n_kv_heads=8,
        head_dim=8, widening_factor=8, n_experts=8, n_experts_per_token=2, max_seq_len=64,
        **_GROK1_CONSTANTS,
    ),
    # A small test model: 4 layers so that layer-range placements are meaningful.
    "test-small": GrokConfig(
        name="test-small", vocab_size=512, d_model=64, n_layers=4, n_q_heads=8, n_kv_heads=2,
        head_dim=8, widening_factor=4, n_experts=8, n_experts_per_token=2, max_seq_len=256,
        **_GROK1_CONSTANTS,
    ),
}


def get_preset(name: str) -> GrokConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset '{name}'; known: {', '.join(sorted(PRESETS))}") from None
