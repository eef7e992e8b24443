"""ratta.datasets: the 17 test splits in their real file formats, folder/csv data, and `check`.

Every dataset gets a tiny fake layout (a few classes, a few empty image files) written in the
real formats: CoOp split JSON, FGVC txt files, CUB's four txt files, the RESISC45 test list,
ImageNet's classnames.txt with wnid or numbered folders.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from ratta.cli import main
from ratta.datasets import DATASETS, check, class_names, load_split
from ratta.errors import RattaInputError
from ratta.presets import PRESETS

Expected = tuple[list[tuple[str, int]], list[str]]

WNIDS = {
    "n01440764": "tench",
    "n01443537": "goldfish",
    "n01484850": "great white shark",
    "n01491361": "tiger shark",
    "n01494475": "hammerhead shark",
}


def touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def coop(
    root: Path, name: str, test: list[list], other: list[list], images: str | None = None
) -> Expected:
    """A CoOp split JSON with ``test`` and ``train`` = ``other`` rows, and their image files."""
    info = DATASETS[name]
    write(root / info.files[0], json.dumps({"train": other, "val": [], "test": test}))
    for rel, _, _ in test + other:
        touch(root / info.images / rel)
    names = {label: cls for _, label, cls in test + other}
    prefix = info.images if images is None else images
    return [(f"{prefix}/{rel}", label) for rel, label, _ in test], [
        names[i].replace("_", " ") for i in range(len(names))
    ]


def fake_caltech101(root: Path) -> Expected:
    test = [
        ["car_side/image_0001.jpg", 2, "car_side"],
        ["Faces/image_0002.jpg", 0, "face"],
        ["accordion/image_0003.jpg", 1, "accordion"],
    ]
    train = [["Faces/image_0009.jpg", 0, "face"], ["yin_yang/image_0001.jpg", 3, "yin_yang"]]
    return coop(root, "caltech101", test, train)


def fake_sun397(root: Path) -> Expected:
    test = [
        ["a/apartment_building/outdoor/sun_b.jpg", 1, "outdoor apartment_building"],
        ["a/abbey/sun_a.jpg", 0, "abbey"],
    ]
    return coop(root, "sun397", test, [])


def fake_dtd(root: Path) -> Expected:
    test = [["zigzagged/z_0001.jpg", 1, "zigzagged"], ["banded/b_0001.jpg", 0, "banded"]]
    return coop(root, "dtd", test, [])


def fake_food101(root: Path) -> Expected:
    test = [["apple_pie/1.jpg", 0, "apple_pie"], ["waffles/2.jpg", 1, "waffles"]]
    return coop(root, "food101", test, [])


def fake_flowers102(root: Path) -> Expected:
    test = [
        ["image_00002.jpg", 1, "hard-leaved pocket orchid"],
        ["image_00001.jpg", 0, "pink primrose"],
    ]
    return coop(root, "flowers102", test, [])


def fake_oxford_pets(root: Path) -> Expected:
    test = [
        ["yorkshire_terrier_1.jpg", 1, "yorkshire_terrier"],
        ["Abyssinian_1.jpg", 0, "abyssinian"],
    ]
    return coop(root, "oxford_pets", test, [])


def fake_stanford_cars(root: Path) -> Expected:
    test = [
        ["cars_test/00002.jpg", 1, "2012 Acura RL Sedan"],
        ["cars_test/00001.jpg", 0, "2000 AM General Hummer SUV"],
    ]
    return coop(root, "stanford_cars", test, [["cars_train/00001.jpg", 1, "2012 Acura RL Sedan"]])


def fake_ucf101(root: Path) -> Expected:
    test = [
        ["Apply_Eye_Makeup/v_ApplyEyeMakeup_g01_c01.jpg", 0, "Apply_Eye_Makeup"],
        ["Yo_Yo/v_YoYo_g01_c01.jpg", 1, "Yo_Yo"],
    ]
    return coop(root, "ucf101", test, [])


def fake_caltech256(root: Path) -> Expected:
    """SuS-X's split names classes by folder; faces-easy is dropped, later labels move down."""
    test = [
        ["253.faces-easy-101/0001.jpg", 2, "253.faces-easy-101"],
        ["256.toad/0001.jpg", 3, "256.toad"],
        ["001.ak47/0001.jpg", 0, "001.ak47"],
        ["251.airplanes-101/0001.jpg", 1, "251.airplanes-101"],
    ]
    coop(root, "caltech256", test, [])
    images = "caltech-256/256_ObjectCategories"
    items = [
        (f"{images}/256.toad/0001.jpg", 2),
        (f"{images}/001.ak47/0001.jpg", 0),
        (f"{images}/251.airplanes-101/0001.jpg", 1),
    ]
    return items, ["ak47", "airplane", "toad"]


