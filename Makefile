# recallk developer commands. `make demo` and `make test` are the two a newcomer needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Data root: $RECALLK_DATA if set, else ../shared/data when present, else the user cache (downloads).
RECALLK_DATA ?= $(shell [ -d ../shared/data ] && cd ../shared/data && pwd)
export RECALLK_DATA


.PHONY: setup demo lint test bench bench-speed bench-quality bench-gpu bench-gpu-quality bench-pretrained clean

$(BIN)/recallk: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test]'
	touch $(BIN)/recallk

setup: $(BIN)/recallk

demo: setup
	$(BIN)/recallk demo

lint: setup
	$(BIN)/ruff check src tests benchmarks

test: setup lint
	$(BIN)/python -m pytest -q

# Benchmarks behind BENCHMARKS.md: `make bench` runs all but bench-pretrained (about 5.5 hours on 2 CPU cores; runs
# already in benchmarks/results are skipped, so an interrupted `make bench` resumes). `make bench-speed` (minutes)
# and `make bench-quality` run each half; add DEVICE=cuda on a GPU machine for the speed half.
DEVICE ?= cpu
bench: bench-speed bench-quality

bench-speed: setup
	$(BIN)/python benchmarks/loss_speed.py --device $(DEVICE)
	$(BIN)/python benchmarks/loss_speed.py --device $(DEVICE) --embeddings trained --impls floor recallk floor_simix recallk_simix
	$(BIN)/python benchmarks/loss_in_training.py train.epochs=18  # the census of BENCHMARKS.md: the 18-epoch recipe
	for f in benchmarks/results/loss_in_training/epoch_*.pt; do \
		$(BIN)/python benchmarks/loss_speed.py --device $(DEVICE) --embeddings $$f --impls floor recallk --repeats 5; done
	$(BIN)/python benchmarks/multistage_memory.py --device $(DEVICE)
	$(BIN)/python benchmarks/multistage_memory.py --setting omniglot --threads 2
	$(BIN)/python benchmarks/eval_speed.py --device $(DEVICE) --header

# The GPU suite (loss at 4k-64k with/without SiMix, AP losses, ResNet-50 multistage, 60k kNN): ~7 minutes on one
# H200; writes benchmarks/results/gpu_suite/gpu_suite.{json,md}. On a GPU machine with its own torch and no
# package index: PYTHONPATH=src python3 benchmarks/gpu_suite.py (pytorch-metric-learning must be importable).
bench-gpu: setup
	$(BIN)/python benchmarks/gpu_suite.py

# Issue 30 at the paper's length on one GPU (EfficientNet-Lite0 at 96 px for 30 epochs, MiniLM for 10; RS@k against
# Smooth-AP, FastAP and multi-similarity at batches 256 to 4,096, SiMix on and off): resumable, most informative runs
# first, stops cleanly after BUDGET seconds; writes benchmarks/results/gpu_quality/gpu_quality.{jsonl,md}. On a GPU
# machine without a package index: `--pack FOLDER` here first (its docstring says how).
BUDGET ?=
bench-gpu-quality: setup
	$(BIN)/python benchmarks/gpu_quality.py $(if $(BUDGET),--budget $(BUDGET))

bench-quality: setup
	$(BIN)/python benchmarks/omniglot_quality.py --experiment losses
	$(BIN)/python benchmarks/omniglot_quality.py --experiment batch
	$(BIN)/python benchmarks/omniglot_quality.py --experiment large_batch --threads 1
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/text_quality.py

# Issue 21's pretrained regime (not part of `make bench`): EfficientNet-Lite0 frozen features, losses and batch
# sweeps, the MiniLM batch sweep; resumable, about 5 CPU-minutes per run, about 9 hours for all 3 seeds.
bench-pretrained: setup
	$(BIN)/python benchmarks/pretrained_frozen.py --threads 1
	$(BIN)/python benchmarks/pretrained_quality.py --experiment losses --threads 1
	$(BIN)/python benchmarks/pretrained_quality.py --experiment batch --threads 1
	$(BIN)/python benchmarks/pretrained_quality.py --experiment batch_bn --threads 1
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/text_batch.py --threads 1

clean:
	rm -rf $(VENV) runs .pytest_cache
