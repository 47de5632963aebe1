"""Label sets: the published data in ../shared/descriptions, the CLIP-D sentence rule, validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bifta_core.errors import BiftaUserError, LabelSetError
from bifta_core.method.registry import METHOD_NAMES
from bifta_core.io.label_sets import (
    LabelSet,
    default_templates,
    descriptor_sentence,
    key_of,
    load_label_set,
)

DATASETS = ("cub", "dtd", "food101", "imagenet", "oxford_pet", "place365")
ROLE_FILES = {"cupl.json": "sentences", "llm-pool.json": "pool", "clip-d.json": "descriptors"}


def _write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _folder(tmp_path: Path, files: dict, name: str = "pets") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    for filename, data in files.items():
        if isinstance(data, str):
            (folder / filename).write_text(data, encoding="utf-8")
        else:
            _write_json(folder / filename, data)
    return folder


GOOD = {
    "classes.json": ["cat", "dog"],
    "cupl.json": {"cat": ["A cat is small.", "Cats purr."], "dog": ["A dog barks."]},
    "clip-d.json": {"cat": ["whiskers", "a small mammal"], "dog": ["has a tail"]},
}


# ------------------------------------------------------------------------------ published data


def _load_dataset(descriptions_dir: Path, dataset: str) -> LabelSet:
    folder = descriptions_dir / dataset
    if not folder.is_dir():
        pytest.skip(f"../shared/descriptions/{dataset} not found")
    return load_label_set(str(folder), merge_duplicates=dataset == "place365")


@pytest.mark.parametrize("dataset", DATASETS)
def test_published_label_sets_load_and_validate(dataset, descriptions_dir):
    folder = descriptions_dir / dataset
    ls = _load_dataset(descriptions_dir, dataset)
    raw_classes = json.loads((folder / "classes.json").read_text(encoding="utf-8"))
    assert ls.name == dataset
    assert ls.num_classes == len({key_of(c if isinstance(c, str) else c[0]) for c in raw_classes})
    assert len(set(ls.classes)) == ls.num_classes
    assert not ls.is_plain_list
    # every role file present in the folder is loaded and covers every class
    for filename, attr in ROLE_FILES.items():
        mapping = getattr(ls, attr)
        if (folder / filename).exists():
            assert mapping is not None, filename
            assert set(mapping) == set(ls.classes)
            assert all(len(mapping[c]) > 0 for c in ls.classes), filename
        else:
            assert mapping is None, filename
    if (folder / "clip-e.json").exists():
        assert not ls.templates_are_default
        assert list(ls.templates) == json.loads((folder / "clip-e.json").read_text(encoding="utf-8"))
    assert all(t.count("{}") == 1 for t in ls.templates)


@pytest.mark.parametrize("dataset", DATASETS)
def test_published_texts_for_every_available_method(dataset, descriptions_dir):
    ls = _load_dataset(descriptions_dir, dataset)
    available = [m for m in METHOD_NAMES if m not in ("clip-d", "waffle") or ls.descriptors is not None]
    assert set(available) >= {"clip", "clip-e", "cupl", "wca", "bifta"}
    if ls.num_classes > 400:  # reproducing the releases' draws costs a word-list permutation per word (~15 s here)
        available.remove("waffle")
    for method in available:
        texts = ls.texts_for(method)
        assert len(texts) == ls.num_classes, method
        for cls, group in zip(ls.classes, texts):
            assert group, f"{method}: no texts for {cls!r}"
            assert all(isinstance(t, str) and t.strip() for t in group), method
            assert not any("{}" in t for t in group), method
    clip_e = ls.texts_for("clip-e")
    assert all(len(g) == len(ls.templates) for g in clip_e)
    pool = ls.refinement_pool()
    for base, merged in zip(ls.texts_for("bifta"), pool):
        assert merged[: len(base)] == base
        if ls.pool is None:
            assert merged == base


def test_place365_repeats_names(descriptions_dir):
    folder = descriptions_dir / "place365"
    if not folder.is_dir():
        pytest.skip("../shared/descriptions/place365 not found")
    with pytest.raises(LabelSetError) as info:
        load_label_set(str(folder))
    msg = str(info.value)
    assert "19" in msg and "--merge-duplicate-classes" in msg
    raw = json.loads((folder / "classes.json").read_text(encoding="utf-8"))
    seen, repeated = set(), []
    for name in raw:
        if name in seen and name not in repeated:
            repeated.append(name)
        seen.add(name)
    assert len(repeated) == 19
    for name in repeated[:8]:  # the message names the first ones (and counts the rest)
        assert repr(name) in msg
    merged = load_label_set(str(folder), merge_duplicates=True)
    assert merged.num_classes == 344
    assert len(raw) == 365
    # first occurrence kept, in order
    assert list(merged.classes) == list(dict.fromkeys(raw))


def test_food101_underscore_keys_match(descriptions_dir):
    ls = _load_dataset(descriptions_dir, "food101")
    assert "apple_pie" in ls.classes
    assert ls.sentences["apple_pie"] and ls.pool["apple_pie"] and ls.descriptors["apple_pie"]
    prompts = dict(zip(ls.classes, ls.class_prompts()))
    assert prompts["apple_pie"] == "a photo of a apple pie."
    assert ls.texts_for("clip-e")[ls.classes.index("apple_pie")] == [t.format("apple pie") for t in ls.templates]
    assert ls.texts_for("clip-d")[ls.classes.index("apple_pie")][0].startswith("apple pie, which ")


def test_imagenet_has_no_pool(descriptions_dir):
    ls = _load_dataset(descriptions_dir, "imagenet")
    assert ls.num_classes == 1000
    assert ls.pool is None
    assert ls.refinement_pool() == ls.texts_for("bifta")


# ------------------------------------------------------------------------------ CLIP-D sentences


@pytest.mark.parametrize(
    "descriptor, expected",
    [
        ("a long neck", "giraffe, which is a long neck"),
        ("an orange beak", "giraffe, which is an orange beak"),
        ("used for racing", "giraffe, which is used for racing"),
        ("has four legs", "giraffe, which has four legs"),
        ("often found in Africa", "giraffe, which often found in Africa"),
        ("typically tall", "giraffe, which typically tall"),
        ("may be spotted", "giraffe, which may be spotted"),
        ("can run fast", "giraffe, which can run fast"),
        ("brown patches", "giraffe, which has brown patches"),
        ("long legs", "giraffe, which has long legs"),
        # plain string-prefix semantics, as in the reference code
        ("angular shape", "giraffe, which is angular shape"),
        ("usually tall", "giraffe, which has usually tall"),
        ("hastily drawn", "giraffe, which hastily drawn"),
        ("canopy of leaves", "giraffe, which canopy of leaves"),
        ("maybe spotted", "giraffe, which maybe spotted"),
        ("  has whitespace  ", "giraffe, which has whitespace"),
    ],
)
def test_descriptor_sentence_rule(descriptor, expected):
    assert descriptor_sentence("giraffe", descriptor) == expected


def test_descriptor_sentence_uses_readable_class_name():
    assert descriptor_sentence("apple_pie", "flaky crust") == "apple pie, which has flaky crust"


def test_clip_d_texts_apply_the_rule(tmp_path):
    ls = load_label_set(str(_folder(tmp_path, GOOD)))
    assert ls.texts_for("clip-d") == [
        ["cat, which has whiskers", "cat, which is a small mammal"],
        ["dog, which has a tail"],
    ]


# ------------------------------------------------------------------------------ folders


def test_folder_with_every_role(tmp_path):
    files = dict(GOOD)
    files["llm-pool.json"] = {"cat": ["Cats nap a lot."], "dog": ["Dogs fetch.", "A dog barks."]}
    files["clip-e.json"] = ["a photo of a {}.", "a drawing of a {}."]
    ls = load_label_set(str(_folder(tmp_path, files)), name="my-pets")
    assert ls.name == "my-pets"
    assert ls.classes == ("cat", "dog")
    assert ls.texts_for("clip") == [["a photo of a cat."], ["a photo of a dog."]]
    assert ls.texts_for("cupl") == ls.texts_for("wca") == ls.texts_for("bifta")
    assert ls.texts_for("cupl") == [["A cat is small.", "Cats purr."], ["A dog barks."]]
    assert ls.texts_for("clip-e") == [
        ["a photo of a cat.", "a drawing of a cat."],
        ["a photo of a dog.", "a drawing of a dog."],
    ]
    assert ls.refinement_pool() == [
        ["A cat is small.", "Cats purr.", "Cats nap a lot."],
        ["A dog barks.", "Dogs fetch.", "A dog barks."],
    ]
    assert not ls.templates_are_default


def test_default_templates_when_no_clip_e(tmp_path):
    ls = load_label_set(str(_folder(tmp_path, GOOD)))
    assert ls.templates_are_default
    assert list(ls.templates) == default_templates()
    assert len(ls.templates) == 80
    assert ls.name == "pets"


def test_description_keys_are_normalised(tmp_path):
    files = {
        "classes.json": ["Golden Retriever", "apple_pie"],
        "cupl.json": {"golden   retriever": ["A big dog."], "APPLE PIE": ["A pie."]},
    }
    ls = load_label_set(str(_folder(tmp_path, files)))
    assert ls.sentences == {"Golden Retriever": ("A big dog.",), "apple_pie": ("A pie.",)}


def test_unknown_description_keys_are_ignored(tmp_path, caplog):
    files = {"classes.json": ["cat"], "cupl.json": {"cat": ["Meow."], "zebra": ["Stripes."]}}
    ls = load_label_set(str(_folder(tmp_path, files)))
    assert ls.sentences == {"cat": ("Meow.",)}
    assert "zebra" in caplog.text


def test_synonym_lists(tmp_path):
    files = {
        "classes.json": [["cat", "kitty", "house cat"], "dog"],
        "cupl.json": {"kitty": ["A kitty."], "house cat": ["A house cat."], "dog": ["A dog."]},
    }
    ls = load_label_set(str(_folder(tmp_path, files)))
    assert ls.classes == ("cat", "dog")
    assert ls.synonyms == (("cat", "kitty", "house cat"), ("dog",))
    assert ls.sentences["cat"] == ("A kitty.", "A house cat.")
    assert ls.class_prompts() == ["a photo of a cat.", "a photo of a dog."]


def test_method_without_its_file_names_the_file(tmp_path):
    files = {"classes.json": ["cat", "dog"], "cupl.json": GOOD["cupl.json"]}
    ls = load_label_set(str(_folder(tmp_path, files)))
    with pytest.raises(LabelSetError) as info:
        ls.texts_for("clip-d")
    assert "clip-d.json" in str(info.value) and "--method clip-d" in str(info.value)

    files = {"classes.json": ["cat", "dog"], "clip-d.json": GOOD["clip-d.json"]}
    ls = load_label_set(str(_folder(tmp_path, files, name="no-cupl")))
    for method in ("cupl", "wca", "bifta"):
        with pytest.raises(LabelSetError, match=r"cupl\.json"):
            ls.texts_for(method)
    # methods that need no description file still work
    assert ls.texts_for("clip") and ls.texts_for("clip-e") and ls.texts_for("clip-d")


def test_unknown_method(tmp_path):
    ls = load_label_set(str(_folder(tmp_path, GOOD)))
    with pytest.raises(LabelSetError, match="unknown method 'tip'"):
        ls.texts_for("tip")


def test_content_covers_every_role(tmp_path):
    ls = load_label_set(str(_folder(tmp_path, GOOD)))
    content = ls.content()
    assert content["classes"] == ["cat", "dog"]
    assert content["sentences"] == {"cat": ["A cat is small.", "Cats purr."], "dog": ["A dog barks."]}
    assert content["pool"] is None
    assert len(content["templates"]) == 80
    json.dumps(content)  # serialisable for content hashes


# ------------------------------------------------------------------------------ validation errors


def _error(tmp_path: Path, files: dict, **kwargs) -> str:
    folder = _folder(tmp_path, files)
    with pytest.raises(LabelSetError) as info:
        load_label_set(str(folder), **kwargs)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_classes_without_descriptions_are_named(tmp_path):
    files = {"classes.json": ["cat", "dog", "bird"], "cupl.json": {"cat": ["Meow."]}}
    msg = _error(tmp_path, files)
    assert "cupl.json" in msg and "2 classes" in msg and "'dog'" in msg and "'bird'" in msg


def test_empty_description_list(tmp_path):
    files = {"classes.json": ["cat", "dog"], "clip-d.json": {"cat": ["whiskers"], "dog": ["  "]}}
    msg = _error(tmp_path, files)
    assert "clip-d.json" in msg and "empty list" in msg and "'dog'" in msg


def test_empty_class_list(tmp_path):
    msg = _error(tmp_path, {"classes.json": []})
    assert "classes.json" in msg and "no classes" in msg


def test_empty_class_name(tmp_path):
    msg = _error(tmp_path, {"classes.json": ["cat", "  "]})
    assert "entry 1" in msg and "empty class name" in msg


@pytest.mark.parametrize("entry", [1, None, {"name": "cat"}, [], ["cat", 3]])
def test_non_string_class_entries(entry, tmp_path):
    msg = _error(tmp_path, {"classes.json": ["dog", entry]})
    assert "classes.json" in msg and "entry 1" in msg


def test_classes_file_not_a_list(tmp_path):
    msg = _error(tmp_path, {"classes.json": {"cat": 1}})
    assert "must be a JSON list" in msg


def test_non_string_descriptions(tmp_path):
    files = {"classes.json": ["cat"], "cupl.json": {"cat": ["Meow.", 42]}}
    msg = _error(tmp_path, files)
    assert "cupl.json" in msg and "'cat'" in msg and "non-string" in msg and "42" in msg


def test_descriptions_not_a_list(tmp_path):
    files = {"classes.json": ["cat"], "cupl.json": {"cat": "Meow."}}
    msg = _error(tmp_path, files)
    assert "cupl.json" in msg and "must be a list of strings" in msg


def test_descriptions_not_a_mapping(tmp_path):
    files = {"classes.json": ["cat"], "llm-pool.json": ["Meow."]}
    msg = _error(tmp_path, files)
    assert "llm-pool.json" in msg and "JSON object" in msg


def test_duplicate_class_names(tmp_path):
    files = {"classes.json": ["cat", "dog", "Cat", "dog_"]}
    msg = _error(tmp_path, files)
    assert "repeats 2 class names" in msg and "'cat'" in msg and "'dog'" in msg
    assert "--merge-duplicate-classes" in msg
    merged = load_label_set(str(tmp_path / "pets"), merge_duplicates=True)
    assert merged.classes == ("cat", "dog")
    assert merged.synonyms == (("cat", "Cat"), ("dog", "dog_"))


def test_duplicate_classes_in_plain_list():
    with pytest.raises(LabelSetError, match="repeats 1 class names: 'cat'"):
        load_label_set("cat,dog,cat")
    assert load_label_set("cat,dog,cat", merge_duplicates=True).classes == ("cat", "dog")


def test_malformed_json_reports_line_and_column(tmp_path):
    files = {"classes.json": ["cat"], "cupl.json": '{\n  "cat": ["Meow.",]\n}\n'}
    msg = _error(tmp_path, files)
    assert "cupl.json" in msg and "not valid JSON" in msg and "line 2" in msg and "column" in msg


def test_non_utf8_file(tmp_path):
    folder = _folder(tmp_path, {})
    (folder / "classes.json").write_bytes('["caf\u00e9"]'.encode("latin-1"))
    with pytest.raises(LabelSetError, match="UTF-8"):
        load_label_set(str(folder))


def test_utf8_bom_is_accepted(tmp_path):
    folder = _folder(tmp_path, {})
    (folder / "classes.json").write_bytes('\ufeff["caf\u00e9", "tea"]'.encode("utf-8"))
    assert load_label_set(str(folder)).classes == ("caf\u00e9", "tea")


@pytest.mark.parametrize("template", ["a photo of a cat.", "a {} and a {}.", 7])
def test_bad_templates(template, tmp_path):
    files = dict(GOOD)
    files["clip-e.json"] = ["a photo of a {}.", template]
    msg = _error(tmp_path, files)
    assert "clip-e.json" in msg and "template 1" in msg


def test_empty_template_list(tmp_path):
    files = dict(GOOD)
    files["clip-e.json"] = []
    msg = _error(tmp_path, files)
    assert "clip-e.json" in msg and "non-empty" in msg


def test_folder_without_classes_json(tmp_path):
    folder = _folder(tmp_path, {"cupl.json": GOOD["cupl.json"]})
    with pytest.raises(LabelSetError) as info:
        load_label_set(str(folder))
    assert "classes.json" in str(info.value) and str(folder) in str(info.value)


def test_missing_label_set(tmp_path):
    for spec in (str(tmp_path / "nope"), str(tmp_path / "nope.json"), "classes.txt", "cat"):
        with pytest.raises(LabelSetError, match="label set not found"):
            load_label_set(spec)
    for spec in ("", "   "):
        with pytest.raises(LabelSetError, match="empty --labels"):
            load_label_set(spec)
    with pytest.raises(LabelSetError, match="empty class name"):
        load_label_set("cat,,dog")


def test_label_set_error_is_a_user_error():
    assert issubclass(LabelSetError, BiftaUserError)


# ------------------------------------------------------------------------------ plain class lists


def test_comma_list_uses_templates():
    ls = load_label_set(" cat , dog ")
    assert ls.classes == ("cat", "dog")
    assert ls.is_plain_list
    assert ls.name == "labels"
    templates = default_templates()
    for method in ("cupl", "wca", "bifta", "clip-e"):
        assert ls.texts_for(method) == [[t.format(c) for t in templates] for c in ("cat", "dog")]
    assert ls.texts_for("clip") == [["a photo of a cat."], ["a photo of a dog."]]
    with pytest.raises(LabelSetError, match="clip-d.json"):
        ls.texts_for("clip-d")


def test_txt_classes_file(tmp_path):
    path = tmp_path / "animals.txt"
    path.write_text("# my classes\ncat\n\n  golden   retriever  \nsea_lion\n", encoding="utf-8")
    ls = load_label_set(str(path))
    assert ls.classes == ("cat", "golden retriever", "sea_lion")
    assert ls.name == "animals"
    assert ls.is_plain_list
    assert ls.class_prompts()[2] == "a photo of a sea lion."


def test_json_classes_file_with_synonyms(tmp_path):
    path = _write_json(tmp_path / "mine.json", [["cat", "kitty"], "dog"])
    ls = load_label_set(str(path), name="custom")
    assert ls.name == "custom"
    assert ls.classes == ("cat", "dog")
    assert ls.synonyms == (("cat", "kitty"), ("dog",))
    assert ls.is_plain_list


def test_empty_txt_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("# nothing\n\n", encoding="utf-8")
    with pytest.raises(LabelSetError, match="no classes"):
        load_label_set(str(path))