def fake_fgvc_aircraft(root: Path) -> Expected:
    write(root / "fgvc_aircraft/variants.txt", "707-320\nA300B4\nTornado\n")
    write(root / "fgvc_aircraft/images_variant_test.txt", "0000002 Tornado\n1514522 707-320\n")
    for i in ("0000002", "1514522"):
        touch(root / f"fgvc_aircraft/images/{i}.jpg")
    items = [("fgvc_aircraft/images/0000002.jpg", 2), ("fgvc_aircraft/images/1514522.jpg", 0)]
    return items, ["707-320", "A300B4", "Panavia Tornado"]


def fake_cub200(root: Path) -> Expected:
    """Official CUB txt files: test = train_test_split flag 0, in images.txt order."""
    cub = root / "CUB_200_2011"
    paths = {
        "1": "001.Black_footed_Albatross/Black_Footed_Albatross_0001.jpg",
        "2": "002.Laysan_Albatross/Laysan_Albatross_0001.jpg",
        "3": "200.Common_Yellowthroat/Common_Yellowthroat_0001.jpg",
        "4": "001.Black_footed_Albatross/Black_Footed_Albatross_0002.jpg",
    }
    write(cub / "images.txt", "".join(f"{i} {p}\n" for i, p in paths.items()))
    write(cub / "image_class_labels.txt", "1 1\n2 2\n3 200\n4 1\n")
    write(cub / "train_test_split.txt", "1 0\n2 1\n3 0\n4 0\n")
    write(cub / "classes.txt", "".join(f"{i} {i:03d}.Bird_{i}\n" for i in range(1, 201)))
    for p in paths.values():
        touch(cub / "images" / p)
    items = [(f"CUB_200_2011/images/{paths[i]}", y) for i, y in (("1", 0), ("3", 199), ("4", 0))]
    return items, load_packaged_cub_names()


def load_packaged_cub_names() -> list[str]:
    from ratta.datasets.readers import packaged_class_names

    return packaged_class_names("cub200.txt")


def fake_resisc45(root: Path) -> Expected:
    """Neumann et al.'s test list of file names; the class is the name without ``_NNN.jpg``."""
    write(root / "resisc45/test_splits.txt", "sea_ice_001.jpg\nairplane_010.jpg\nsea_ice_002.jpg\n")
    items = [
        ("resisc45/images/sea_ice/sea_ice_001.jpg", 1),
        ("resisc45/images/airplane/airplane_010.jpg", 0),
        ("resisc45/images/sea_ice/sea_ice_002.jpg", 1),
    ]
    for rel, _ in items:
        touch(root / rel)
    return items, ["airplane", "sea ice"]


def imagenet_names(root: Path) -> None:
    write(root / "imagenet/classnames.txt", "".join(f"{w} {n}\n" for w, n in WNIDS.items()))


def wnid_tree(root: Path, images: str, files: dict[str, list[str]]) -> list[tuple[str, int]]:
    """Class folders ``images/<wnid>/<file>``; the expected items in sorted order."""
    imagenet_names(root)
    for wnid, names in files.items():
        for f in names:
            touch(root / images / wnid / f)
    return [
        (f"{images}/{w}/{f}", label)
        for label, w in enumerate(sorted(files))
        for f in sorted(n for n in files[w] if not n.startswith("."))
    ]


