"""LabelConfig: method presets, overrides, validation messages, config files, label specs."""

from __future__ import annotations

import json

import pytest

from bifta_core.config import LabelConfig, ModelConfig, parse_scale
from bifta_core.errors import BiftaUserError, ConfigError
from bifta_core.method.registry import METHOD_NAMES


def _cfg(**kwargs) -> LabelConfig:
    base = dict(input="/data/images", labels=["/labels/pets"], out="/tmp/out")
    base.update(kwargs)
    return LabelConfig(**base)


# ------------------------------------------------------------------------------ presets


def test_wca_preset():
    preset = _cfg(method="wca").view_preset()
    assert preset.num_views == 60
    assert preset.scale == (0.1, 0.9)
    assert preset.iou_threshold is None
    assert preset.max_views == 60


def test_bifta_preset():
    cfg = _cfg(method="bifta")
    preset = cfg.view_preset()
    assert preset.num_views == 100
    assert preset.scale == (0.5, 0.9)
    assert preset.iou_threshold == 0.85
    assert preset.max_views == 100
    assert cfg.uses_views and cfg.refines_descriptions


def test_default_method_is_bifta():
    cfg = LabelConfig()
    assert cfg.method == "bifta"
    assert cfg.desc_threshold == 0.99 and cfg.desc_top_k == 50
    assert cfg.image_scale == 4.0 and cfg.text_scale == 2.0
    assert cfg.model == ModelConfig()
    assert cfg.model.model == "ViT-B-32" and cfg.model.pretrained == "openai"


@pytest.mark.parametrize("method", ["clip", "clip-e", "clip-d", "cupl"])
def test_whole_image_methods(method):
    cfg = _cfg(method=method)
    assert not cfg.uses_views
    assert not cfg.refines_descriptions
    cfg.validate()


def test_wca_does_not_refine_by_default():
    assert not _cfg(method="wca").refines_descriptions
    assert _cfg(method="wca", refine_descriptions=True).refines_descriptions
    assert not _cfg(method="bifta", refine_descriptions=False).refines_descriptions


# ------------------------------------------------------------------------------ overrides


def test_overrides_replace_preset_values():
    preset = _cfg(method="bifta", num_views=30, scale=(0.3, 0.6), iou_threshold=0.5, max_views=10).view_preset()
    assert preset.num_views == 30
    assert preset.scale == (0.3, 0.6)
    assert preset.iou_threshold == 0.5
    assert preset.max_views == 10


def test_max_views_never_exceeds_num_views():
    assert _cfg(method="bifta", num_views=40).view_preset().max_views == 40
    assert _cfg(method="bifta", num_views=40, max_views=90).view_preset().max_views == 40
    assert _cfg(method="wca", num_views=20).view_preset().max_views == 20


def test_wca_with_iou_uses_bifta_max_views():
    preset = _cfg(method="wca", iou_threshold=0.7).view_preset()
    assert preset.num_views == 60
    assert preset.iou_threshold == 0.7
    assert preset.max_views == 60  # min(bifta's 100, 60 views)
    assert preset.scale == (0.1, 0.9)


def test_scale_list_becomes_tuple():
    preset = _cfg(method="wca", scale=[0.2, 0.4]).view_preset()
    assert preset.scale == (0.2, 0.4)


# ------------------------------------------------------------------------------ validation


def test_valid_config_returns_self():
    cfg = _cfg()
    assert cfg.validate() is cfg
    for method in METHOD_NAMES:
        _cfg(method=method).validate()
    _cfg(labels=[], labelset_artifacts=["/tmp/a.parquet"]).validate()


