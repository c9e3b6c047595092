# Two commands do all set-up on a fresh machine (see README.md):
#   make serve   run nnrouter on embedded defaults (SQLite, ./var/spool, AE NNROUTER on port 11112)
#   make test    run the whole test suite (installs DCMTK, dicom3tools, Orthanc, PostgreSQL, Chromium when missing)

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Real peers the tests start on loopback, from Debian's packages.
# Debian's Chromium and its driver: the console's pages are tested in a real browser (Selenium).
APT_PACKAGES := dcmtk dicom3tools orthanc postgresql libgdcm-tools openssl chromium chromium-driver
PEER_TOOLS := storescu storescp echoscu findscu wlmscpfs dcmj2pnm dciodvfy Orthanc gdcmconv openssl chromium chromedriver
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
CONFIG_ARG := $(if $(CONFIG),--config $(CONFIG))
# Two test processes (pytest-xdist), one on a single core: 14 min instead of 23
# on 2 cores. More were not measured. `make test PYTEST_WORKERS=` runs one.
PYTEST_WORKERS ?= -n auto --maxprocesses=2

.PHONY: serve test check install peers model

# The service needs the package alone; the tests also train and convert models.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[test,train,convert]'
	touch $@

install: $(VENV)/.installed

serve: install
	$(BIN)/nnrouter db upgrade $(CONFIG_ARG)
	exec $(BIN)/nnrouter serve $(CONFIG_ARG)

peers:
	@missing=""; \
	for t in $(PEER_TOOLS); do command -v $$t >/dev/null 2>&1 || missing="$$missing $$t"; done; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
	  echo "installing test peers (missing:$$missing)"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $(APT_PACKAGES) >/dev/null; \
	fi

# Lint, format and types first: they take seconds, the suite takes minutes.
check: $(VENV)/.installed-test
	$(BIN)/ruff check nnrouter tests bench
	$(BIN)/ruff format --check nnrouter tests bench
	$(BIN)/mypy

test: peers check
	$(BIN)/pytest $(PYTEST_WORKERS) $(PYTEST_ARGS)

# Retrain the shipped view classifier from ../shared/data/radiographs, seed 0, and measure it:
# leave-one-source-out (with the augmentation ablation), the real DICOM films, activation maps.
# Then the region detector from ../shared/data/regions, seed 0, measured with each spine source held out.
SHARED ?= ../shared
model: $(VENV)/.installed-test
	mkdir -p var
	$(BIN)/nnrouter dataset build --images $(SHARED)/data/radiographs --out var/radiographs.csv
	$(BIN)/nnrouter train classifier --dataset var/radiographs.csv --out models/nnrouter-view --seed 0 --cache var/cache
	$(BIN)/nnrouter evaluate --model models/nnrouter-view --dataset var/radiographs.csv \
	  --external $(SHARED)/data/dicom/good --out var/evaluation --loso --ablate --max-epochs 6 --cams 12 --cache var/cache --update-card
	$(BIN)/nnrouter train detector --regions $(SHARED)/data/regions/regions.csv --out models/nnrouter-regions \
	  --seed 0 --cache var/cache
	$(BIN)/nnrouter evaluate --model models/nnrouter-regions --regions $(SHARED)/data/regions/regions.csv \
	  --out var/evaluation-regions --cache var/cache --max-epochs 10 --update-card