def fake_imagenet(root: Path) -> Expected:
    """Every non-hidden file is kept, whatever its extension (or none)."""
    files = {w: ["ILSVRC2012_val_01.JPEG"] for w in WNIDS}
    files["n01443537"] = ["b.JPEG", "a.png", "noext", ".DS_Store"]
    items = wnid_tree(root, "imagenet/images/val", files)
    touch(root / "imagenet/images/val/.cache/n01440764/hidden.JPEG")
    return items, list(WNIDS.values())


def fake_imagenet_sketch(root: Path) -> Expected:
    files = {w: ["sketch_1.JPEG", "sketch_0.JPEG"] for w in WNIDS}
    return wnid_tree(root, "imagenet-sketch", files), list(WNIDS.values())


def fake_imagenet_adversarial(root: Path) -> Expected:
    """A 200-class subset: labels rank the wnid folders present, names via classnames.txt."""
    items = wnid_tree(
        root, "imagenet-adversarial", {"n01494475": ["0.jpg"], "n01443537": ["1.jpg"]}
    )
    touch(root / "imagenet-adversarial/README.txt")
    return items, ["goldfish", "hammerhead shark"]


def fake_imagenet_rendition(root: Path) -> Expected:
    files = {"n01484850": ["art_0.jpg", "cartoon_0.jpg"], "n01440764": ["art_0.jpg"]}
    items = wnid_tree(root, "imagenet-rendition/imagenet-r", files)
    return items, ["tench", "great white shark"]


def fake_imagenet_v2(root: Path) -> Expected:
    """Folders 0..K-1 are ImageNet labels, taken in numeric order (2 before 10)."""
    names = {f"n{i:08d}": f"class {i}" for i in range(12)}
    write(root / "imagenet/classnames.txt", "".join(f"{w} {n}\n" for w, n in names.items()))
    for folder in ("10", "2", "0"):
        touch(root / "imagenetv2" / folder / "a.jpeg")
    items = [(f"imagenetv2/{f}/a.jpeg", int(f)) for f in ("0", "2", "10")]
    return items, list(names.values())


FAKES: dict[str, Callable[[Path], Expected]] = {
    "caltech101": fake_caltech101,
    "caltech256": fake_caltech256,
    "sun397": fake_sun397,
    "dtd": fake_dtd,
    "fgvc_aircraft": fake_fgvc_aircraft,
    "food101": fake_food101,
    "flowers102": fake_flowers102,
    "oxford_pets": fake_oxford_pets,
    "stanford_cars": fake_stanford_cars,
    "cub200": fake_cub200,
    "resisc45": fake_resisc45,
    "ucf101": fake_ucf101,
    "imagenet": fake_imagenet,
    "imagenet_v2": fake_imagenet_v2,
    "imagenet_sketch": fake_imagenet_sketch,
    "imagenet_adversarial": fake_imagenet_adversarial,
    "imagenet_rendition": fake_imagenet_rendition,
}


def relative(split, root: Path) -> list[tuple[str, int]]:
    return [(p.relative_to(root).as_posix(), y) for p, y in split.items]


# --------------------------------------------------------------------------- registry


def test_registry_names_the_17_datasets_of_the_presets() -> None:
    assert set(DATASETS) == set(PRESETS) == set(FAKES)


def test_registry_holds_the_published_test_counts() -> None:
    counts = {n: d.test_count for n, d in DATASETS.items()}
    assert counts == {
        "imagenet": 50000,
        "caltech101": 2465,
        "dtd": 1692,
        "fgvc_aircraft": 3333,
        "food101": 30300,
        "flowers102": 2463,
        "oxford_pets": 3669,
        "stanford_cars": 8041,
        "sun397": 19850,
        "ucf101": 3783,
        "cub200": 5794,
        "imagenet_v2": 10000,
        "imagenet_sketch": 50889,
        "imagenet_adversarial": 7500,
        "imagenet_rendition": 30000,
        "caltech256": None,
        "resisc45": None,
    }


