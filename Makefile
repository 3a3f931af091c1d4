# essl: `make demo` (set-up + pretrain E-SimCLR on digits + probe) and `make test` (set-up + tests).
# Both create .venv when missing and install what they need; nothing is downloaded at run time.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.essl-installed
# torch and torchvision are pinned together (the CPU-only torch wheel cannot sit beside PyPI's torchvision)
TORCH ?= torch==2.14.1 torchvision==0.29.1
DEMO_CONFIG ?= configs/digits/e-simclr.yaml
DEMO_RUN ?= runs/digits-e-simclr
# spinning OpenMP threads slow small torch ops badly on a shared CPU (see README, Performance)
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup demo test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: setup
	$(BIN)/essl pretrain $(DEMO_CONFIG) output_dir=$(DEMO_RUN) resume=true
	$(BIN)/essl probe $(DEMO_RUN)/encoder.pt --json $(DEMO_RUN)/probe.json

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf runs .pytest_cache
