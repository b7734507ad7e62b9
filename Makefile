# Two commands for a newcomer: `make demo` (set up, run the main job) and `make test`.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
export TORCHINDUCTOR_COMPILE_THREADS ?= 1
export YOLO_OFFLINE ?= 1
export HF_HUB_OFFLINE ?= 1

.PHONY: install demo test lint bench clean proto

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,dist]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/moeworks demo

test: install
	$(PY) -m pytest -n 2 --timeout=1800 tests

lint: install
	$(VENV)/bin/ruff check .

# The benchmarks that need neither the real data nor a trained model (results under runs/bench/);
# every other one, with the command behind each figure of record, is in benchmarks/RESULTS.md.
bench: install
	$(PY) -m benchmarks.sparkplug_codec --out runs/bench/sparkplug_codec.json
	$(PY) -m benchmarks.input_gradients --out runs/bench/input_gradients.json
	$(PY) -m benchmarks.moe_layer --hidden 512 --tokens 4096 --no-memory --out runs/bench/moe_layer.json

# Sparkplug B payload code from its schema; commit both files (nothing compiles at install or run time)
proto: install
	$(PY) -m grpc_tools.protoc -I twin/sparkplug --python_out=twin/sparkplug twin/sparkplug/sparkplug_b.proto

clean:
	rm -rf $(VENV) runs .pytest_cache
