"""Readers for the standard metric-learning benchmarks, each from its official list files.

``root`` is the data set's own folder or a data root holding it under its usual name (given per reader). Labels
are ``0..C-1`` over the split's classes in ascending order of the original class id, except In-Shop query and
gallery, which share one label space (the union of their item ids) so query labels match gallery labels.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from recallk.data.image_dataset import ImageDataset, encode_labels
from recallk.data.listing import check_split, class_keys, locate, read_rows
from recallk.data.stores import DirectoryStore

Transform = Callable[[Image.Image], Any] | None


def _dataset(
    base: Path,
    names: Sequence[str],
    keys: Sequence[Hashable],
    transform: Transform,
    skip_bad_images: bool,
    dataset: str,
    class_name: Callable[[Any], str] = str,
    label_space: Sequence[Hashable] | None = None,
) -> ImageDataset:
    if label_space is None:
        labels, classes = encode_labels(keys)
    else:
        classes = sorted(set(label_space))
        index = {k: i for i, k in enumerate(classes)}
        labels = [index[k] for k in keys]
    return ImageDataset(
        DirectoryStore(base), names, labels, [class_name(c) for c in classes], transform=transform,
        skip_bad_images=skip_bad_images, missing_hint=f"the {dataset} images must sit under {base} as listed",
    )


def build_sop(
    root: str | Path, split: str, transform: Transform = None, skip_bad_images: bool = False
) -> ImageDataset:
    """Stanford Online Products: ``Ebay_{train,test}.txt`` (``image_id class_id super_class_id path``).

    Folder: ``root`` or ``root/Stanford_Online_Products``. Train 11,318 classes, test 11,316.
    """
    check_split("sop", split, ("train", "test"))
    list_file = f"Ebay_{split}.txt"
    base, _ = locate(root, [list_file], "Stanford_Online_Products", "Stanford Online Products")
    rows = read_rows(base / list_file, columns=4, skip=1)
    return _dataset(base, [r[3] for r in rows], [int(r[1]) for r in rows], transform, skip_bad_images, "SOP")


def build_cub(
    root: str | Path, split: str, transform: Transform = None, skip_bad_images: bool = False
) -> ImageDataset:
    """CUB-200-2011: ``images.txt`` (``id path``) and ``image_class_labels.txt`` (``id class``), images in ``images/``.

    Folder: ``root`` or ``root/CUB_200_2011``. Classes 1-100 are ``train``, 101-200 ``test``; class names are the
    image folder names (``001.Black_footed_Albatross``).
    """
    check_split("cub", split, ("train", "test"))
    base, _ = locate(root, ["images.txt"], "CUB_200_2011", "CUB-200-2011")
    labels_file = base / "image_class_labels.txt"
    if not labels_file.is_file():
        raise FileNotFoundError(f"CUB-200-2011 file {labels_file} not found; it ships beside images.txt, re-extract it")
    path_of = dict(read_rows(base / "images.txt", columns=2))
    class_of = dict(read_rows(labels_file, columns=2))
    if path_of.keys() != class_of.keys():
        raise ValueError(f"{base / 'images.txt'} and {labels_file} list different image ids; re-extract CUB-200-2011")
    wanted = range(1, 101) if split == "train" else range(101, 201)
    pairs = [(path_of[i], int(c)) for i, c in class_of.items() if int(c) in wanted]
    folder_of = {c: p.split("/")[0] for p, c in pairs}
    return _dataset(
        base / "images", [p for p, _ in pairs], [c for _, c in pairs], transform, skip_bad_images, "CUB-200-2011",
        class_name=folder_of.__getitem__,
    )


def build_cars(
    root: str | Path, split: str, transform: Transform = None, skip_bad_images: bool = False
) -> ImageDataset:
    """Cars196: ``cars_annos.mat`` (fields ``relative_im_path``, ``class``), read with ``scipy.io.loadmat``.

    Folder: ``root`` or ``root/cars196``. Classes 1-98 are ``train``, 99-196 ``test``.
    """
    check_split("cars", split, ("train", "test"))
    base, _ = locate(root, ["cars_annos.mat"], "cars196", "Cars196")
    try:
        from scipy.io import loadmat
    except ImportError as exc:
        raise ImportError("reading Cars196's cars_annos.mat needs scipy: pip install scipy") from exc
    mat = loadmat(base / "cars_annos.mat", simplify_cells=True)
    annotations = mat["annotations"]
    annotations = [annotations] if isinstance(annotations, dict) else list(annotations)
    wanted = range(1, 99) if split == "train" else range(99, 197)
    pairs = [(str(a["relative_im_path"]), int(a["class"])) for a in annotations if int(a["class"]) in wanted]
    names = [str(n) for n in mat.get("class_names", [])]
    return _dataset(
        base, [p for p, _ in pairs], [c for _, c in pairs], transform, skip_bad_images, "Cars196",
        class_name=lambda c: names[c - 1] if c <= len(names) else str(c),
    )


def build_inat2018(
    root: str | Path, split: str, transform: Transform = None, skip_bad_images: bool = False
) -> ImageDataset:
    """iNaturalist 2018 with the Smooth-AP metric-learning split (Brown et al., ECCV 2020).

    Split files ``Inat_dataset_splits/Inaturalist_{train,test}_set1.txt`` (or in the folder itself) list one image
    path per line, relative to the folder, e.g. ``train_val2018/Plantae/7477/<hash>.jpg``; the class is the last two
    folders (``Plantae/7477``). Folder: ``root`` or ``root/inat2018``.
    """
    check_split("inat2018", split, ("train", "test"))
    list_file = f"Inaturalist_{split}_set1.txt"
    base, found = locate(root, [f"Inat_dataset_splits/{list_file}", list_file], "inat2018", "iNaturalist 2018")
    names = [r[0] for r in read_rows(base / found, columns=1)]
    keys = ["/".join(n.split("/")[-3:-1]) for n in names]
    return _dataset(base, names, keys, transform, skip_bad_images, "iNaturalist 2018")


VEHICLEID_TESTS = {"test_small": 800, "test_medium": 1600, "test_large": 2400}


def build_vehicleid(
    root: str | Path, split: str, transform: Transform = None, skip_bad_images: bool = False
) -> ImageDataset:
    """PKU VehicleID: ``train_test_split/{train_list,test_list_800,test_list_1600,test_list_2400}.txt``.

    Lines are ``image_name vehicle_id``; images are ``image/<image_name>.jpg``. Splits ``train``, ``test_small``
    (800 ids), ``test_medium`` (1600), ``test_large`` (2400). Folder: ``root`` or ``root/VehicleID_V1.0``.
    """
    check_split("vehicleid", split, ("train", *VEHICLEID_TESTS))
    list_file = "train_list.txt" if split == "train" else f"test_list_{VEHICLEID_TESTS[split]}.txt"
    base, found = locate(root, [f"train_test_split/{list_file}"], "VehicleID_V1.0", "PKU VehicleID")
    rows = read_rows(base / found, columns=2)
    names = [f"{name}.jpg" for name, _ in rows]
    return _dataset(
        base / "image", names, class_keys([v for _, v in rows]), transform, skip_bad_images, "PKU VehicleID"
    )


def build_inshop(
    root: str | Path, split: str, transform: Transform = None, skip_bad_images: bool = False
) -> ImageDataset:
    """DeepFashion In-Shop: ``list_eval_partition.txt`` (count line, header, then ``image_name item_id status``).

    Splits ``train``, ``query``, ``gallery``; query and gallery share one label space. The partition file is looked
    for in the folder and in ``Eval/``; image names (``img/...``) are relative to the folder or to ``Img/``.
    Folder: ``root`` or ``root/inshop``.
    """
    check_split("inshop", split, ("train", "query", "gallery"))
    base, found = locate(
        root, ["list_eval_partition.txt", "Eval/list_eval_partition.txt"], "inshop", "DeepFashion In-Shop"
    )
    rows = read_rows(base / found, columns=3, skip=2)
    chosen = [(name, item) for name, item, status in rows if status == split]
    space = None if split == "train" else [item for _, item, status in rows if status in ("query", "gallery")]
    image_base = base
    if chosen and not (base / chosen[0][0]).is_file() and (base / "Img" / chosen[0][0]).is_file():
        image_base = base / "Img"
    return _dataset(
        image_base, [n for n, _ in chosen], [i for _, i in chosen], transform, skip_bad_images, "In-Shop",
        label_space=space,
    )
