import json

import pytest
import yaml

from glmc import ModelSpec, SpecError, presets


def test_presets_are_valid_and_named():
    assert {"glm-4.5", "glm-4.5-air", "glm-tiny", "glm-small"} <= set(presets.names())
    for name in presets.names():
        assert presets.get(name).name == name


def test_unknown_preset_lists_known_ones():
    with pytest.raises(SpecError, match=r"glm-4\.5-air"):
        presets.get("glm-5")


def test_glm45_preset_matches_reference_config():
    s = presets.get("glm-4.5")
    assert (s.hidden_size, s.num_layers, s.num_dense_layers) == (5120, 92, 3)
    assert (s.attention.num_heads, s.attention.num_kv_heads, s.attention.head_dim) == (96, 8, 128)
    assert s.attention.qk_norm and s.attention.qkv_bias
    assert s.moe is not None and (s.moe.num_experts, s.moe.top_k, s.moe.routed_scaling_factor) == (
        160,
        8,
        2.5,
    )
    air = presets.get("glm-4.5-air")
    assert not air.attention.qk_norm and air.moe is not None and air.moe.routed_scaling_factor == 1.0


def _tiny() -> dict:
    return presets.get("glm-tiny").model_dump(mode="json")


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        (("attention", "num_kv_heads"), 3, "attention.num_kv_heads"),
        (("moe", "top_k"), 9, "moe.num_experts"),
        (("num_dense_layers",), 4, "num_layers"),
        (("attention", "head_dim"), 3, "attention.head_dim"),
        (("moe", "n_group"), 3, "moe.n_group"),
        (("hidden_size",), -1, "hidden_size"),
        (("moe", "topk_group"), 3, "moe.topk_group"),
    ],
)
def test_cross_field_errors_name_the_fields(path, value, field):
    d = _tiny()
    target = d
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(SpecError) as e:
        ModelSpec.from_dict(d)
    assert field in str(e.value)


def test_unknown_field_is_rejected_by_name():
    d = _tiny()
    d["attention"]["num_head"] = 4
    with pytest.raises(SpecError, match=r"attention\.num_head"):
        ModelSpec.from_dict(d)


def test_spec_is_frozen():
    s = presets.get("glm-tiny")
    with pytest.raises(Exception):  # noqa: B017 - pydantic raises ValidationError
        s.hidden_size = 3  # type: ignore[misc]


def test_yaml_and_json_files_round_trip(tmp_path):
    s = presets.get("glm-small")
    (tmp_path / "s.yaml").write_text(s.to_yaml())
    (tmp_path / "s.json").write_text(json.dumps(s.model_dump(mode="json")))
    assert ModelSpec.from_file(tmp_path / "s.yaml") == s
    assert ModelSpec.from_file(tmp_path / "s.json") == s


