"""The method table, WaffleCLIP's texts, BiFTA's grid views and the released presets.

References are written here as loops after the released code (tmlr-group/BiFTA helper.py
``construct_random`` and ``grid_crop``; WaffleCLIP's ``waffle_tools.py``), not as calls into bifta.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from bifta_core.config import LabelConfig
from bifta_core.errors import ConfigError, LabelSetError
from bifta_core.io.label_sets import LabelSet, load_label_set
from bifta_core.method.registry import METHOD_NAMES, METHODS, VIEW_PRESETS, Method
from bifta_core.method.presets import PRESETS
from bifta_core.method.waffle import load_words, waffle_texts
from pipeline_helpers import REPO_ROOT, cli_env, write_labelset

# ----------------------------------------------------------------------------------- the table


def _config(**kw) -> LabelConfig:
    return LabelConfig(input="x", labels=["l"], out="o", **kw).validate()


def test_every_reader_of_a_method_reads_the_table() -> None:
    from bifta_core.evaluation.metrics import standard_methods
    from jobs.cli import build_parser

    rows = {r.name: r for r in standard_methods()}
    for name, m in METHODS.items():
        config = _config(method=name)
        assert config.uses_views == (m.views is not None)
        assert config.refines_descriptions == m.refine
        if m.views is not None:
            assert config.view_preset() == VIEW_PRESETS[m.views]
        else:  # every whole-image method is an evaluation row of its own, scored by its own bank
            assert rows[name].bank == (None if m.texts == "class prompt" else name) and not rows[name].uses_views
    label = build_parser()._subparsers._group_actions[0].choices["label"]
    method_flag = next(a for a in label._actions if a.dest == "method")
    assert tuple(method_flag.choices) == METHOD_NAMES


def test_a_new_method_is_one_table_entry(monkeypatch, tiny_vit_model, tmp_path) -> None:
    """An entry reusing an existing scorer labels without touching any other module."""
    from bifta_core.method import registry as methods
    from bifta_core.method.prediction import method_scores
    from bifta_core.method.text_banks import BankSpec, build_label_set_embeddings

    entry = Method("cupl-x", "sentences", frozenset({"cupl.json"}), "mean", None, False, "sentences again")
    monkeypatch.setitem(methods.METHODS, "cupl-x", entry)
    config = _config(method="cupl-x")
    assert not config.uses_views and not config.refines_descriptions
    ls = load_label_set(str(write_labelset(tmp_path / "ls")))
    assert ls.texts_for("cupl-x") == ls.texts_for("cupl")
    emb = build_label_set_embeddings(ls, tiny_vit_model, [BankSpec("cupl-x"), BankSpec("cupl")])
    image = torch.nn.functional.normalize(torch.randn(3, emb.class_emb.shape[1]), dim=-1)
    a = method_scores("cupl-x", emb.class_emb, image, emb.banks["cupl-x"])
    b = method_scores("cupl", emb.class_emb, image, emb.banks["cupl"])
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------------- WaffleCLIP


def _released_waffle(gpt3_prompts: dict[str, list[str]], word_list: list[str], seed: int) -> dict[str, list[str]]:
    """The releases' construct_random, step by step, on NumPy's global generator."""
    np.random.seed(seed)

    def wordify(s):
        return s.replace("_", " ")

    def sentence(d):
        if d.startswith("a") or d.startswith("an"):
            return f"which is {d}"
        if d.startswith("has") or d.startswith("often") or d.startswith("typically") or d.startswith("may") \
                or d.startswith("can"):
            return f"which {d}"
        if d.startswith("used"):
            return f"which is {d}"
        return f"which has {d}"

    key_list = list(gpt3_prompts.keys())
    descr_list = np.array([x for y in [list(v) for v in gpt3_prompts.values()] for x in y])
    avg_num_words = int(np.max([np.round(np.mean([len(wordify(x).split(" ")) for x in key_list])), 1]))
    avg_word_length = int(np.round(np.mean([np.mean([len(y) for y in wordify(x).split(" ")]) for x in key_list])))
    word_list = [x[:avg_word_length] for x in word_list]
    character_list = [x.split(" ") for x in descr_list]
    character_list = [x.replace(",", "").replace(".", "") for x in np.unique([x for y in character_list for x in y])]
    character_list = np.unique(list("".join(character_list)))
    num_spaces = int(np.round(np.mean([np.sum(np.array(list(x)) == " ") for x in key_list]))) + 1
    num_chars = int(np.ceil(np.mean([np.max([len(y) for y in x.split(" ")]) for x in key_list])))
    num_chars += num_spaces - num_chars % num_spaces
    sample_key = ""
    for s in range(num_spaces):
        for _ in range(num_chars // num_spaces):
            sample_key += "a"
        if s < num_spaces - 1:
            sample_key += " "
    out: dict[str, list[str]] = {key: [] for key in key_list}
    for key in key_list:
        for _ in range(15):
            base_word = ""
            for a in range(avg_num_words):
                base_word += np.random.choice(word_list, 1, replace=False)[0]
                if a < avg_num_words - 1:
                    base_word += " "
            out[key].append(f"A photo of a {wordify(key)}, {sentence(base_word)}.")
            noise_word = ""
            for c in sample_key:
                noise_word += np.random.choice(character_list, 1, replace=False)[0] if c != " " else ", "
            out[key].append(f"A photo of a {wordify(key)}, {sentence(noise_word)}.")
    match_key = np.random.choice(key_list)
    shared = {key: out[match_key] for key in key_list}
    return {key: [x.replace(wordify(match_key), wordify(key)) for x in shared[key]] for key in key_list}


DESCRIPTORS = {
    "tench": ["olive green scales", "a thick body, with fins."],
    "tabby_cat": ["striped fur", "pointed ears", "has whiskers"],
    "sports car": ["a low body", "large wheels", "used for racing"],
    "great white shark": ["a grey back", "rows of teeth"],
}


@pytest.mark.parametrize("seed", [0, 42])
def test_waffle_texts_are_the_released_ones(seed: int) -> None:
    words = load_words()[:3000]
    want = _released_waffle({k: list(v) for k, v in DESCRIPTORS.items()}, list(words), seed)
    got = waffle_texts(list(DESCRIPTORS), list(DESCRIPTORS.values()), words, seed=seed)
    assert got == [want[k] for k in DESCRIPTORS]
    assert all(len(t) == 30 for t in got)
    # One random set, shared: the texts differ between classes only by the class name.
    assert got[0][0].replace("tench", "X") == got[2][0].replace("sports car", "X")
    assert got != waffle_texts(list(DESCRIPTORS), list(DESCRIPTORS.values()), words, seed=seed + 1)


def test_waffle_word_lists_load_safely(tmp_path) -> None:
    words = ["alpha", "beta", "gamma"]
    for name, data in (("w.pkl", pickle.dumps(words)), ("w.json", json.dumps(words).encode()),
                       ("w.txt", "alpha\nbeta\n\ngamma\n".encode())):
        (tmp_path / name).write_bytes(data)
        assert load_words(str(tmp_path / name)) == words
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(subprocess.Popen))  # would import a callable
    with pytest.raises(LabelSetError, match="only strings"):
        load_words(str(tmp_path / "evil.pkl"))
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(LabelSetError, match="non-empty list"):
        load_words(str(tmp_path / "empty.json"))
    with pytest.raises(LabelSetError, match="cannot read"):
        load_words(str(tmp_path / "missing.txt"))


def test_waffle_bank_is_seeded_and_keyed_by_seed_and_words(tmp_path, tiny_vit_model) -> None:
    from bifta_core.method.text_banks import BankSpec, build_label_set_embeddings, content_hash

    ls = load_label_set(str(write_labelset(tmp_path / "ls")))
    spec = BankSpec("waffle", waffle_seed=3)
    a = build_label_set_embeddings(ls, tiny_vit_model, [spec])
    b = build_label_set_embeddings(ls, tiny_vit_model, [spec])
    assert a.banks["waffle"].texts == b.banks["waffle"].texts and len(a.banks["waffle"].texts) == 30 * 4
    assert torch.equal(a.banks["waffle"].desc_emb, b.banks["waffle"].desc_emb)
    (tmp_path / "w.txt").write_text("alpha\nbeta\n")
    keys = {content_hash(ls, "m", [s], 2.0) for s in (spec, BankSpec("waffle", waffle_seed=4),
                                                      BankSpec("waffle", waffle_seed=3, waffle_words=str(tmp_path / "w.txt")))}
    assert len(keys) == 3
    # Other banks hash as they did before WaffleCLIP settings existed.
    assert BankSpec("cupl").identity() == {"method": "cupl", "refine": False, "threshold": 0.99, "top_k": 50}


def test_waffle_needs_descriptors(tmp_path) -> None:
    ls = load_label_set(str(write_labelset(tmp_path / "ls", **{"clip-d": None})))
    with pytest.raises(LabelSetError, match="clip-d.json"):
        ls.require("waffle")


# ----------------------------------------------------------------------------------- grid views


def _released_grid(w: int, h: int, num_grid: int) -> list[tuple[int, int, int, int]]:
    patch_size = min(w // num_grid, h // num_grid)
    boxes = []
    for gy in range(num_grid):
        for gx in range(num_grid):
            left, upper = gx * patch_size, gy * patch_size
            boxes.append((left, upper, left + patch_size, upper + patch_size))
    return boxes


@pytest.mark.parametrize("w,h,g", [(500, 375, 3), (224, 224, 3), (640, 480, 4), (37, 91, 2), (300, 300, 1)])
def test_grid_boxes_are_the_released_tiles_and_all_survive_refinement(w: int, h: int, g: int) -> None:
    from bifta_core.method.views import generate_boxes, grid_boxes, refine_boxes

    boxes = grid_boxes(w, h, g)
    assert [tuple(b) for b in boxes.tolist()] == _released_grid(w, h, g)
    preset = _config(method="bifta", views="grid", grid=g).view_preset()
    assert preset.num_views == preset.max_views == g * g and preset.generator == "grid"
    assert torch.equal(generate_boxes(preset, w, h, torch.Generator().manual_seed(1)), boxes)  # no randomness
    assert refine_boxes(boxes, preset.iou_threshold, preset.max_views).tolist() == list(range(g * g))


def test_grid_flags_are_checked() -> None:
    for flag in ({"num_views": 10}, {"max_views": 4}, {"scale": (0.2, 0.4)}):
        with pytest.raises(ConfigError, match="--num-views, --max-views and --scale"):
            _config(method="bifta", views="grid", **flag)
    with pytest.raises(ConfigError, match="scores views"):
        _config(method="cupl", views="grid")
    with pytest.raises(ConfigError, match="--grid"):
        _config(method="bifta", views="grid", grid=0)
    with pytest.raises(ConfigError, match="--views"):
        _config(method="bifta", views="tiles")


# ----------------------------------------------------------------------------------- presets

# Values read from tmlr-group/BiFTA configs/*.yaml and JinhaoLee/WCA cfgs/*.yaml (+ main.py).
RELEASED = {
    "bifta-imagenet": ((0.5, 0.9), 100, 0.85, 100), "bifta-cub": ((0.5, 0.9), 300, 0.85, 100),
    "bifta-dtd": ((0.5, 0.9), 300, 0.85, 100), "bifta-oxford-pet": ((0.5, 0.9), 300, 0.85, 100),
    "bifta-food101": ((0.5, 0.9), 100, 0.85, 100), "bifta-places365": ((0.5, 0.9), 100, 0.85, 100),
    "bifta-imagenet-v2": ((0.1, 0.9), 60, 0.8, 60),  # max_queue_len 200 > 60 sampled
    "wca-imagenet": ((0.1, 0.9), 60, None, 60), "wca-cub": ((0.1, 0.9), 100, None, 100),
}


def test_presets_hold_the_released_values() -> None:
    for name, (scale, num, iou, keep) in RELEASED.items():
        config = _config(preset=name)
        assert config.method == PRESETS[name].method == name.split("-")[0]
        v = config.view_preset()
        assert (v.scale, v.num_views, v.iou_threshold, v.max_views) == (scale, num, iou, keep), name
    assert all(any("never passes it" in n for n in p.notes) for p in PRESETS.values() if p.method == "wca")
    # Flags override a preset; the auto-labelling defaults are untouched by it.
    assert _config(preset="bifta-cub", num_views=50).view_preset().num_views == 50
    assert _config().view_preset() == VIEW_PRESETS["bifta"]
    # An evaluation's other preset keeps its defaults.
    assert _config(preset="bifta-cub").view_preset("wca") == VIEW_PRESETS["wca"]
    with pytest.raises(ConfigError, match="--method wca"):
        _config(preset="wca-cub", method="bifta")


def test_preset_cli(tmp_path) -> None:
    listing = subprocess.run([sys.executable, "-m", "jobs.cli", "presets"], cwd=REPO_ROOT, env=cli_env(),
                             capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0
    assert all(name in listing.stdout for name in PRESETS) and "300 views" in listing.stdout
    bad = subprocess.run([sys.executable, "-m", "jobs.label", str(tmp_path), "--labels", "a,b", "--out",
                          str(tmp_path / "o"), "--preset", "bifta-nope"], cwd=REPO_ROOT, env=cli_env(),
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    err = bad.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unknown --preset 'bifta-nope'")


def test_preset_is_recorded_for_the_run_file() -> None:
    from pipelines.pipeline import preset_record

    record = preset_record(_config(preset="bifta-cub", num_views=50))["preset"]
    assert record["name"] == "bifta-cub" and record["views"]["num_views"] == 300
    assert record["views_in_force"]["num_views"] == 50 and record["protocol"] == {"runs": 20, "views": 60}
    assert preset_record(_config()) == {}


def test_label_set_plain_list_still_labels_sentence_methods() -> None:
    ls = LabelSet(name="p", source="p", classes=("cat", "dog"), synonyms=((), ()), is_plain_list=True)
    assert ls.texts_for("wca") == ls.texts_for("clip-e")
    with pytest.raises(LabelSetError, match="clip-d.json"):
        ls.texts_for("waffle")
    assert ls.require("cupl") == "sentences"


def test_cli_preset_picks_its_method_unless_one_is_given(tmp_path) -> None:
    from jobs.cli import build_parser
    from jobs.label import config_from_args

    parser = build_parser()
    base = ["label", "imgs", "--labels", "a,b", "--out", "o"]
    assert config_from_args(parser.parse_args([*base, "--preset", "wca-cub"])).method == "wca"
    assert config_from_args(parser.parse_args([*base, "--preset", "bifta-cub"])).method == "bifta"
    assert config_from_args(parser.parse_args(base)).method == "bifta"
    explicit = config_from_args(parser.parse_args([*base, "--preset", "wca-cub", "--method", "bifta"]))
    with pytest.raises(ConfigError, match="--method wca"):
        explicit.validate()
    # A config file's preset works the same; flags still override it.
    (tmp_path / "c.yaml").write_text("preset: wca-dtd\nnum_views: 7\nmodel: ViT-B-16\n")
    config = config_from_args(parser.parse_args([*base, "--config", str(tmp_path / "c.yaml"), "--seed", "5"]))
    assert (config.method, config.view_preset().num_views, config.seed, config.model.model) == ("wca", 7, 5, "ViT-B-16")
    (tmp_path / "bad.yaml").write_text("preset: [a, b]\n")
    with pytest.raises(ConfigError, match="unknown --preset"):
        config_from_args(parser.parse_args([*base, "--config", str(tmp_path / "bad.yaml")])).validate()
