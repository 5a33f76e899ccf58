"""Cluster spec validation: bad specs are refused with messages naming the field."""

from __future__ import annotations

import pytest

from grokserve.cluster.spec import SpecError, load_spec, parse_spec
from grokserve.model.config import get_preset
from grokserve.transport.placement import PlacementError


def test_defaults_serve_the_demo_model_on_two_cpu_workers():
    spec = parse_spec({})
    assert spec.model.checkpoint == "demo" and spec.experts.workers == 2 and spec.model.device == "cpu"
    plan = spec.placement(get_preset("test-small"))
    assert [s.experts for s in plan.shards] == [(0, 1, 2, 3), (4, 5, 6, 7)]


@pytest.mark.parametrize("data,field", [
    ({"model": {"dtype": "float16"}}, "model.dtype"),
    ({"model": {"weights": "int4"}}, "model.weights"),
    ({"router": {"replicas": 0}}, "router.replicas"),
    ({"router": {"grpc_port": 70000}}, "router.grpc_port"),
    ({"router": {"http_port": -1}}, "router.http_port"),
    ({"router": {"chat_stop": ["a"] * 9}}, "router.chat_stop"),
    ({"router": {"limits": {"prefix_cache": "sometimes"}}}, "router.limits.prefix_cache"),
    ({"router": {"limits": {"max_queue": -1}}}, "router.limits.max_queue"),
    ({"experts": {"shards": [{"name": "a", "experts": "3-1"}]}}, "experts.shards.0.experts"),
    ({"experts": {"shards": [{"name": "Bad_Name", "experts": "0"}]}}, "experts.shards.0.name"),
    ({"experts": {"ray_actor_options": {"num_gpus": -1}}}, "experts.ray_actor_options.num_gpus"),
    ({"experts": {"replicaz": 2}}, "experts.replicaz"),
])
def test_invalid_specs_name_the_field(data, field):
    with pytest.raises(SpecError, match=field.replace(".", r"\.")):
        parse_spec(data)


def test_explicit_shards_must_cover_every_expert():
    spec = parse_spec({"experts": {"shards": [{"name": "a", "experts": "0-3"}, {"name": "b", "experts": "4-6"}]}})
    with pytest.raises(PlacementError, match=r"expert 7"):
        spec.placement(get_preset("test-small"))


def test_spec_file_round_trip(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("model:\n  dtype: bfloat16\nexperts:\n  workers: 4\n  replicas: 2\n")
    spec = load_spec(path)
    assert spec.model.dtype == "bfloat16"
    assert [s.replicas for s in spec.placement(get_preset("test-small")).shards] == [2, 2, 2, 2]
    path.write_text("- not a mapping\n")
    with pytest.raises(SpecError, match="mapping"):
        load_spec(path)