def test_cub_names_are_the_reference_list() -> None:
    names = load_packaged_cub_names()
    assert len(names) == len(set(names)) == 200
    assert names[0] == "Black-footed Albatross"
    assert names[16] == "Cardinal bird"
    assert names[109] == "Greater Roadrunner"  # 110.Geococcyx
    assert names[140] == "Arctic Tern"  # 141.Artic_Tern
    assert names[-1] == "Common Yellowthroat"


# --------------------------------------------------------------------------- the 17 splits


@pytest.mark.parametrize("name", list(FAKES))
def test_reads_the_test_split_in_order_with_class_names(name: str, tmp_path: Path) -> None:
    items, names = FAKES[name](tmp_path)
    split = load_split(name, tmp_path)
    assert split.name == name
    assert relative(split, tmp_path) == items
    assert split.class_names == names
    assert len(split) == len(items)
    assert all(p.is_absolute() for p, _ in split.items)
    assert class_names(name, tmp_path) == names


def test_class_order_follows_the_split_file_not_the_alphabet(tmp_path: Path) -> None:
    coop(tmp_path, "dtd", [["a/1.jpg", 0, "zigzagged"], ["b/1.jpg", 1, "banded"]], [])
    assert load_split("dtd", tmp_path).class_names == ["zigzagged", "banded"]


def test_underscores_become_spaces(tmp_path: Path) -> None:
    coop(tmp_path, "food101", [["x/1.jpg", 0, "baby_back_ribs"]], [])
    assert load_split("food101", tmp_path).class_names == ["baby back ribs"]


def test_folder_datasets_keep_every_non_hidden_file(tmp_path: Path) -> None:
    val = tmp_path / "imagenet/images/val"
    imagenet_names(tmp_path)
    for f in ("x.JPEG", "y.png", "z", ".hidden.JPEG", "sub/w.jpg"):
        touch(val / "n01440764" / f)
    touch(val / ".trash/n01443537/a.JPEG")
    split = load_split("imagenet", tmp_path)
    kept = [p.relative_to(val / "n01440764").as_posix() for p, _ in split.items]
    assert kept == ["sub/w.jpg", "x.JPEG", "y.png", "z"]
    assert split.class_names == ["tench"]


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("name", list(FAKES))
def test_a_missing_split_file_is_one_line_naming_it(name: str, tmp_path: Path) -> None:
    FAKES[name](tmp_path)
    split_file = tmp_path / DATASETS[name].files[0]
    split_file.unlink()
    with pytest.raises(RattaInputError) as err:
        load_split(name, tmp_path)
    message = str(err.value)
    assert message.startswith(f"{split_file} not found: {name} expects ")
    assert "\n" not in message


def test_a_missing_dataset_folder_names_the_folder_and_the_source(tmp_path: Path) -> None:
    with pytest.raises(RattaInputError, match=r"caltech-101 not found: .*CoOp's DATASETS.md"):
        load_split("caltech101", tmp_path)


@pytest.mark.parametrize(
    ("split", "match"),
    [
        ("[1, 2]", "expected a JSON object with a 'test' list"),
        ("{not json", "not a readable JSON split file"),
        ('{"test": [["a.jpg", "0", "x"]]}', r"test\[0\] is not \[image path, integer label"),
        ('{"test": [["a.jpg", 0, "x"], ["b.jpg", 2, "y"]]}', "labels are not 0..1 .no label 1"),
        ('{"test": [["a.jpg", 0, "x"], ["b.jpg", 0, "y"]]}', "label 0 is named both 'x' and 'y'"),
    ],
)
def test_malformed_split_json_is_one_line(split: str, match: str, tmp_path: Path) -> None:
    write(tmp_path / "dtd/split_zhou_DescribableTextures.json", split)
    (tmp_path / "dtd/images").mkdir()
    with pytest.raises(RattaInputError, match=match):
        load_split("dtd", tmp_path)


