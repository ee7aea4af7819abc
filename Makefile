# Set-up and tests from a bare Debian machine. Every target is idempotent and quick when already done.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = "0" ] || echo sudo)
DEB_PKGS := g++ pkg-config libturbojpeg0-dev libopencv-dev  # g++ and these: FFCV compiles its C++ extension
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: setup test test-slow demo lint clean-venv

## setup: Debian packages for FFCV and python3-venv (if missing), .venv, torch before ffcv, then the package with [dev]
setup: $(VENV)/.installed

$(VENV)/.debs:
	@missing=""; for p in $(DEB_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	command -v $(PY) >/dev/null 2>&1 || missing="$$missing python3"; \
	$(PY) -c "import ensurepip, venv" >/dev/null 2>&1 || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; fi
	@mkdir -p $(VENV) && touch $@

$(BIN)/python: | $(VENV)/.debs
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel

$(VENV)/.torch: | $(BIN)/python
	$(BIN)/pip install -q $(TORCH_PINS)
	@touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.debs $(VENV)/.torch
	$(BIN)/pip install -q -e ".[dev]"
	@touch $@

## test: set-up + the default (fast) test suite
test: setup
	$(BIN)/python -m pytest -q

## test-slow: the slow end-to-end and large-data tests too
test-slow: setup
	$(BIN)/python -m pytest -q -m "slow or not slow"

## demo: set-up + the whole method on built-in data
demo: setup
	$(BIN)/dptool demo --workdir dptool-demo --force

lint: setup
	$(BIN)/ruff check .

clean-venv:
	rm -rf $(VENV)
