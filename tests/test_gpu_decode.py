"""data.decode: gpu -- JPEG batches decoded and augmented on the training device, the same code on the CPU and CUDA.

The CPU run of the device path is compared with the Pillow path on real JPEG files: the same crops and flips for
the same seeds (the crop parameters exactly, the pixels within resampling tolerance), the same batches whatever
the number of workers, and the process's random generators left as the Pillow path leaves them.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from recallk.config import load_config
from recallk.data.device_augment import (
    CropRecipe,
    augment_batch,
    crop_parameters,
    decode_jpegs,
    decoder_problem,
)
from recallk.data.folder_csv import build_folder
from recallk.data.image_dataset import BadImageError
from recallk.data.sampler import PlannedBatch
from recallk.data.sources import DatasetSource, DeviceDecodeSource, device_decode_recipe
from recallk.data.transforms import IMAGENET_STD, build_transforms
from recallk.errors import ConfigError, RecallkUsageError

SIZE = 48
SHAPES = [(120, 160), (160, 120), (97, 211), (300, 40), (64, 64), (50, 333)]  # (height, width), fallbacks too


def structured_image(height: int, width: int, seed: int) -> Image.Image:
    """Smooth gradients plus a few sharp rectangles: a wrong crop or a missed flip changes it clearly."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    channels = [127 + 100 * np.sin(x / rng.uniform(8, 30) + c) * np.cos(y / rng.uniform(8, 30) - c) for c in range(3)]
    image = np.stack(channels, axis=-1)
    for _ in range(4):
        top, left = int(rng.integers(0, height - 8)), int(rng.integers(0, width - 8))
        image[top : top + height // 5, left : left + width // 5] = rng.integers(0, 256, 3)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def write_jpeg_folder(root: Path, per_class: int = 3) -> Path:
    """Two classes of real JPEG files of the sizes in ``SHAPES`` (quality 95)."""
    for n in range(2 * per_class):
        height, width = SHAPES[n % len(SHAPES)]
        path = root / f"class_{n % 2}" / f"image_{n}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        structured_image(height, width, n).save(path, quality=95)
    return root


def training_split(root: Path, **options: object):
    return build_folder(root, transform=build_transforms("imagenet", SIZE, train=True), **options)


def planned(indices: list[int], batch: int = 0) -> list[PlannedBatch]:
    return [PlannedBatch(epoch=3, batch=batch, indices=indices, offset=0, total=len(indices))]


def test_crop_parameters_are_the_draws_of_torchvisions_random_resized_crop_and_flip() -> None:
    recipe = CropRecipe.of(build_transforms("imagenet", SIZE, train=True))
    assert recipe is not None and recipe.scale == (0.08, 1.0) and recipe.flip_p == 0.5
    flips = []
    for height, width in [*SHAPES, (10, 1000), (1000, 10), (3, 3)]:  # the thin ones take the central fallback
        image = torch.zeros(3, height, width)
        for seed in range(40):
            torch.manual_seed(seed)  # what the Pillow path's worker does before the transform
            expected = T.RandomResizedCrop.get_params(image, list(recipe.scale), list(recipe.ratio))
            flip = bool(torch.rand(1) < 0.5)
            assert crop_parameters(height, width, seed, recipe) == (*expected, flip), (height, width, seed)
            flips.append(flip)
    assert 0.3 < np.mean(flips) < 0.7


def test_recipe_only_for_the_random_resized_crop_transforms() -> None:
    timm_like = T.Compose([T.Lambda(lambda im: im), T.RandomResizedCrop(32, interpolation=T.InterpolationMode.BICUBIC),
                           T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
    recipe = CropRecipe.of(timm_like)
    assert recipe is not None and recipe.interpolation == T.InterpolationMode.BICUBIC and recipe.mean == (0.5,) * 3
    assert CropRecipe.of(build_transforms("imagenet", SIZE, train=False)) is None
    assert CropRecipe.of(build_transforms("omniglot", SIZE, train=True)) is None
    assert CropRecipe.of(None) is None


@pytest.mark.parametrize("workers", [0, 2])
def test_device_path_on_the_cpu_cuts_the_crops_of_the_pillow_path(tmp_path: Path, workers: int) -> None:
    dataset = training_split(write_jpeg_folder(tmp_path))
    recipe = CropRecipe.of(dataset.transform)
    assert recipe is not None
    order = [5, 0, 3, 1, 4, 2]
    (pil, pil_labels), = DatasetSource(dataset).train_batches(planned(order), seed=7)
    (device, device_labels), = DeviceDecodeSource(dataset, recipe, torch.device("cpu"), workers).train_batches(
        planned(order), seed=7
    )
    assert device.shape == pil.shape == (6, 3, SIZE, SIZE) and device.dtype == torch.float32
    assert torch.equal(device_labels, pil_labels)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    levels = ((device - pil) * std).abs()  # differences in 0-255 pixel levels
    assert float(levels.max()) <= 1.01 and float(levels.mean()) < 0.05  # torch's uint8 resize matches Pillow's
    (other, _), = DeviceDecodeSource(dataset, recipe, torch.device("cpu")).train_batches(planned(order), seed=8)
    assert float(((other - pil) * std).abs().mean()) > 10 * float(levels.mean())  # the check tells crops apart


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_path_on_cuda_cuts_the_crops_of_the_pillow_path(tmp_path: Path) -> None:
    dataset = training_split(write_jpeg_folder(tmp_path))
    order = [5, 0, 3, 1, 4, 2]
    (pil, _), = DatasetSource(dataset).train_batches(planned(order), seed=7)
    source = DeviceDecodeSource(dataset, CropRecipe.of(dataset.transform), torch.device("cuda"), num_workers=2)
    (device, _), = source.train_batches(planned(order), seed=7)
    assert device.is_cuda
    levels = ((device.cpu() - pil) * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255).abs()
    assert float(levels.mean()) < 2.0 and float(levels.flatten(1).mean(1).max()) < 3.0  # nvJPEG, float resize


def test_an_items_augmentation_depends_on_its_seed_only_and_leaves_the_global_generator_alone(tmp_path: Path) -> None:
    dataset = training_split(write_jpeg_folder(tmp_path))
    recipe = CropRecipe.of(dataset.transform)
    source = DeviceDecodeSource(dataset, recipe, torch.device("cpu"), num_workers=0)
    torch.manual_seed(0)
    two = list(source.train_batches([*planned([0, 1]), *planned([2, 3], batch=1)], seed=11))
    after_device = torch.get_rng_state()
    torch.manual_seed(0)
    list(DatasetSource(dataset).train_batches([*planned([0, 1]), *planned([2, 3], batch=1)], seed=11))
    assert torch.equal(after_device, torch.get_rng_state()), "the two paths use the global generator alike"
    (alone, _), = source.train_batches(planned([2, 3], batch=1), seed=11)  # batch 1 without batch 0: a resume
    assert torch.equal(alone, two[1][0])


def test_augment_batch_draws_per_image_and_normalises(tmp_path: Path) -> None:
    recipe = CropRecipe.of(build_transforms("imagenet", 16, train=True))
    flat = torch.full((3, 40, 30), 200, dtype=torch.uint8)
    batch = augment_batch([flat, flat], [1, 2], recipe)
    expected = (200 / 255 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor(IMAGENET_STD)
    assert batch.shape == (2, 3, 16, 16) and torch.allclose(batch[:, :, 0, 0], expected.expand(2, 3), atol=1e-5)
    with pytest.raises(ValueError, match="2 images but 1 seeds"):
        augment_batch([flat, flat], [1], recipe)


def test_decode_jpegs_reads_gray_jpegs_as_rgb(tmp_path: Path) -> None:
    path = tmp_path / "gray.jpg"
    Image.new("L", (20, 10), 90).save(path)
    (image,) = decode_jpegs([torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)], torch.device("cpu"))
    assert image.shape == (3, 10, 20) and image.dtype == torch.uint8 and abs(int(image.float().mean()) - 90) <= 1


def test_an_undecodable_jpeg_is_one_line_naming_the_file(tmp_path: Path) -> None:
    root = write_jpeg_folder(tmp_path)
    broken = root / "class_1" / "image_3.jpg"
    broken.write_bytes(broken.read_bytes()[:200])  # cut after the header: Pillow's verify() may pass it
    dataset = training_split(root)
    source = DeviceDecodeSource(dataset, CropRecipe.of(dataset.transform), torch.device("cpu"))
    with pytest.raises(BadImageError, match=r"cannot decode JPEG .*image_3\.jpg on cpu .*data\.decode=cpu"):
        list(source.train_batches(planned(list(range(6))), seed=0))


def test_closing_the_batches_stops_the_background_thread(tmp_path: Path) -> None:
    dataset = training_split(write_jpeg_folder(tmp_path))
    source = DeviceDecodeSource(dataset, CropRecipe.of(dataset.transform), torch.device("cpu"))
    batches = source.train_batches([*planned([0, 1]), *planned([2, 3], batch=1), *planned([4, 5], batch=2)], seed=0)
    next(batches)
    batches.close()
    assert not [t for t in threading.enumerate() if t.name == "recallk-device-decode"]


def test_auto_picks_the_device_path_only_where_it_applies(tmp_path: Path) -> None:
    jpegs = training_split(write_jpeg_folder(tmp_path / "jpeg"))
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # device objects: the checks come before any decoding
    assert device_decode_recipe("cpu", jpegs, cuda) is None
    assert device_decode_recipe("auto", jpegs, cpu) is None
    with pytest.raises(RecallkUsageError, match="^data.decode=gpu needs a CUDA training device, and training runs on "
                                                "cpu; set data.decode=cpu"):
        device_decode_recipe("gpu", jpegs, cpu)
    png_root = write_jpeg_folder(tmp_path / "png")
    Image.new("RGB", (20, 20)).save(png_root / "class_0" / "extra.png")
    pngs = training_split(png_root)
    assert device_decode_recipe("auto", pngs, cuda) is None
    with pytest.raises(RecallkUsageError, match=r"JPEG files only .*extra\.png is not one"):
        device_decode_recipe("gpu", pngs, cuda)
    gray = training_split(tmp_path / "jpeg", grayscale=True)
    with pytest.raises(RecallkUsageError, match="RGB images, not grayscale"):
        device_decode_recipe("gpu", gray, cuda)
    omniglot = build_folder(tmp_path / "jpeg", transform=build_transforms("omniglot", SIZE, train=True))
    assert device_decode_recipe("auto", omniglot, cuda) is None
    assert decoder_problem(cpu) is None
    if not torch.cuda.is_available():  # the decoder itself is tried last: here it fails, in one line
        assert device_decode_recipe("auto", jpegs, cuda) is None
        with pytest.raises(RecallkUsageError, match="^data.decode=gpu cannot decode JPEG files on cuda: torchvision's "
                                                    r"decoder fails \(.+\); set data.decode=cpu"):
            device_decode_recipe("gpu", jpegs, cuda)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_and_gpu_take_the_device_path_on_cuda(tmp_path: Path) -> None:
    jpegs = training_split(write_jpeg_folder(tmp_path))
    assert decoder_problem(torch.device("cuda")) is None
    for decode in ("auto", "gpu"):
        assert device_decode_recipe(decode, jpegs, torch.device("cuda")) == CropRecipe.of(jpegs.transform)


def test_config_takes_cpu_gpu_auto_and_names_the_closest(tmp_path: Path) -> None:
    assert load_config(None, []).data.decode == "cpu"
    assert load_config(None, ["data.decode=auto"]).data.decode == "auto"
    with pytest.raises(ConfigError, match="did you mean 'gpu'"):
        load_config(None, ["data.decode=gpus"])


@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]])
def test_train_with_decode_gpu_without_a_gpu_is_one_line(tmp_path: Path, dry_run: list[str]) -> None:
    """Training and its dry run refuse it alike: the dry run checks the training split on the training device."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    done = _train_jpegs(tmp_path, "train.device=cpu", *dry_run)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "data.decode=gpu needs a CUDA training device, and training runs on cpu; set data.decode=cpu" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_dry_run_of_decode_gpu_passes_on_a_gpu(tmp_path: Path) -> None:
    done = _train_jpegs(tmp_path, "--dry-run")  # train.device=auto: the GPU, as training would use
    assert done.returncode == 0, done.stderr[-2000:]


def _train_jpegs(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """``recallk train`` of a small JPEG folder with ``data.decode=gpu`` and ``args``."""
    root = write_jpeg_folder(tmp_path / "jpegs")
    config = tmp_path / "jpegs.yaml"
    config.write_text("data: {dataset: folder, split_train: all, split_test: [all], batch_size: 4, image_size: 16,"
                      " samples_per_class: 2, decode: gpu, num_workers: 0}\n"
                      "model: {backbone: omniglot_cnn, in_chans: 3}\n")
    return subprocess.run(
        [sys.executable, "-m", "recallk", "train", str(config), "--data-dir", str(root), "--run-dir",
         str(tmp_path / "run"), *args],
        capture_output=True, text=True, timeout=300,
    )