def test_an_unknown_fgvc_variant_names_the_line(tmp_path: Path) -> None:
    fake_fgvc_aircraft(tmp_path)
    write(tmp_path / "fgvc_aircraft/images_variant_test.txt", "1 707-320\n2 Concorde\n")
    with pytest.raises(
        RattaInputError, match=re.escape("line 2 variant 'Concorde' is not in variants.txt")
    ):
        load_split("fgvc_aircraft", tmp_path)


def test_a_cub_image_without_a_label_line_is_named(tmp_path: Path) -> None:
    fake_cub200(tmp_path)
    write(tmp_path / "CUB_200_2011/image_class_labels.txt", "1 1\n2 2\n3 200\n")
    with pytest.raises(
        RattaInputError, match=re.escape("image_class_labels.txt: no line for image id 4")
    ):
        load_split("cub200", tmp_path)


def test_a_bad_resisc45_line_is_named(tmp_path: Path) -> None:
    fake_resisc45(tmp_path)
    write(tmp_path / "resisc45/test_splits.txt", "airplane_001.jpg\nairplane.png\n")
    with pytest.raises(
        RattaInputError, match=re.escape("line 2 'airplane.png' is not '<class>_<NNN>.jpg'")
    ):
        load_split("resisc45", tmp_path)


def test_coop_sketch_layout_is_told_to_move_the_wnid_folders_up(tmp_path: Path) -> None:
    imagenet_names(tmp_path)
    touch(tmp_path / "imagenet-sketch/images/n01440764/sketch_0.JPEG")
    with pytest.raises(RattaInputError, match=r"'images' is not a wnid of .*directly in"):
        load_split("imagenet_sketch", tmp_path)


def test_imagenet_v2_folders_must_be_labels(tmp_path: Path) -> None:
    fake_imagenet_v2(tmp_path)
    touch(tmp_path / "imagenetv2/imagenetv2-matched-frequency-format-val/0/a.jpeg")
    with pytest.raises(RattaInputError, match=re.escape("is not a label 0..11")):
        load_split("imagenet_v2", tmp_path)


def test_unknown_dataset_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(RattaInputError, match=r"unknown dataset 'cifar10' \(known: caltech101, "):
        load_split("cifar10", tmp_path)


# --------------------------------------------------------------------------- folder and csv


def test_folder_dataset_sorts_classes_and_files(tmp_path: Path) -> None:
    for f in ("dog/b.jpg", "dog/a.JPEG", "cat/c", "cat/.hidden", "hot_dog/d.png", "notes.txt"):
        touch(tmp_path / f)
    split = load_split("folder", tmp_path)
    assert relative(split, tmp_path) == [
        ("cat/c", 0),
        ("dog/a.JPEG", 1),
        ("dog/b.jpg", 1),
        ("hot_dog/d.png", 2),
    ]
    assert split.class_names == ["cat", "dog", "hot dog"]


def test_folder_dataset_without_class_folders_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(RattaInputError, match="no class folders"):
        load_split("folder", tmp_path)


def test_csv_dataset_resolves_relative_paths_against_the_csv(tmp_path: Path) -> None:
    names = write(tmp_path / "names.txt", "red_fox\n\ncat\n")
    elsewhere = tmp_path / "elsewhere.png"
    csv = write(tmp_path / "data/test.csv", f"path,label\nimgs/a.jpg,1\n{elsewhere},0\n")
    split = load_split("csv", csv, csv_classes=names)
    assert split.items == [(tmp_path / "data/imgs/a.jpg", 1), (elsewhere, 0)]
    assert split.class_names == ["red fox", "cat"]


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        ("a.jpg,2\n", r"line 1 label 2 is outside 0..1"),
        ("a.jpg,x\n", "line 1 label 'x' is not an integer"),
        ("a.jpg\n", "line 1 is not 'path,label'"),
        ("path,label\n", "no rows"),
    ],
)
def test_malformed_csv_is_one_line(rows: str, match: str, tmp_path: Path) -> None:
    names = write(tmp_path / "names.txt", "a\nb\n")
    with pytest.raises(RattaInputError, match=match):
        load_split("csv", write(tmp_path / "t.csv", rows), csv_classes=names)


