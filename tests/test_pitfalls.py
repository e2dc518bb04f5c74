"""What a new user meets on their own data and default settings (issue #11): each case trains or evaluates for real
and checks that the number reported is right, that a silent failure now says so, or that a promise holds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from recallk.data.generic import build_folder
from recallk.evaluation.evaluate import evaluate_run
from recallk.training.trainer import train
from test_trainer import make_glyph_folder, tiny_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_glyph_folder(tmp_path_factory.mktemp("glyphs"))


def test_bf16_training_reports_the_float32_metrics_of_recallk_evaluate(tmp_path: Path, data_dir: Path) -> None:
    """Under train.amp=bf16 the summary's test metrics are those `recallk evaluate` computes on the checkpoint."""
    run = tmp_path / "run"
    config = tiny_config(tmp_path, train__amp="bf16", train__epochs=2, output__plots=False)
    summary = train(config, run, data_dir=data_dir, progress=False)
    evaluated = evaluate_run(run, data_dir=data_dir, device="cpu", progress=False)["test"]
    for metric in ("recall@1", "recall@2", "map@r"):
        assert abs(summary[metric] - evaluated[metric]) <= 1e-3, (metric, summary[metric], evaluated[metric])


# ---------------------------------------------------------------------------------------------------------------------
# 2. Every image mode Pillow reads decodes into the right 0-255 range


def _write_mode_images(folder: Path) -> dict[str, tuple[int, int]]:
    """One file per mode, each 4x4 with a mid-grey left half (128 in 8 bits) and a white right half; returns
    ``{file name: (expected left value, expected right value)}`` after decoding to 8-bit grey."""
    folder.mkdir(parents=True)
    grey = np.full((4, 4), 128, dtype=np.uint8)
    grey[:, 2:] = 255
    made = {}

    def save(name: str, image: Image.Image) -> None:
        image.save(folder / name)
        made[name] = (128, 255)

    save("mode_L.png", Image.fromarray(grey, "L"))
    save("mode_P.png", Image.fromarray(grey, "L").convert("P"))
    save("mode_RGBA.png", Image.fromarray(np.dstack([grey] * 3 + [np.full_like(grey, 255)]), "RGBA"))
    alpha = np.full_like(grey, 255)
    alpha[:, 2:] = 0  # transparent right half over black pixels: composited onto white
    black_right = grey.copy()
    black_right[:, 2:] = 0
    save("mode_LA.png", Image.fromarray(np.dstack([black_right, alpha]), "LA"))
    save("mode_I16.png", Image.fromarray(grey.astype(np.uint16) * 257))  # 16-bit PNG (mode I;16)
    save("mode_I.tif", Image.fromarray(grey.astype(np.int32) * 257))  # 32-bit integer TIFF (mode I)
    save("mode_F.tif", Image.fromarray(grey.astype(np.float32) / 255))  # float TIFF in [0, 1] (mode F)
    cmyk = np.zeros((4, 4, 4), dtype=np.uint8)
    cmyk[..., 3] = 255 - grey  # grey as black ink only
    save("mode_CMYK.tif", Image.fromarray(cmyk, "CMYK"))
    binary = np.zeros((4, 4), dtype=bool)
    binary[:, 2:] = True
    Image.fromarray(binary).save(folder / "mode_1.png")
    made["mode_1.png"] = (0, 255)
    return made


@pytest.mark.parametrize("image_mode", ["L", "RGB"])
def test_every_pillow_mode_decodes_into_the_right_range(tmp_path: Path, image_mode: str) -> None:
    expected = _write_mode_images(tmp_path / "all" / "modes")
    dataset = build_folder(tmp_path, "all")
    dataset.image_mode = image_mode
    assert len(dataset) == len(expected)
    for index, name in enumerate(dataset.item_ids):
        with Image.open(tmp_path / "all" / name) as original:
            stored_mode = original.mode
        pixels = np.asarray(dataset.load_image(index), dtype=np.int64)
        left, right = expected[Path(name).name]
        assert np.abs(pixels[:, :2] - left).max() <= 1, (name, stored_mode, pixels[:, :2].ravel()[:4])
        assert np.abs(pixels[:, 2:] - right).max() <= 1, (name, stored_mode, pixels[:, 2:].ravel()[:4])
