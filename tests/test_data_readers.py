"""Every benchmark and generic reader on a tiny fixture written in its official on-disk format."""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from recallk.data import BadImageError, ImageDataset, build_dataset, build_transforms

from data_fixtures import (
    make_cars,
    make_csv,
    make_cub,
    make_folder,
    make_glyph_folder,
    make_inat,
    make_inshop,
    make_sop,
    make_vehicleid,
    write_corrupt_image,
    write_image,
)


def check_contract(ds: ImageDataset, n: int, classes: int) -> None:
    """The attributes every reader promises, and one item through a transform."""
    assert len(ds) == n == len(ds.item_ids)
    assert ds.labels.dtype == np.int64 and ds.labels.shape == (n,)
    assert ds.num_classes == classes == len(ds.class_names)
    assert set(ds.labels.tolist()) == set(range(classes))
    assert all(isinstance(c, str) for c in ds.class_names)
    image, label = ds[0]
    assert isinstance(image, Image.Image) and image.mode == "RGB"
    assert label == ds.labels[0]


def test_sop(tmp_path: Path) -> None:
    make_sop(tmp_path / "Stanford_Online_Products")
    train = build_dataset("sop", tmp_path, "train")  # data root holding the usual folder name
    test = build_dataset("sop", tmp_path / "Stanford_Online_Products", "test")  # or the folder itself
    check_contract(train, 6, 2)
    check_contract(test, 6, 3)
    assert train.class_names == ["1", "2"] and test.class_names == ["3", "4", "5"]
    assert train.item_ids[0] == "bicycle_final/1_0.JPG"
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_cub_class_halves(tmp_path: Path) -> None:
    make_cub(tmp_path)
    train, test = build_dataset("cub", tmp_path, "train"), build_dataset("cub", tmp_path, "test")
    check_contract(train, 4, 2)
    check_contract(test, 4, 2)
    assert train.class_names == ["001.Bird_1", "002.Bird_2"]
    assert test.class_names == ["101.Bird_101", "102.Bird_102"]
    assert train[2][0].getpixel((0, 0))[0] in range(0, 6)  # JPEG of grey level 2


def test_cars_from_mat(tmp_path: Path) -> None:
    pytest.importorskip("scipy")
    make_cars(tmp_path)
    train, test = build_dataset("cars", tmp_path, "train"), build_dataset("cars", tmp_path, "test")
    check_contract(train, 4, 2)
    check_contract(test, 4, 2)
    assert train.class_names == ["Car model 1", "Car model 2"]
    assert test.class_names == ["Car model 99", "Car model 100"]
    assert test.item_ids[0] == "car_ims/000005.jpg"


def test_inat2018_smooth_ap_split(tmp_path: Path) -> None:
    make_inat(tmp_path)
    train = build_dataset("inat2018", tmp_path, "train")
    check_contract(train, 4, 2)
    assert train.class_names == ["Aves/20", "Plantae/10"]
    assert train.labels.tolist() == [1, 1, 0, 0]
    check_contract(build_dataset("inat2018", tmp_path, "test"), 2, 1)


def test_vehicleid_test_sizes(tmp_path: Path) -> None:
    make_vehicleid(tmp_path / "VehicleID_V1.0")
    check_contract(build_dataset("vehicleid", tmp_path, "train"), 4, 2)
    for split, ids in (("test_small", 1), ("test_medium", 2), ("test_large", 3)):
        ds = build_dataset("vehicleid", tmp_path, split)
        check_contract(ds, 2 * ids, ids)
    assert ds.item_ids[0] == "0007000.jpg" and ds.class_names == ["7", "8", "9"]


def test_inshop_query_gallery_share_labels(tmp_path: Path) -> None:
    make_inshop(tmp_path)
    train = build_dataset("inshop", tmp_path, "train")
    query = build_dataset("inshop", tmp_path, "query")
    gallery = build_dataset("inshop", tmp_path, "gallery")
    check_contract(train, 4, 2)
    assert len(query) == 2 and len(gallery) == 4
    assert query.class_names == gallery.class_names == ["id_03", "id_04", "id_05"]
    assert query.labels.tolist() == [0, 1] and gallery.labels.tolist() == [0, 1, 1, 2]
    assert query.item_ids[0].startswith("img/WOMEN/Dresses/id_03/")


def test_folder_tree(tmp_path: Path) -> None:
    make_folder(tmp_path)
    ds = build_dataset("folder", tmp_path, "train")
    check_contract(ds, 5, 2)
    assert ds.class_names == ["cat", "dog"]
    assert "cat/more/2.JPEG" in ds.item_ids  # nested, upper-case extension; notes.txt ignored
    check_contract(build_dataset("folder", tmp_path / "train", "all"), 5, 2)


def test_csv_numeric_labels(tmp_path: Path) -> None:
    make_csv(tmp_path)
    ds = build_dataset("csv", tmp_path, "train")
    check_contract(ds, 4, 2)
    assert ds.class_names == ["2", "10"] and ds.labels.tolist() == [1, 1, 0, 0]
    assert len(build_dataset("csv", tmp_path / "train.csv", "ignored")) == 4


def test_transform_applied_and_dataloader_batches(tmp_path: Path) -> None:
    make_sop(tmp_path)
    ds = build_dataset("sop", tmp_path, "train", transform=build_transforms("imagenet", 16, train=True))
    images, labels = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert images.shape == (4, 3, 16, 16) and labels.tolist() == [0, 0, 0, 1]


# ---- errors -------------------------------------------------------------------------------------------------


def test_unknown_dataset_lists_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'.*omniglot.*sop.*csv"):
        build_dataset("imagenet", tmp_path, "train")


