# Every install step lives here. `make test` and `make demo` work on a fresh Debian machine (run as root,
# or with sudo available, for the Fashion-MNIST package).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA_DIR ?= /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install data test test-slow lint demo bench results clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed data

data:
	@if [ -z "$$ADAPERCEIVER_DATA_DIR" ] && [ ! -e $(DATA_DIR)/t10k-labels-idx1-ubyte.gz ] && [ ! -e $(DATA_DIR)/t10k-labels-idx1-ubyte ]; then \
		echo "installing Debian's dataset-fashion-mnist"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; \
	fi

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

demo: install
	$(PY) train_policy.py --flops-penalty 0.3

bench: install
	$(PY) benchmarks/bench_backbone.py
	$(PY) benchmarks/bench_env.py
	$(PY) benchmarks/bench_train_step.py

# Regenerate every committed figure under docs/results from the shipped backbone (about 35 minutes on 2 cores;
# one heavy job at a time). The backbone itself: python -m backbone.train --config configs/backbone_fmnist.yaml
RESULTS := docs/results
results: install
	$(PY) -m backbone.evaluate --split test
	$(PY) -m backbone.read_attention --json $(RESULTS)/read_attention_test.json
	rm -rf runs/p0.3 runs/p0.01 runs/ablation
	$(PY) train_policy.py --flops-penalty 0.3 --out runs/p0.3
	$(PY) train_policy.py --flops-penalty 0.01 --out runs/p0.01
	$(PY) -m policy.ablation --penalties 0.01 0.03 0.1 0.3 --policies runs/p0.01 runs/p0.3 --out $(RESULTS)
	$(PY) benchmarks/bench_backbone.py --json $(RESULTS)/bench_backbone.json
	$(PY) benchmarks/bench_env.py --json $(RESULTS)/bench_env.json
	$(PY) benchmarks/bench_train_step.py --json $(RESULTS)/bench_train_step.json
	for i in 1 2 3; do $(PY) -m policy.benchmark --policy runs/p0.3 --json $(RESULTS)/bench_adaptive_p0.3/run$$i.json; done

clean:
	rm -rf $(VENV) build *.egg-info
