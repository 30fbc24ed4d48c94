# sketchsweep: `make test` and `make demo` are all a new user needs.
#
#   make test                        create .venv if missing, install, lint, run the tests
#   make TORCH=torch==2.13.0 test    pick the torch build installed first (e.g. a local CPU wheel)
#   make demo                        train on the bundled synthetic sketches (~1 min on 2 CPU cores)
#   make ui                          the MLflow UI on the project's store: http://127.0.0.1:5000

PYTHON ?= python3
VENV ?= .venv
# Installed before the project, so a CPU-only machine can choose the CPU build: a bare
# "torch" requirement pulls the multi-GB CUDA build from PyPI.
TORCH ?= torch>=2.4
PORT ?= 5000

BIN := $(VENV)/bin
STAMP := $(VENV)/.sketchsweep-installed

.PHONY: venv test lint format demo ui clean postgres-bin slurm-bin chromium-bin

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install "$(TORCH)"
	$(BIN)/python -m pip install -e ".[dev]"
	touch $@

test: venv postgres-bin slurm-bin chromium-bin
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

# The scale-out tests start a throwaway PostgreSQL server: as root, install Debian's binaries
# when there are none (their tests are skipped, with the reason, only if that is impossible).
postgres-bin:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    apt-get update -qq >/dev/null && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null; } || \
	  echo "PostgreSQL binaries could not be installed: the scale-out tests will be skipped"

# The SLURM tests start a throwaway single-node cluster (tests/slurm_cluster.py): as root, install
# Debian's slurm-wlm and munge when slurmctld is missing (else those tests are skipped, with the reason).
slurm-bin:
	@PATH="$$PATH:/usr/sbin:/sbin"; command -v slurmctld >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    apt-get update -qq >/dev/null && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null; } || \
	  echo "SLURM (slurm-wlm, munge) could not be installed: the SLURM tests will be skipped"

# The serve page's browser test drives Debian's chromium with Playwright: as root, install it when
# /usr/bin/chromium is missing (else that test is skipped, with the reason).
chromium-bin:
	@test -x /usr/bin/chromium || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    apt-get update -qq >/dev/null && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; } || \
	  echo "Chromium could not be installed: the browser test of the serve page will be skipped"

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

demo: venv
	$(BIN)/python -m sketchsweep.train experiment=quickstart

ui: venv
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlruns/mlflow.db --host 127.0.0.1 --port $(PORT)

clean:
	rm -rf outputs multirun .pytest_cache .ruff_cache