def test_unknown_split(tmp_path: Path) -> None:
    make_vehicleid(tmp_path)
    with pytest.raises(ValueError, match="split 'test'.*test_small"):
        build_dataset("vehicleid", tmp_path, "test")


@pytest.mark.parametrize(
    ("name", "make", "missing"),
    [
        ("sop", make_sop, "Ebay_train.txt"),
        ("cub", make_cub, "images.txt"),
        ("inat2018", make_inat, "Inaturalist_train_set1.txt"),
        ("vehicleid", make_vehicleid, "train_list.txt"),
        ("inshop", make_inshop, "list_eval_partition.txt"),
        ("csv", make_csv, "train.csv"),
    ],
)
def test_missing_split_file(tmp_path: Path, name: str, make, missing: str) -> None:  # noqa: ANN001
    make(tmp_path)
    for path in tmp_path.rglob(missing):
        path.unlink()
    with pytest.raises(FileNotFoundError, match=missing.replace(".", r"\.")):
        build_dataset(name, tmp_path, "train")


def test_missing_cars_mat(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"cars_annos\.mat.*download and extract Cars196"):
        build_dataset("cars", tmp_path, "train")


def test_missing_image_named(tmp_path: Path) -> None:
    make_cub(tmp_path)
    (tmp_path / "images/002.Bird_2/Bird_2_1.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 4 listed images are missing.*Bird_2_1\.jpg"):
        build_dataset("cub", tmp_path, "train")


def test_corrupt_image_raises_naming_file(tmp_path: Path) -> None:
    make_sop(tmp_path)
    bad = write_corrupt_image(tmp_path / "bicycle_final/2_1.JPG")
    ds = build_dataset("sop", tmp_path, "train")
    assert len(ds) == 6
    ds[0]  # good images still load
    with pytest.raises(BadImageError, match=rf"{bad}.*skip_bad_images=True"):
        ds[4]


def test_corrupt_and_truncated_images_skipped_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_folder(tmp_path)
    write_corrupt_image(tmp_path / "train/dog/0.png")
    good = (tmp_path / "train/dog/1.png").read_bytes()
    (tmp_path / "train/cat/0.png").write_bytes(good[: len(good) // 2])  # truncated PNG
    with caplog.at_level(logging.WARNING, logger="recallk.data"):
        ds = build_dataset("folder", tmp_path, "train", skip_bad_images=True)
    assert len(ds) == 3 and "dog/0.png" not in ds.item_ids and "cat/0.png" not in ds.item_ids
    assert "skipped 2 of 5 images" in caplog.text
    assert [ds[i][1] for i in range(len(ds))] == [0, 0, 1]


def test_all_images_bad_is_an_error(tmp_path: Path) -> None:
    make_csv(tmp_path)
    for k in range(4):
        write_corrupt_image(tmp_path / "pics" / f"{k}.png")
    with pytest.raises(BadImageError, match="none of the 4"):
        build_dataset("csv", tmp_path, "train", skip_bad_images=True)


def test_empty_class_folder(tmp_path: Path) -> None:
    make_folder(tmp_path)
    (tmp_path / "train" / "emu").mkdir()
    with pytest.raises(ValueError, match=r"class folder .*emu has no images"):
        build_dataset("folder", tmp_path, "train")


def test_missing_folder_split(tmp_path: Path) -> None:
    make_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"image folder .*test not found"):
        build_dataset("folder", tmp_path, "test")


def test_csv_without_header(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png")
    (tmp_path / "train.csv").write_text("a.png,1\n")
    with pytest.raises(ValueError, match="header naming the columns 'path' and 'label'"):
        build_dataset("csv", tmp_path, "train")


def test_malformed_list_line(tmp_path: Path) -> None:
    make_vehicleid(tmp_path)
    with open(tmp_path / "train_test_split/train_list.txt", "a") as f:
        f.write("0001009\n")
    with pytest.raises(ValueError, match=r"train_list\.txt line 5: expected 2 fields"):
        build_dataset("vehicleid", tmp_path, "train")


def test_worker_processes_read_images(tmp_path: Path) -> None:
    make_inat(tmp_path)
    shutil.rmtree(tmp_path / "train_val2018/Insecta")  # test split not needed here
    ds = build_dataset("inat2018", tmp_path, "train", transform=build_transforms("imagenet", 8, train=False))
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    assert torch.cat([y for _, y in loader]).tolist() == ds.labels.tolist()


def _warn_each_step() -> None:
    warnings.warn("a warning Python shows once per location", UserWarning, stacklevel=1)


@pytest.mark.parametrize("skip_bad_images", [False, True])
def test_reading_images_leaves_once_only_warnings_once(tmp_path: Path, skip_bad_images: bool) -> None:
    """A warning shown once per location stays shown once while images are read in the same process
    (``data.num_workers=0``): reading an image no longer enters ``warnings.catch_warnings()``, which reset Python's
    once-registry and so repeated such a warning at every training step."""
    root = make_glyph_folder(tmp_path / "glyphs")
    dataset = build_dataset("folder", root, "train", transform=build_transforms("omniglot", 16, True),
                            skip_bad_images=skip_bad_images)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's own action for UserWarning: once per location
        for step in range(5):
            dataset[step]
            _warn_each_step()
    assert [str(w.message) for w in caught] == ["a warning Python shows once per location"]


def test_checking_images_leaves_once_only_warnings_once(tmp_path: Path) -> None:
    """``image_error`` (the check of every image before the work, e.g. of the landmark benchmarks) leaves Python's
    once-registry alone too: no ``warnings.catch_warnings()`` per image."""
    from recallk.data.image_dataset import image_error

    image = sorted((make_glyph_folder(tmp_path / "glyphs") / "train").rglob("*.png"))[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(5):
            assert image_error(image) is None
            _warn_each_step()
    assert [str(w.message) for w in caught] == ["a warning Python shows once per location"]
