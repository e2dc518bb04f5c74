"""``recallk demo``: train on Omniglot on the CPU and show recall@k on 659 unseen classes, before and after.

The recipe is ``configs/omniglot.yaml`` (shipped inside the package). Before training, the raw pixels of the
evaluation images are used as embeddings; after training, the embedding network's outputs. Both are evaluated
by exact kNN over all 13,180 evaluation images (each one a query against the 13,179 others).
"""

from __future__ import annotations

import logging
import shutil
import time
from importlib import resources
from pathlib import Path
from typing import Any

from recallk.config import Config, load_config
from recallk.data.paths import resolve_data_dir
from recallk.data.sources import build_source
from recallk.errors import RecallkUsageError
from recallk.evaluation.embed import raw_pixel_embeddings
from recallk.evaluation.metrics import format_metrics_table, retrieval_metrics
from recallk.evaluation.plots import plot_recall_curves
from recallk.files import write_json
from recallk.training.console import show_progress
from recallk.training.run_dir import is_recallk_run, run_dir_in_use
from recallk.training.trainer import train

logger = logging.getLogger(__name__)

SUMMARY_KEYS = ("recall@1", "recall@2", "recall@4", "recall@8", "map@r")


def demo_config_path() -> Path:
    """The packaged Omniglot recipe."""
    return Path(str(resources.files("recallk") / "configs" / "omniglot.yaml"))


def _free_run_dir(path: Path) -> None:
    """Move a finished earlier demo run aside (``<path>.previous``) instead of overwriting or refusing."""
    if not path.exists() or not any(path.iterdir()):
        return
    if not is_recallk_run(path):
        return  # not a run: left alone, and refused by the run directory's own check
    if run_dir_in_use(path):
        raise RecallkUsageError(f"{path} is in use by another recallk process; wait for it or pass --run-dir")
    previous = path.with_name(path.name + ".previous")
    if previous.exists():
        if not is_recallk_run(previous):
            raise RecallkUsageError(f"{previous} exists and is not a recallk run; move it away or pass --run-dir")
        shutil.rmtree(previous)
    path.rename(previous)
    logger.info("moved the earlier demo run to %s", previous)


def run_demo(
    data_dir: str | Path | None = None,
    run_dir: str | Path = "runs/demo",
    device: str = "auto",
    overrides: list[str] | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Run the demo; returns (and writes to ``<run_dir>/summary.json``) the metrics after training.

    ``progress``: draw progress bars (``None``: only on a terminal and without ``TQDM_DISABLE``)."""
    started = time.perf_counter()
    progress = show_progress(progress)
    config: Config = load_config(demo_config_path(), overrides or [], {"train.device": device})
    root = resolve_data_dir(data_dir)
    run_path = Path(run_dir)
    _free_run_dir(run_path)

    test = build_source(config.data, config.data.split_test[0], False, root, config.seed)
    print(f"Omniglot: evaluating raw pixels on {len(test.labels)} images of {test.num_classes} unseen classes")
    raw = retrieval_metrics(
        raw_pixel_embeddings(test.eval_batches(2048)), test.labels, k=config.eval.k, progress=progress
    )
    print(format_metrics_table({"raw pixels": raw}, SUMMARY_KEYS))
    print(f"Training {config.model.backbone} with the RS@k loss for {config.train.epochs} epochs on the CPU ...")
    summary = train(config, run_path, data_dir=root, progress=progress)
    seconds = time.perf_counter() - started
    print(format_metrics_table({"raw pixels": raw, "after training": summary}, SUMMARY_KEYS))
    demo_summary = {**summary, "raw_pixels": raw, "seconds": round(seconds, 1)}
    write_json(run_path / "summary.json", demo_summary)
    untrained = {"untrained network": summary["untrained"]} if "untrained" in summary else {}  # output.plots
    curves = {"raw pixels": raw, **untrained, "RS@k (trained)": summary}
    plot_recall_curves(run_path / "plots" / "recall_at_k.png", curves)
    print(f"Done in {seconds:.0f} s. Results, plots and checkpoints: {run_path}/")
    return demo_summary
