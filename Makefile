# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PRESET ?= default

export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export MLFLOW_DISABLE_TELEMETRY ?= true
export DO_NOT_TRACK ?= true
export PREFECT_HOME ?= $(CURDIR)/.prefect

.PHONY: install run test repro clean apt-lists

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: pip takes the local CPU wheel where one lies on disk
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The default corpus fetches some domains with `apt-get download`, which needs Debian's package
# lists; a fresh machine has none. Without apt the pipeline runs on the domains it can fetch.
apt-lists:
	@if command -v apt-get >/dev/null 2>&1 && ! ls /var/lib/apt/lists/*_Packages* >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq || echo "note: apt-get update failed; Debian-sourced domains will be skipped"; \
	  else echo "note: run 'sudo apt-get update' once so the Debian-sourced domains can be fetched"; fi; fi

run: $(STAMP) apt-lists
	$(BIN)/dograph run --preset $(PRESET)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# The same pipeline through DVC (dvc.yaml calls the CLI, which needs the venv on PATH).
repro: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

clean:
	rm -rf $(VENV) .prefect
