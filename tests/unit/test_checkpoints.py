"""Checkpoint formats: official → grokserve conversion is lossless, HF namings load, hostile input is refused."""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from grokserve.cluster.cli import main as cli
from grokserve.model.checkpoint import CheckpointError, read_checkpoint
from grokserve.model.checkpoint.grokserve_format import GrokserveCheckpoint
from grokserve.model.checkpoint.official import load_pickled_tensor
from grokserve.model.engine import ReferenceEngine
from grokserve.model.sampling import SamplingParams
from grokserve.model.weights import QuantizedTensor, materialize


@pytest.fixture(scope="module")
def converted(vectors, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted")
    code = cli(["convert", "--checkpoint", str(vectors / "ckpt"), "--format", "official",
                "--config", str(vectors / "config.json"), "--output", str(out)])
    assert code == 0
    return out


def test_convert_to_grokserve_layout_keeps_tensors_identical(converted, tiny_checkpoint):
    loaded = read_checkpoint(converted, "grokserve")
    assert loaded.config == tiny_checkpoint.config.model_copy(update={"name": loaded.config.name})
    assert set(loaded.params) == set(tiny_checkpoint.params)
    for name, param in tiny_checkpoint.params.items():
        got = loaded.params[name]
        assert type(got) is type(param), name  # int8 weights stay int8
        assert torch.equal(materialize(got, torch.float32), materialize(param, torch.float32)), name


def test_converted_checkpoint_reproduces_official_logits_and_greedy(converted, vectors):
    engine = ReferenceEngine.from_checkpoint(converted, "grokserve", "float32")
    logits = np.load(vectors / "logits.npz")
    for k in range(3):
        np.testing.assert_allclose(engine.logits(logits[f"tokens{k}"].tolist()).numpy(), logits[f"seq{k}"],
                                   atol=2e-4, rtol=0)
    greedy = json.loads((vectors / "greedy.json").read_text())
    out = engine.generate(greedy["prompts"], SamplingParams(max_tokens=10, ignore_eos=True))
    assert [g.token_ids for g in out] == greedy["f32"]


def test_worker_shard_reads_only_its_experts(converted):
    ckpt = GrokserveCheckpoint(converted)
    names = ckpt.expert_names({1: [3, 5]})
    loaded = ckpt.load(names)
    assert sorted(loaded) == sorted(names)
    assert all(".experts.3." in n or ".experts.5." in n for n in loaded)


def test_score_cli_writes_full_sequence_logits(converted, vectors, tmp_path):
    logits = np.load(vectors / "logits.npz")
    out = tmp_path / "logits.npy"
    tokens = ",".join(map(str, logits["tokens1"].tolist()))
    assert cli(["score", "--checkpoint", str(converted), "--tokens", tokens, "--output", str(out)]) == 0
    np.testing.assert_allclose(np.load(out), logits["seq1"], atol=2e-4, rtol=0)


def _hf_state(params, naming: str) -> dict[str, torch.Tensor]:
    """Write canonical params under an HF naming (bf16 would lose exactness; keep f32 for the check)."""
    state = {}
    for name, param in params.items():
        t = materialize(param, torch.float32).contiguous()
        parts = name.split(".")
        if name == "embed":
            key = {"hpcai": "model.embed_tokens.weight", "keyfan": "transformer.in_out_embed.weight"}[naming]
        elif name == "final_norm":
            key = {"hpcai": "model.norm.scale", "keyfan": "transformer.rms_norm.weight"}[naming]
        elif parts[2] == "experts":
            L, E, w = parts[1], parts[3], {"w_gate": "linear", "w_up": "linear_v", "w_down": "linear_1"}[parts[4]]
            key = {"hpcai": f"model.layers.{L}.moe_block.experts.{E}.{w}.weight",
                   "keyfan": f"transformer.decoder_layer.{L}.moe.{E}.{w}.weight"}[naming]
        else:
            L, w = parts[1], parts[2]
            hp = {"wq": "attn.q_proj.weight", "wk": "attn.k_proj.weight", "wv": "attn.v_proj.weight",
                  "wo": "attn.o_proj.weight", "router": "moe_block.gate.weight",
                  "attn_norm": "pre_attn_norm.scale", "attn_post_norm": "post_attn_norm.scale",
                  "moe_norm": "pre_moe_norm.scale", "moe_post_norm": "post_moe_norm.scale"}
            kf = {"wq": "multi_head_attention.query.weight", "wk": "multi_head_attention.key.weight",
                  "wv": "multi_head_attention.value.weight", "wo": "multi_head_attention.linear.weight",
                  "router": "router.weight", "attn_norm": "rms_norm.weight", "attn_post_norm": "rms_norm_1.weight",
                  "moe_norm": "rms_norm_2.weight", "moe_post_norm": "rms_norm_3.weight"}
            key = (f"model.layers.{L}.{hp[w]}" if naming == "hpcai" else f"transformer.decoder_layer.{L}.{kf[w]}")
        state[key] = t
    state["lm_head.weight"] = state.get("model.embed_tokens.weight", state.get("transformer.in_out_embed.weight"))
    return state


@pytest.mark.parametrize("naming,container", [("hpcai", "safetensors"), ("keyfan", "bin")])
def test_hugging_face_conversions_load_and_match_official_logits(tiny_checkpoint, vectors, tmp_path, naming,
                                                                 container):
    state = _hf_state(tiny_checkpoint.params, naming)
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    if container == "safetensors":
        state["lm_head.weight"] = state["lm_head.weight"].clone()
        save_file(state, str(hf_dir / "model-00001-of-00001.safetensors"))
    else:
        torch.save(state, hf_dir / "pytorch_model-00001-of-00001.bin")
    out = tmp_path / "gs"
    assert cli(["convert", "--checkpoint", str(hf_dir), "--format", "hf", "--config", str(vectors / "config.json"),
                "--output", str(out)]) == 0
    engine = ReferenceEngine.from_checkpoint(out, "grokserve")
    logits = np.load(vectors / "logits.npz")
    np.testing.assert_allclose(engine.logits(logits["tokens2"].tolist()).numpy(), logits["seq2"], atol=2e-4)


# ---- hostile and corrupt input --------------------------------------------------------------------


class _RunsCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_pickle_naming_another_global_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    data = pickle.dumps(_RunsCommand(marker), protocol=4)
    with pytest.raises(CheckpointError, match=r"global 'posix.system' is not allowed|global 'os.system'"):
        load_pickled_tensor(data, "evil")
    assert not marker.exists()


@pytest.mark.parametrize("payload", [
    pickle.dumps(eval, protocol=4),
    pickle.dumps({"weight": 1}, protocol=4),
    b"\x80\x04\x95garbage",
    b"",
])
def test_malformed_pickles_give_a_one_line_error(payload):
    with pytest.raises(CheckpointError) as info:
        load_pickled_tensor(payload, "tensor00007_000")
    assert "tensor00007_000" in str(info.value) and "\n" not in str(info.value)


def test_truncated_official_file_is_an_error_naming_file_and_parameter(vectors, tiny_config, tmp_path):
    ckpt = tmp_path / "ckpt-0"
    shutil.copytree(vectors / "ckpt" / "ckpt-0", ckpt)
    victim = ckpt / "tensor00005_000"
    victim.write_bytes(victim.read_bytes()[:-40])
    with pytest.raises(CheckpointError, match=r"tensor00005_000.*multi_head_attention/key/w"):
        read_checkpoint(tmp_path, "official", vectors / "config.json")


def test_missing_official_file_is_an_error_naming_it(vectors, tmp_path):
    ckpt = tmp_path / "ckpt-0"
    shutil.copytree(vectors / "ckpt" / "ckpt-0", ckpt)
    (ckpt / "tensor00013_000").unlink()
    with pytest.raises(CheckpointError, match=r"tensor00013_000: missing.*decoder_layer_0/router/w"):
        read_checkpoint(tmp_path, "official", vectors / "config.json")


def test_official_checkpoint_with_wrong_config_names_the_mismatched_parameter(vectors):
    with pytest.raises(CheckpointError, match=r"tensor00000_000.*in_out_embed/embeddings.*shape"):
        read_checkpoint(vectors / "ckpt", "official")  # default grok-1 config: 131072×6144 expected


def test_official_file_order_is_lexicographic_in_the_layer_number():
    from grokserve.model.checkpoint.official import official_paths

    paths = official_paths(64)
    assert len(paths) == 770
    assert paths[26] == "transformer/decoder_layer_10/moe/linear/w"  # docs/grok1.md §4: layers in string order
    firsts = {int(p.split("/")[1].removeprefix("decoder_layer_")): i for i, p in enumerate(paths)
              if p.endswith("moe/linear/w")}
    assert (firsts[2], firsts[9], firsts[63]) == (146, 758, 722)


def test_corrupt_grokserve_file_is_refused_with_its_name(converted, tmp_path):
    copy = tmp_path / "gs"
    shutil.copytree(converted, copy)
    target = copy / "experts" / "layer-00001.safetensors"
    target.write_bytes(target.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"layer-00001\.safetensors"):
        GrokserveCheckpoint(copy).load(GrokserveCheckpoint(copy).expert_names({1: [0]}))


def test_safetensors_header_with_absurd_size_is_refused_before_allocation(converted, tmp_path):
    copy = tmp_path / "gs"
    shutil.copytree(converted, copy)
    target = copy / "dense.safetensors"
    raw = bytearray(target.read_bytes())
    raw[:8] = (2**60).to_bytes(8, "little")  # header length claims an exabyte
    target.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"dense\.safetensors"):
        read_checkpoint(copy, "grokserve")


