"""Reader for Hugging-Face conversions of Grok-1: hpcai-tech/grok-1 and keyfan/grok-1-hf naming.

Files are `*.safetensors` or `pytorch_model*.bin`; .bin files are loaded with `torch.load(weights_only=True)`
(PyTorch's own restricted unpickler). Weights are already in PyTorch [out, in] orientation.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from grokserve.model.checkpoint.errors import CheckpointError
from grokserve.model.config import GrokConfig, get_preset
from grokserve.model.weights import Param, embed_name, expert_name, final_norm_name, layer_name

_ATTN = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo",
         "query": "wq", "key": "wk", "value": "wv", "linear": "wo"}
_NORM = {"pre_attn_norm": "attn_norm", "post_attn_norm": "attn_post_norm", "pre_moe_norm": "moe_norm",
         "post_moe_norm": "moe_post_norm", "rms_norm": "attn_norm", "rms_norm_1": "attn_post_norm",
         "rms_norm_2": "moe_norm", "rms_norm_3": "moe_post_norm"}
_EXPERT = {"linear": "w_gate", "linear_v": "w_up", "linear_1": "w_down"}

_RULES: list[tuple[re.Pattern[str], object]] = [
    # hpcai-tech/grok-1
    (re.compile(r"model\.embed_tokens\.weight"), lambda m: embed_name()),
    (re.compile(r"model\.norm\.(?:scale|weight)"), lambda m: final_norm_name()),
    (re.compile(r"model\.layers\.(\d+)\.attn\.(q_proj|k_proj|v_proj|o_proj)\.weight"),
     lambda m: layer_name(int(m[1]), _ATTN[m[2]])),
    (re.compile(r"model\.layers\.(\d+)\.moe_block\.gate\.weight"), lambda m: layer_name(int(m[1]), "router")),
    (re.compile(r"model\.layers\.(\d+)\.moe_block\.experts\.(\d+)\.(linear|linear_v|linear_1)\.weight"),
     lambda m: expert_name(int(m[1]), int(m[2]), _EXPERT[m[3]])),
    (re.compile(r"model\.layers\.(\d+)\.(pre_attn_norm|post_attn_norm|pre_moe_norm|post_moe_norm)\.(?:scale|weight)"),
     lambda m: layer_name(int(m[1]), _NORM[m[2]])),
    # keyfan/grok-1-hf
    (re.compile(r"transformer\.in_out_embed\.weight"), lambda m: embed_name()),
    (re.compile(r"transformer\.rms_norm\.weight"), lambda m: final_norm_name()),
    (re.compile(r"transformer\.decoder_layer\.(\d+)\.multi_head_attention\.(query|key|value|linear)\.weight"),
     lambda m: layer_name(int(m[1]), _ATTN[m[2]])),
    (re.compile(r"transformer\.decoder_layer\.(\d+)\.router\.weight"), lambda m: layer_name(int(m[1]), "router")),
    (re.compile(r"transformer\.decoder_layer\.(\d+)\.moe\.(\d+)\.(linear|linear_v|linear_1)\.weight"),
     lambda m: expert_name(int(m[1]), int(m[2]), _EXPERT[m[3]])),
    (re.compile(r"transformer\.decoder_layer\.(\d+)\.(rms_norm|rms_norm_1|rms_norm_2|rms_norm_3)\.weight"),
     lambda m: layer_name(int(m[1]), _NORM[m[2]])),
]
_TIED_HEAD = {"lm_head.weight"}  # tied to the embedding in Grok-1: skipped


def hf_to_canonical(name: str) -> str | None:
    """HF tensor name → canonical name; None for the tied lm_head; CheckpointError for anything unknown."""
    if name in _TIED_HEAD:
        return None
    for pattern, build in _RULES:
        match = pattern.fullmatch(name)
        if match:
            return build(match)  # type: ignore[operator]
    raise CheckpointError(f"unknown Hugging-Face tensor name '{name}'")


def hf_config(path: str | Path) -> GrokConfig:
    """Config from an HF config.json (hpcai-tech / keyfan field names), else the grok-1 preset."""
    file = Path(path) / "config.json"
    if not file.is_file():
        return get_preset("grok-1")
    data = json.loads(file.read_text())
    base = get_preset("grok-1").model_dump()
    mapping = {"vocab_size": "vocab_size", "hidden_size": "d_model", "num_hidden_layers": "n_layers",
               "num_attention_heads": "n_q_heads", "num_key_value_heads": "n_kv_heads",
               "num_experts": "n_experts", "num_local_experts": "n_experts",
               "num_experts_per_tok": "n_experts_per_token", "max_position_embeddings": "max_seq_len",
               "embedding_multiplier_scale": "embedding_multiplier", "output_multiplier_scale": "output_multiplier",
               "attn_output_multiplier": "attn_logit_multiplier", "max_attn_value": "attn_logit_cap",
               "rms_norm_eps": "rms_eps", "pad_token_id": "pad_id", "bos_token_id": "bos_id",
               "eos_token_id": "eos_id"}
    for hf_key, key in mapping.items():
        if isinstance(data.get(hf_key), int | float):
            base[key] = data[hf_key]
    base["head_dim"] = data.get("head_dim", base["d_model"] // base["n_q_heads"])
    if isinstance(data.get("intermediate_size"), int):
        # widening factor that reproduces the stated FFN width through ffn_size()
        base["widening_factor"] = data["intermediate_size"] * 3 / 2 / base["d_model"]
    base["name"] = data.get("_name_or_path", "hf")
    config = GrokConfig(**base)
    if isinstance(data.get("intermediate_size"), int) and config.ffn_size != data["intermediate_size"]:
        raise CheckpointError(f"{file}: intermediate_size {data['intermediate_size']} cannot be expressed")
    return config


def iter_hf(path: str | Path) -> Iterator[tuple[str, Param]]:
    root = Path(path)
    files = sorted(root.glob("*.safetensors")) or sorted(root.glob("pytorch_model*.bin"))
    if not files:
        raise CheckpointError(f"{root}: no *.safetensors or pytorch_model*.bin files")
    for file in files:
        if file.suffix == ".safetensors":
            try:
                with safe_open(str(file), framework="pt") as f:
                    for key in f.keys():  # noqa: SIM118 — safe_open is not a dict
                        name = hf_to_canonical(key)
                        if name is not None:
                            yield name, f.get_tensor(key)
            except CheckpointError as exc:
                raise CheckpointError(f"{file}: {exc}") from None
            except Exception as exc:
                raise CheckpointError(f"{file}: unreadable safetensors file ({exc})") from None
        else:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:
                raise CheckpointError(f"{file}: unreadable or unsafe PyTorch file ({exc})") from None
            for key, tensor in state.items():
                try:
                    name = hf_to_canonical(key)
                except CheckpointError as exc:
                    raise CheckpointError(f"{file}: {exc}") from None
                if name is not None:
                    yield name, tensor
