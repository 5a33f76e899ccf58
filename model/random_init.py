"""Random Grok-architecture weights (the vectors' recipe, scaled by fan-in) for benchmarks and tests.

Produces canonical float parameters that `write_checkpoint` turns into a grokserve checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from grokserve.model.config import GrokConfig
from grokserve.model.weights import expected_shapes


def random_params(config: GrokConfig, seed: int = 0, dtype: torch.dtype = torch.float32
                  ) -> Iterator[tuple[str, torch.Tensor]]:
    """Norm scales ~U(0.5, 1.5), embeddings N(0, 0.02²), matrices N(0, 1/fan_in)."""
    generator = torch.Generator().manual_seed(seed)
    for name, shape in expected_shapes(config):
        if len(shape) == 1:
            yield name, torch.rand(shape, generator=generator) + 0.5
        elif name == "embed":
            yield name, (torch.randn(shape, generator=generator) * 0.02).to(torch.float32)
        else:
            t = torch.randn(shape, generator=generator) / shape[1] ** 0.5
            yield name, t.to(torch.float32 if name.endswith("router") else dtype)
