# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-cpu-dev

.PHONY: test lint demo line proto venv clean balanced failover

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[train,serve,cpu,dev,build]'
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# One pytest process per test folder: in a single process, full runs on the 2-core AMD EPYC machines
# aborted or segfaulted in the trainer tests after the engine and server tests (4 runs of 4: native
# memory corruption from one of the libraries the earlier tests load), never with a folder alone.
test: $(STAMP)
	$(VENV)/bin/ruff check .
	@failed=""; for d in tests/*/; do \
	  [ "$$d" = "tests/__pycache__/" ] && continue; \
	  echo "== pytest $$d"; $(VENV)/bin/pytest -q "$$d" || failed="$$failed $$d"; \
	done; if [ -n "$$failed" ]; then echo "make test: failures in$$failed"; exit 1; fi

demo: $(STAMP)
	$(PY) tools/demo.py --out demo

# A simulated coil with a roll mark through a server (MODEL, default the demo's): its grade, the roll
# found, its map and report in demo/line (tools/line_demo.py).
line: $(STAMP)
	$(PY) tools/line_demo.py --model $(MODEL) --out demo/line

# nginx + 3 `server serve` replicas of MODEL (default: the demo's), until Ctrl-C (deploy/balanced.py).
MODEL ?= demo/model.onnx
balanced: $(STAMP)
	$(PY) -m deploy.balanced --model $(MODEL)

# The fault run: 8 cameras x 300 frames while replicas drain, die and return; figures as JSON.
failover: $(STAMP)
	$(VENV)/bin/bench failover --report benchmarks/results/failover.json

# Regenerates the committed gRPC code (a test checks it is up to date).
proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. protos/inspection/v1/inspection.proto protos/inspection/v1/model_control.proto

clean:
	rm -rf $(VENV) demo .pytest_cache .ruff_cache