@pytest.mark.parametrize(
    "overrides, flag",
    [
        (dict(input=""), "INPUT"),
        (dict(labels=[]), "--labels"),
        (dict(out=""), "--out"),
        (dict(method="tip-adapter"), "--method"),
        (dict(aggregation="max"), "--aggregation"),
        (dict(num_views=0), "--num-views"),
        (dict(num_views=-3), "--num-views"),
        (dict(num_views=2.5), "--num-views"),
        (dict(num_views=True), "--num-views"),
        (dict(max_views=0), "--max-views"),
        (dict(batch_size=0), "--batch-size"),
        (dict(view_batch_size=0), "--view-batch-size"),
        (dict(num_encoders=0), "--num-encoders"),
        (dict(limit=0), "--limit"),
        (dict(top_k=0), "--top-k"),
        (dict(desc_top_k=0), "--desc-top-k"),
        (dict(max_pixels=0), "--max-pixels"),
        (dict(shard_size=0), "--shard-size"),
        (dict(iou_threshold=1.5), "--iou-threshold"),
        (dict(iou_threshold=-0.1), "--iou-threshold"),
        (dict(desc_threshold=1.01), "--desc-threshold"),
        (dict(desc_threshold=-2.0), "--desc-threshold"),
        (dict(scale=(0.0, 0.5)), "--scale"),
        (dict(scale=(0.6, 0.5)), "--scale"),
        (dict(scale=(0.5, 1.2)), "--scale"),
        (dict(pgs_keep=0.0), "--pgs-keep"),
        (dict(pgs_keep=1.5), "--pgs-keep"),
        (dict(seed=-1), "--seed"),
        (dict(seed=1.5), "--seed"),
    ],
)
def test_validation_errors_name_the_flag(overrides, flag):
    with pytest.raises(ConfigError) as info:
        _cfg(**overrides).validate()
    msg = str(info.value)
    assert flag in msg, msg
    assert "\n" not in msg


def test_validation_boundaries_are_accepted():
    _cfg(iou_threshold=0.0, desc_threshold=-1.0, scale=(1.0, 1.0), pgs_keep=1.0, seed=0).validate()
    _cfg(iou_threshold=1.0, desc_threshold=1.0, scale=(0.01, 0.01), limit=1).validate()


def test_config_error_is_a_user_error():
    assert issubclass(ConfigError, BiftaUserError)


# ------------------------------------------------------------------------------ from_dict / files


def test_from_dict_round_trip():
    cfg = _cfg(method="wca", scale=(0.2, 0.8), num_views=12, model=ModelConfig(model="RN50", pretrained="x.pt"))
    data = cfg.to_dict()
    assert data["scale"] == [0.2, 0.8]
    json.dumps(data)
    back = LabelConfig.from_dict(data)
    assert back == cfg
    assert back.scale == (0.2, 0.8)


def test_from_dict_unknown_keys_are_named():
    with pytest.raises(ConfigError) as info:
        LabelConfig.from_dict({"input": "x", "num_veiws": 3, "colour": "red"})
    msg = str(info.value)
    assert "num_veiws" in msg and "colour" in msg
    with pytest.raises(ConfigError, match="model.weights"):
        LabelConfig.from_dict({"model": {"model": "RN50", "weights": "x"}})


def test_from_dict_not_a_mapping():
    with pytest.raises(ConfigError, match="mapping"):
        LabelConfig.from_dict(["input", "x"])


def test_from_dict_flat_model_keys_and_shorthands():
    cfg = LabelConfig.from_dict(
        {
            "input": "/in",
            "labels": "/labels/pets",
            "labelset_artifacts": "/a.parquet",
            "out": "/out",
            "pretrained": "/ckpt.pt",
            "device": "cpu",
            "scale": "0.3,0.7",
            "model": "RN50",
        }
    )
    assert cfg.labels == ["/labels/pets"]
    assert cfg.labelset_artifacts == ["/a.parquet"]
    assert cfg.model == ModelConfig(model="RN50", pretrained="/ckpt.pt", device="cpu")
    assert cfg.scale == (0.3, 0.7)
    cfg.validate()