def test_csv_needs_its_class_names_file(tmp_path: Path) -> None:
    with pytest.raises(RattaInputError, match="csv datasets need csv_classes"):
        load_split("csv", write(tmp_path / "t.csv", "a.jpg,0\n"))


# --------------------------------------------------------------------------- fingerprint


def test_fingerprint_ignores_the_data_root_but_not_labels(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    for root in (one, two):
        fake_caltech101(root)
    a, b = load_split("caltech101", one), load_split("caltech101", two)
    assert a.items != b.items and a.fingerprint() == b.fingerprint()
    relabelled = replace(a, items=[(a.items[0][0], 1), *a.items[1:]])
    assert relabelled.fingerprint() != a.fingerprint()
    renamed = replace(a, class_names=[*a.class_names[:-1], "car"])
    assert renamed.fingerprint() != a.fingerprint()


# --------------------------------------------------------------------------- check


def test_check_reports_found_missing_and_counts(tmp_path: Path) -> None:
    fake_dtd(tmp_path)
    fake_fgvc_aircraft(tmp_path)
    (tmp_path / "fgvc_aircraft/images/1514522.jpg").unlink()
    dtd, fgvc, pets = check(tmp_path, ["dtd", "fgvc_aircraft", "oxford_pets"])
    assert dtd.found and dtd.count == 2 and dtd.classes == 2 and dtd.missing_files == 0
    assert not dtd.complete  # 2 of the published 1,692 test images
    assert fgvc.missing_files == 1
    assert fgvc.first_missing_file == tmp_path / "fgvc_aircraft/images/1514522.jpg"
    assert not pets.found and pets.missing_path == tmp_path / "oxford_pets"


def test_check_names_an_unreadable_split(tmp_path: Path) -> None:
    fake_dtd(tmp_path)
    write(tmp_path / "dtd/split_zhou_DescribableTextures.json", "{}")
    (result,) = check(tmp_path, ["dtd"])
    assert result.found and not result.complete
    assert "expected a JSON object with a 'test' list" in (result.error or "")


def test_cli_check_exits_0_when_complete_and_1_otherwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_dtd(tmp_path)
    args = ["datasets", "check", "--data-root", str(tmp_path), "--datasets", "dtd"]
    assert main(args) == 1
    assert "dtd" in capsys.readouterr().out
    monkeypatch.setitem(DATASETS, "dtd", replace(DATASETS["dtd"], test_count=2, num_classes=2))
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "complete    2 test images of 2" in out and "1 of 1 datasets complete" in out
    assert main([*args, "caltech256"]) == 1
    out = capsys.readouterr().out
    assert f"missing     {tmp_path / 'caltech-256'}" in out and "0 of 2" not in out


def test_check_is_incomplete_while_a_listed_file_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_dtd(tmp_path)
    monkeypatch.setitem(DATASETS, "dtd", replace(DATASETS["dtd"], test_count=2, num_classes=2))
    assert check(tmp_path, ["dtd"])[0].complete
    (tmp_path / "dtd/images/banded/b_0001.jpg").unlink()
    (result,) = check(tmp_path, ["dtd"])
    assert result.count == 2 and result.missing_files == 1 and not result.complete


def test_check_is_incomplete_with_fewer_classes_than_published(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_dtd(tmp_path)
    monkeypatch.setitem(DATASETS, "dtd", replace(DATASETS["dtd"], test_count=2, num_classes=3))
    assert not check(tmp_path, ["dtd"])[0].complete
    assert main(["datasets", "check", "--data-root", str(tmp_path), "--datasets", "dtd"]) == 1
    assert "incomplete  2 test images of 2, 2 of 3 classes" in capsys.readouterr().out


def test_cli_check_of_a_missing_data_root_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["datasets", "check", "--data-root", str(tmp_path / "nope")]) == 2
    assert "data root not found" in capsys.readouterr().err
