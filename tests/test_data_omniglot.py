"""Omniglot: zip and folder readers, splits, the decoded-array cache, downloads, and the real zips when present."""

from __future__ import annotations

import functools
import os
import socket
import threading
import zipfile
from collections import Counter
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from recallk.data import build_dataset, build_transforms, load_omniglot_arrays, resolve_data_dir

from data_fixtures import make_omniglot_folder, make_omniglot_zip, md5_of

REAL_DATA = Path(os.environ.get("RECALLK_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """Data root with ``omniglot/images_background.zip`` (5 classes) and ``images_evaluation.zip`` (2 classes)."""
    make_omniglot_zip(tmp_path / "omniglot", "images_background", {"Alpha": 3, "Beta": 2}, drawings=3)
    make_omniglot_zip(tmp_path / "omniglot", "images_evaluation", {"Gamma": 2}, drawings=4)
    return tmp_path


def test_splits_from_zip(root: Path) -> None:
    train = build_dataset("omniglot", root, "train", val_classes=2)
    val = build_dataset("omniglot", root, "val", val_classes=2)
    trainval = build_dataset("omniglot", root, "trainval")
    test = build_dataset("omniglot", root, "test")
    assert (train.num_classes, val.num_classes, trainval.num_classes, test.num_classes) == (3, 2, 5, 2)
    assert (len(train), len(val), len(test)) == (9, 6, 8)
    assert not set(train.class_names) & set(val.class_names)
    assert sorted(train.class_names + val.class_names) == trainval.class_names
    assert trainval.class_names[0] == "Alpha/character01"
    assert trainval.item_ids[0] == "images_background/Alpha/character01/0001_01.png"
    assert set(test.labels.tolist()) == {0, 1} and test.labels.dtype == np.int64


def test_val_selection_is_seeded(root: Path) -> None:
    names = [build_dataset("omniglot", root, "val", val_classes=0.4, seed=s).class_names for s in (0, 0, 1, 2, 3)]
    assert names[0] == names[1] and len(names[0]) == 2
    assert any(n != names[0] for n in names[2:])


def test_bad_val_classes(root: Path) -> None:
    with pytest.raises(ValueError, match="val_classes=5 must be a count in 1..4"):
        build_dataset("omniglot", root, "train", val_classes=5)


def test_images_inverted_grayscale(root: Path) -> None:
    ds = build_dataset("omniglot", root, "test")
    image, label = ds[0]
    assert image.mode == "L" and image.size == (105, 105) and label == 0
    pixels = np.asarray(image)
    assert pixels[0, 0] == 0 and pixels[50, 50] == 255  # dark background, bright ink
    ds.transform = build_transforms("omniglot", 28, train=True)
    tensor, _ = ds[0]
    assert tensor.shape == (1, 28, 28) and tensor.dtype == torch.float32 and 0 <= tensor.min() <= tensor.max() <= 1


def test_extracted_folder_matches_zip(root: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    folder_root = tmp_path_factory.mktemp("extracted")
    make_omniglot_folder(folder_root, "images_background", {"Alpha": 3, "Beta": 2}, drawings=3)
    from_folder = build_dataset("omniglot", folder_root, "train", val_classes=2)  # files directly in root
    from_zip = build_dataset("omniglot", root, "train", val_classes=2)
    assert from_folder.item_ids == from_zip.item_ids and from_folder.class_names == from_zip.class_names
    assert np.array_equal(np.asarray(from_folder[4][0]), np.asarray(from_zip[4][0]))


def test_zip_read_in_worker_processes(root: Path) -> None:
    ds = build_dataset("omniglot", root, "trainval", transform=build_transforms("omniglot", 16, train=False))
    ds[0]  # opens the archive in this process first; workers must open their own
    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=2)
    images = torch.cat([x for x, _ in loader])
    assert images.shape == (15, 1, 16, 16)


def test_empty_class_in_zip_and_folder(tmp_path: Path) -> None:
    make_omniglot_zip(tmp_path / "z" / "omniglot", empty_class=True)
    with pytest.raises(ValueError, match=r"class folder .*Alpha/character99/ has no PNG"):
        build_dataset("omniglot", tmp_path / "z", "trainval")
    make_omniglot_folder(tmp_path / "f")
    (tmp_path / "f/images_background/Beta/character07").mkdir()
    with pytest.raises(ValueError, match=r"Beta/character07/? has no PNG"):
        build_dataset("omniglot", tmp_path / "f", "trainval")


def test_missing_files_say_where_to_put_them(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        build_dataset("omniglot", tmp_path, "test")
    message = str(info.value)
    assert str(tmp_path / "omniglot") in message and "images_evaluation.zip" in message
    assert "download=True" in message and "github.com/brendenlake/omniglot" in message


def test_arrays_match_dataset_and_are_cached(root: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    images, labels = load_omniglot_arrays(root, "train", image_size=14, cache_dir=cache, val_classes=2, num_workers=2)
    ds = build_dataset("omniglot", root, "train", val_classes=2)
    assert images.shape == (9, 1, 14, 14) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and labels.tolist() == ds.labels.tolist()
    expected = np.asarray(ds.load_image(3).resize((14, 14), resample=2))  # 2 = bilinear
    assert np.abs(images[3, 0].numpy().astype(int) - expected).max() <= 1
    assert images[:, :, 0, 0].max() == 0 and images.max() == 255
    cache_file = cache / "omniglot_train_14px_val2_seed0.npz"
    assert cache_file.is_file()
    stamp = cache_file.stat().st_mtime_ns
    again, again_labels = load_omniglot_arrays(root, "train", image_size=14, cache_dir=cache, val_classes=2)
    assert cache_file.stat().st_mtime_ns == stamp  # served from the cache, not rewritten
    assert torch.equal(again, images) and torch.equal(again_labels, labels)


def test_arrays_cache_rebuilt_when_source_changes(root: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    before, _ = load_omniglot_arrays(root, "test", image_size=8, cache_dir=cache)
    (root / "omniglot/images_evaluation.zip").unlink()
    make_omniglot_zip(root / "omniglot", "images_evaluation", {"Gamma": 3}, drawings=4)
    after, labels = load_omniglot_arrays(root, "test", image_size=8, cache_dir=cache)
    assert len(before) == 8 and len(after) == 12 and labels.max() == 2


# ---- downloads ----------------------------------------------------------------------------------------------


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A real HTTP server on 127.0.0.1 serving ``served/images_background.zip``; yields ``(base_url, zip)``."""
    served = make_omniglot_zip(tmp_path / "served", "images_background", {"Alpha": 2}, drawings=2)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(served.parent)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", served
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def test_download_with_correct_checksum(server: tuple[str, Path], tmp_path: Path) -> None:
    base_url, served = server
    checksums = {"images_background": f"md5:{md5_of(served)}"}
    data_root = tmp_path / "data"
    ds = build_dataset("omniglot", data_root, "trainval", download=True, base_url=base_url, checksums=checksums)
    assert ds.num_classes == 2 and len(ds) == 4
    assert (data_root / "omniglot/images_background.zip").read_bytes() == served.read_bytes()
    assert sorted(p.name for p in (data_root / "omniglot").iterdir()) == ["images_background.zip"]


def test_download_with_wrong_checksum_saves_nothing(server: tuple[str, Path], tmp_path: Path) -> None:
    base_url, _ = server
    with pytest.raises(ValueError, match=r"checksum mismatch .*expected md5 0{32}"):
        build_dataset(
            "omniglot", tmp_path / "data", "train", download=True, base_url=base_url,
            checksums={"images_background": "md5:" + "0" * 32},
        )
    assert list((tmp_path / "data/omniglot").iterdir()) == []


def test_offline_download_error_says_where_to_put_files(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    with pytest.raises(FileNotFoundError) as info:
        build_dataset("omniglot", tmp_path, "test", download=True, base_url=f"http://127.0.0.1:{closed_port}")
    message = str(info.value)
    assert "download failed" in message and f"in {tmp_path / 'omniglot'}" in message
    assert "images_evaluation.zip" in message
    assert list((tmp_path / "omniglot").iterdir()) == []


def test_resolve_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RECALLK_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_data_dir("~/d") == Path.home() / "d"
    assert resolve_data_dir() == tmp_path / "env"
    monkeypatch.delenv("RECALLK_DATA")
    assert resolve_data_dir() == tmp_path / "xdg" / "recallk"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert resolve_data_dir() == Path.home() / ".cache" / "recallk"


# ---- the real zips (listing only: nothing is decoded but two images) -----------------------------------------

needs_real = pytest.mark.skipif(
    not (REAL_DATA / "omniglot/images_background.zip").is_file(), reason=f"Omniglot zips not in {REAL_DATA}"
)


@needs_real
def test_real_zip_class_counts() -> None:
    counts = {}
    for part, expected in (("images_background", 964), ("images_evaluation", 659)):
        with zipfile.ZipFile(REAL_DATA / f"omniglot/{part}.zip") as archive:
            pngs = [n for n in archive.namelist() if n.endswith(".png")]
        per_class = Counter(n.rsplit("/", 1)[0] for n in pngs)
        assert len(per_class) == expected and set(per_class.values()) == {20}
        counts[part] = len(pngs)
    assert counts == {"images_background": 964 * 20, "images_evaluation": 659 * 20}


@needs_real
def test_real_splits() -> None:
    train = build_dataset("omniglot", REAL_DATA, "train")
    val = build_dataset("omniglot", REAL_DATA, "val")
    test = build_dataset("omniglot", REAL_DATA, "test")
    assert (train.num_classes, val.num_classes, test.num_classes) == (864, 100, 659)
    assert (len(train), len(val), len(test)) == (864 * 20, 100 * 20, 659 * 20)
    assert np.array_equal(np.bincount(test.labels), np.full(659, 20))
    assert not set(train.class_names) & set(val.class_names)
    image, _ = test[len(test) - 1]
    pixels = np.asarray(image)
    assert image.size == (105, 105) and np.median(pixels) == 0 and pixels.max() == 255