def test_from_dict_model_must_be_name_or_mapping():
    assert LabelConfig.from_dict({"model": "RN50"}).model == ModelConfig(model="RN50")
    assert LabelConfig.from_dict({"model": None}).model == ModelConfig()
    with pytest.raises(ConfigError, match="'model'"):
        LabelConfig.from_dict({"model": ["RN50"]})


def test_from_dict_bad_scale():
    with pytest.raises(ConfigError, match="--scale"):
        LabelConfig.from_dict({"scale": "0.3"})
    with pytest.raises(ConfigError, match="--scale"):
        LabelConfig.from_dict({"scale": "a,b"})


def test_yaml_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "input: s3://bucket/images/\n"
        "labels:\n  - pets=/labels/pets\n  - cat,dog\n"
        "out: /tmp/out\n"
        "method: wca\n"
        "num_views: 24\n"
        "scale: [0.2, 0.6]\n"
        "model:\n  model: ViT-B-16\n  pretrained: laion2b_s34b_b88k\n  precision: bf16\n",
        encoding="utf-8",
    )
    cfg = LabelConfig.from_file(str(path)).validate()
    assert cfg.input == "s3://bucket/images/"
    assert cfg.method == "wca" and cfg.num_views == 24
    assert cfg.scale == (0.2, 0.6)
    assert cfg.model == ModelConfig(model="ViT-B-16", pretrained="laion2b_s34b_b88k", precision="bf16")
    assert cfg.view_preset().num_views == 24 and cfg.view_preset().scale == (0.2, 0.6)
    assert cfg.label_specs() == [("pets", "/labels/pets"), (None, "cat,dog")]


def test_json_file(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"input": "/in", "labels": ["/l"], "out": "/o", "method": "clip-d", "top_k": 3}))
    cfg = LabelConfig.from_file(str(path)).validate()
    assert cfg.method == "clip-d" and cfg.top_k == 3


def test_empty_yaml_file_gives_defaults(tmp_path):
    path = tmp_path / "empty.yml"
    path.write_text("", encoding="utf-8")
    assert LabelConfig.from_file(str(path)) == LabelConfig()


def test_bad_config_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        LabelConfig.from_file(str(tmp_path / "nope.yaml"))
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("input: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="cannot parse") as info:
        LabelConfig.from_file(str(bad_yaml))
    assert "\n" not in str(info.value)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"input": }', encoding="utf-8")
    with pytest.raises(ConfigError, match="cannot parse"):
        LabelConfig.from_file(str(bad_json))
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="mapping"):
        LabelConfig.from_file(str(listy))
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("input: x\ncrops: 3\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="crops"):
        LabelConfig.from_file(str(unknown))


# ------------------------------------------------------------------------------ label specs


def test_label_specs():
    cfg = _cfg(
        labels=[
            "pets=/labels/pets",
            " birds = s3://bucket/cub ",
            "/labels/food101",
            "cat,dog",
            "a=b,c",  # a named comma-separated class list
            "s3://bucket/x=y/labels",
            "=/no/name",
            "name=",
        ]
    )
    assert cfg.label_specs() == [
        ("pets", "/labels/pets"),
        ("birds", "s3://bucket/cub"),
        (None, "/labels/food101"),
        (None, "cat,dog"),
        ("a", "b,c"),
        (None, "s3://bucket/x=y/labels"),
        (None, "=/no/name"),
        (None, "name="),
    ]


# ------------------------------------------------------------------------------ parse_scale


def test_parse_scale():
    assert parse_scale("0.5,0.9") == (0.5, 0.9)
    assert parse_scale(" 0.1 , 0.2 ") == (0.1, 0.2)
    assert parse_scale([0.5, 1]) == (0.5, 1.0)
    for bad in ("0.5", "0.1,0.2,0.3", "x,y", None, 3, [0.5]):
        with pytest.raises(ConfigError, match="--scale"):
            parse_scale(bad)