def test_from_file_errors(tmp_path):
    with pytest.raises(SpecError, match="not found"):
        ModelSpec.from_file(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1, 2")
    with pytest.raises(SpecError, match="cannot parse"):
        ModelSpec.from_file(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(SpecError, match="mapping"):
        ModelSpec.from_file(tmp_path / "list.yaml")


@pytest.mark.parametrize("name", ["glm-4.5", "glm-4.5-air", "glm-tiny", "glm-small"])
def test_hf_config_round_trip(name, tmp_path):
    s = presets.get(name)
    cfg = s.to_hf_config()
    assert ModelSpec.from_hf_config(cfg) == s
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert ModelSpec.from_hf_config(tmp_path) == s  # a checkpoint folder
    assert ModelSpec.from_file(tmp_path / "config.json") == s  # detected by model_type


def test_hf_config_keeps_legacy_rope_keys_and_head_dim():
    cfg = presets.get("glm-4.5").to_hf_config()
    assert cfg["rope_theta"] == 1_000_000.0 and cfg["partial_rotary_factor"] == 0.5
    assert "rope_scaling" in cfg and cfg["rope_scaling"] is None
    assert cfg["rope_parameters"]["rope_theta"] == 1_000_000.0
    assert cfg["head_dim"] == 128 and cfg["num_nextn_predict_layers"] == 1


def test_transformers_reads_written_config_identically():
    """Written to be version-agnostic: transformers 4.5x reads the legacy keys, 5.x folds them
    into rope_parameters (checked by hand with 4.57.1 and in CI with 5.x)."""
    transformers = pytest.importorskip("transformers")
    s = presets.get("glm-4.5")
    c = transformers.Glm4MoeConfig(**s.to_hf_config())
    rope = getattr(c, "rope_parameters", None) or {}
    assert rope.get("rope_theta", getattr(c, "rope_theta", None)) == 1_000_000.0
    assert rope.get("partial_rotary_factor", getattr(c, "partial_rotary_factor", None)) == 0.5
    assert c.head_dim == 128 and c.n_routed_experts == 160 and c.routed_scaling_factor == 2.5
    assert c.num_nextn_predict_layers == 1 and c.use_qk_norm and c.first_k_dense_replace == 3
    # and back: transformers' own serialisation reads as the same spec
    assert ModelSpec.from_hf_config(c.to_dict()).model_dump(exclude={"name"}) == s.model_dump(
        exclude={"name"}
    )


def test_hf_config_rejects_other_models():
    with pytest.raises(SpecError, match="glm4_moe"):
        ModelSpec.from_hf_config({"model_type": "llama"})


def test_json_schema_has_descriptions():
    schema = ModelSpec.model_json_schema()
    assert schema["properties"]["hidden_size"]["description"]
    assert "MoESpec" in schema["$defs"]


def test_size_bounds_sit_far_above_the_released_models():
    """The validator's upper bounds refuse absurd values without touching real ones."""
    from glmc import spec as S

    for name in ("glm-4.5", "glm-4.5-air"):
        s = presets.get(name)
        assert s.moe is not None
        assert s.vocab_size * 8 <= S.MAX_VOCAB and s.hidden_size * 8 <= S.MAX_HIDDEN
        assert s.num_layers * 8 <= S.MAX_LAYERS and s.moe.num_experts * 8 <= S.MAX_EXPERTS
        assert s.attention.num_heads * 8 <= S.MAX_HEADS and s.attention.head_dim * 8 <= S.MAX_HEAD_DIM
        assert s.mlp.intermediate_size * 8 <= S.MAX_INTERMEDIATE
    schema = ModelSpec.model_json_schema()
    assert schema["properties"]["hidden_size"]["maximum"] == S.MAX_HIDDEN


def test_strict_types_still_take_integers_for_floats_and_yaml_booleans(tmp_path):
    d = _tiny()
    d["attention"]["rope"]["theta"] = 10000  # an int where a float is meant: exact, accepted
    text = yaml.safe_dump(d).replace("qk_norm: true", "qk_norm: yes")  # YAML 1.1 boolean
    (tmp_path / "s.yaml").write_text(text)
    s = ModelSpec.from_file(tmp_path / "s.yaml")
    assert s.attention.rope.theta == 10000.0 and s.attention.qk_norm is True


@pytest.mark.parametrize(
    ("update", "needle"),
    [
        ({"num_layers": True}, "num_layers: Input should be a valid integer, got true (a boolean)"),
        ({"hidden_size": "64"}, "hidden_size: Input should be a valid integer, got '64' (a string)"),
        ({"initializer_range": float("inf")}, "initializer_range: Input should be a finite number"),
        ({"name": ""}, "name: String should have at least 1 character"),
        ({"name": "x\x1b[0m"}, "name: x\\x1b[0m holds control or format characters"),
    ],
)
def test_spec_errors_are_one_short_line(update, needle):
    with pytest.raises(SpecError) as e:
        ModelSpec.from_dict({**_tiny(), **update})
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_many_errors_are_summarised():
    d = dict.fromkeys(_tiny(), "x")
    with pytest.raises(SpecError) as e:
        ModelSpec.from_dict(d)
    assert "and " in str(e.value) and " more" in str(e.value) and len(str(e.value)) < 600
