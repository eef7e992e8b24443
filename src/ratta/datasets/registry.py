"""The 17 test splits of the paper as data: where each lives under the data root, how it is read.

Folder and file names follow the reference code's loaders (``src/dataloader/*.py`` of
kaist-dmlab/RA-TTA), which mostly follow CoOp's DATASETS.md; see docs/datasets.md.
"""

from __future__ import annotations

from dataclasses import dataclass

COOP = "download it as in CoOp's DATASETS.md"
IMAGENET_NAMES = "imagenet/classnames.txt"


@dataclass(frozen=True)
class DatasetInfo:
    """Where one dataset's test split lives under the data root and how it is read.

    Attributes:
        name: ratta's dataset name (a key of :data:`ratta.presets.PRESETS`).
        folder: the dataset folder under the data root; a split's fingerprint takes its image
            paths relative to it.
        images: the image folder under the data root.
        image_pattern: what lies below ``images`` (for the layout line).
        files: metadata files under the data root, the split file first.
        reader: how the files are read (a key of ``ratta.datasets.readers.READERS``).
        test_count: images in the published test split; None where no source states it.
        num_classes: classes of the test split.
        source: how to get the files, the hint of 'not found' errors.
        renames: ``(name in the metadata, name in the reference code)`` pairs, for the few names
            the reference code spells by hand.
        drop: classes the reference code removes from the split; later labels move down.
        name_pattern: regular expression whose group 1 is the class name inside the split
            file's names (for split files that store folder names).
        class_names_file: package data file (``classnames/<file>``) with the reference code's
            names in label order, for metadata that spells most names differently.
    """

    name: str
    folder: str
    images: str
    image_pattern: str
    files: tuple[str, ...]
    reader: str
    test_count: int | None
    num_classes: int
    source: str = COOP
    renames: tuple[tuple[str, str], ...] = ()
    drop: tuple[str, ...] = ()
    name_pattern: str = ""
    class_names_file: str = ""

    @property
    def required(self) -> tuple[str, ...]:
        """Paths under the data root that must exist, in the order they are checked."""
        return tuple(dict.fromkeys((self.folder, *self.files, self.images)))

    @property
    def layout(self) -> str:
        """One line describing the expected files under the data root."""
        return ", ".join((f"{self.images}/{self.image_pattern}", *self.files))


def _coop(
    name: str, folder: str, images: str, split: str, count: int, classes: int, pattern: str
) -> DatasetInfo:
    return DatasetInfo(
        name,
        folder,
        f"{folder}/{images}" if images else folder,
        pattern,
        (f"{folder}/{split}",),
        "coop_json",
        count,
        classes,
    )


def _imagenet(
    name: str, images: str, count: int, classes: int, source: str, *, numbered: bool = False
) -> DatasetInfo:
    return DatasetInfo(
        name,
        images.split("/")[0],
        images,
        "<0..999>/<image>" if numbered else "<wnid>/<image>",
        (IMAGENET_NAMES,),
        "index_folders" if numbered else "wnid_folders",
        count,
        classes,
        source,
    )


def _release(what: str, folder: str) -> str:
    return f"put the {what} folders directly in {folder}/, see docs/datasets.md"


DATASETS: dict[str, DatasetInfo] = {
    d.name: d
    for d in (
        _coop(
            "caltech101",
            "caltech-101",
            "101_ObjectCategories",
            "split_zhou_Caltech101.json",
            2465,
            100,
            "<class>/<image>",
        ),
        DatasetInfo(
            "caltech256",
            "caltech-256",
            "caltech-256/256_ObjectCategories",
            "<NNN.class>/<image>",
            ("caltech-256/split_Caltech256.json",),
            "coop_json",
            None,
            256,
            source="download it as in SuS-X's data/DATA.md",
            renames=(
                ("airplanes", "airplane"),
                ("leopards", "leopard"),
                ("motorbikes", "motorbike"),
            ),
            drop=("faces-easy",),
            name_pattern=r"\d+\.(.+?)(?:-101)?",
        ),
        _coop(
            "sun397",
            "sun397",
            "SUN397",
            "split_zhou_SUN397.json",
            19850,
            397,
            "<letter>/<class>/<image>",
        ),
        _coop(
            "dtd",
            "dtd",
            "images",
            "split_zhou_DescribableTextures.json",
            1692,
            47,
            "<class>/<image>",
        ),
        DatasetInfo(
            "fgvc_aircraft",
            "fgvc_aircraft",
            "fgvc_aircraft/images",
            "<id>.jpg",
            ("fgvc_aircraft/variants.txt", "fgvc_aircraft/images_variant_test.txt"),
            "fgvc_txt",
            3333,
            100,
            renames=(("Tornado", "Panavia Tornado"),),
        ),
        _coop(
            "food101",
            "food-101",
            "images",
            "split_zhou_Food101.json",
            30300,
            101,
            "<class>/<image>",
        ),
        _coop(
            "flowers102",
            "oxford_flowers",
            "jpg",
            "split_zhou_OxfordFlowers.json",
            2463,
            102,
            "<image>",
        ),
        _coop(
            "oxford_pets",
            "oxford_pets",
            "images",
            "split_zhou_OxfordPets.json",
            3669,
            37,
            "<image>",
        ),
        _coop(
            "stanford_cars",
            "stanford_cars",
            "",
            "split_zhou_StanfordCars.json",
            8041,
            196,
            "cars_test/<image>",
        ),
        DatasetInfo(
            "cub200",
            "CUB_200_2011",
            "CUB_200_2011/images",
            "<class>/<image>",
            tuple(
                f"CUB_200_2011/{f}.txt"
                for f in ("images", "image_class_labels", "train_test_split", "classes")
            ),
            "cub_txt",
            5794,
            200,
            source="extract the official CUB_200_2011.tgz into the data root",
            class_names_file="cub200.txt",
        ),
        DatasetInfo(
            "resisc45",
            "resisc45",
            "resisc45/images",
            "<class>/<class>_<NNN>.jpg",
            ("resisc45/test_splits.txt",),
            "resisc_txt",
            None,
            45,
            source="NWPU-RESISC45 plus Neumann et al.'s resisc45-test.txt, see docs/datasets.md",
        ),
        _coop(
            "ucf101",
            "ucf101",
            "UCF-101-midframes",
            "split_zhou_UCF101.json",
            3783,
            101,
            "<Action_Name>/<frame>",
        ),
        _imagenet("imagenet", "imagenet/images/val", 50000, 1000, COOP),
        _imagenet(
            "imagenet_v2",
            "imagenetv2",
            10000,
            1000,
            _release("ImageNetV2 matched-frequency 0..999", "imagenetv2"),
            numbered=True,
        ),
        _imagenet(
            "imagenet_sketch",
            "imagenet-sketch",
            50889,
            1000,
            _release("ImageNet-Sketch wnid", "imagenet-sketch"),
        ),
        _imagenet(
            "imagenet_adversarial",
            "imagenet-adversarial",
            7500,
            200,
            _release("ImageNet-A wnid", "imagenet-adversarial"),
        ),
        _imagenet("imagenet_rendition", "imagenet-rendition/imagenet-r", 30000, 200, COOP),
    )
}
