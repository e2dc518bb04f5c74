# recallk developer commands. `make demo` and `make test` are the two a newcomer needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Data root: $RECALLK_DATA if set, else ../shared/data when present, else the user cache (downloads).
RECALLK_DATA ?= $(shell [ -d ../shared/data ] && cd ../shared/data && pwd)
export RECALLK_DATA

.PHONY: setup demo test bench clean

$(BIN)/recallk: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test]'
	touch $(BIN)/recallk

setup: $(BIN)/recallk

demo: setup
	$(BIN)/recallk demo

test: setup
	$(BIN)/python -m pytest -q

# Benchmarks behind BENCHMARKS.md (CPU; add DEVICE=cuda on a GPU machine). Results print as markdown tables.
DEVICE ?= cpu
bench: setup
	$(BIN)/python benchmarks/loss_speed.py --device $(DEVICE)
	$(BIN)/python benchmarks/multistage_memory.py --device $(DEVICE)
	$(BIN)/python benchmarks/eval_speed.py --device $(DEVICE) --header

clean:
	rm -rf $(VENV) runs .pytest_cache
