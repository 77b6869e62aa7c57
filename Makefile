# Stepline: two commands on a fresh machine with Python 3.11, git and make.
#   make demo   install into .venv, start the embedded mesh (with two simulated phones),
#               run examples/hello.yaml, then examples/approval.yaml with its approval
#   make test   install into .venv and run the whole test suite
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
UV_VERSION := 0.13.9
UV := .uv/bin/uv
STAMP := .venv/.stepline-installed
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := .venv

.PHONY: install test lint demo down status gen check-stubs format clean

$(UV):
	$(PYTHON) -m venv .uv
	.uv/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

$(STAMP): $(UV) uv.lock pyproject.toml libs/common/pyproject.toml cli/pyproject.toml $(wildcard services/*/pyproject.toml)
	$(UV) sync --frozen --python $(PYTHON)
	touch $@

install: $(STAMP)

test: install
	.venv/bin/pytest

lint: install
	.venv/bin/buf lint
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy
	$(MAKE) --no-print-directory check-stubs

check-stubs: install
	.venv/bin/python tools/gen_protos.py --check

gen: install
	.venv/bin/python tools/gen_protos.py

format: install
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .

demo: install
	@bash tools/demo.sh

down: install
	.venv/bin/stepline down

status: install
	.venv/bin/stepline status

clean: down
	rm -rf .stepline .venv .uv