def test_positioned_reads_give_what_the_safetensors_library_reads(tmp_path):
    from safetensors.torch import load_file

    from grokserve.model.checkpoint.safetensors_reads import SafetensorsFile

    tensors = {"i8": torch.randint(-128, 128, (33, 7), dtype=torch.int8), "bf16": torch.randn(5, 3).bfloat16(),
               "f32": torch.randn(2, 2, 2), "empty": torch.zeros(0, 4), "scalar": torch.tensor(3.5)}
    save_file(tensors, str(tmp_path / "t.safetensors"), metadata={"note": "x"})
    file, library = SafetensorsFile(tmp_path / "t.safetensors"), load_file(str(tmp_path / "t.safetensors"))
    assert set(file.entries) == set(library)
    for name, tensor in library.items():
        got = file.read(name)
        assert got.dtype == tensor.dtype and torch.equal(got, tensor), name


def _with_header(tmp_path, header: dict, data: bytes = b"\0" * 16):
    raw = json.dumps(header).encode()
    path = tmp_path / "hostile.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


@pytest.mark.parametrize(("entry", "complaint"), [
    ({"dtype": "I8", "shape": [4, 4], "data_offsets": [0, 1 << 40]}, "bytes stored for shape"),
    ({"dtype": "I8", "shape": [64], "data_offsets": [0, 64]}, "past the file"),
    ({"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}, "unsupported dtype"),
    ({"dtype": "I8", "shape": [-4], "data_offsets": [0, 4]}, "not a list of sizes"),
    ({"dtype": "I8", "shape": [4], "data_offsets": [8, 4]}, "not \\[begin, end\\]"),
    ("not an object", "not an object"),
])
def test_hostile_safetensors_headers_are_refused_naming_the_tensor(tmp_path, entry, complaint):
    from grokserve.model.checkpoint.safetensors_reads import SafetensorsError, SafetensorsFile

    with pytest.raises(SafetensorsError, match=complaint):
        SafetensorsFile(_with_header(tmp_path, {"w": entry}))


def test_quantized_tensor_dequantises_contiguous_row_blocks():
    weight = torch.arange(-8, 8, dtype=torch.int8).view(2, 8)  # [out=2, in=8]
    scales = torch.tensor([[1.0, 2.0], [0.5, 4.0]], dtype=torch.bfloat16)  # 2 blocks of 4 input columns
    expected = weight.double() * torch.tensor([[1, 1, 1, 1, 2, 2, 2, 2], [0.5] * 4 + [4.0] * 4]).double()
    assert torch.equal(QuantizedTensor(weight, scales).dequantize(torch.float32).double(), expected)
