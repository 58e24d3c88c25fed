# Every install step lives here. `make test` and `make demo` work on a fresh Debian machine (run as root,
# or with sudo available, for the Fashion-MNIST package).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA_DIR ?= /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install data test test-slow lint demo bench results bench-cpu-kind check-install clean

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
	$(PY) -m benchmarks.bench_backbone
	$(PY) -m benchmarks.bench_env
	$(PY) -m benchmarks.bench_train_step

# A non-editable `pip install .` into a fresh venv, then every console script from an empty folder outside the
# repository (issue 17): --help of each, and a short controller run on the shipped backbone.
CHECK_VENV ?= /tmp/adaperceiver-venv-check
CHECK_DIR ?= /tmp/adaperceiver-empty-folder
check-install: data
	rm -rf $(CHECK_VENV) $(CHECK_DIR) && mkdir -p $(CHECK_DIR)
	$(PYTHON) -m venv $(CHECK_VENV)
	$(CHECK_VENV)/bin/pip install -q .
	cd $(CHECK_DIR) && for s in $(CHECK_VENV)/bin/adaperceiver-*; do $$s --help > /dev/null && echo "ok: $$(basename $$s) --help"; done
	cd $(CHECK_DIR) && $(CHECK_VENV)/bin/adaperceiver-train-policy --timesteps 2048 --train-limit 1000 --eval-limit 500 --no-progress --cache-dir $(CHECK_DIR)/cache
	ls $(CHECK_DIR)/runs/*

# Regenerate the figures under docs/results from the shipped backbone (about 35 minutes on 2 cores; one heavy job at a
# time). The backbone itself: python -m backbone.train --config configs/backbone_fmnist_stages.yaml
RESULTS := docs/results
results: install
	$(PY) -m backbone.evaluate --split test --out $(RESULTS) --compare $(RESULTS)/previous_default/eval_test.json
	$(PY) -m backbone.read_attention --json $(RESULTS)/read_attention_test.json
	rm -rf runs/ablation $(RESULTS)/demo_p0.3 $(RESULTS)/sequential_p0.3
	ADAPERCEIVER_CACHE_DIR=$$(mktemp -d) $(PY) train_policy.py --flops-penalty 0.3 --seed 0 --out $(RESULTS)/demo_p0.3 --no-progress
	$(PY) -m policy.ablation --penalties 0.003 0.01 0.03 0.1 0.3 1 --controllers oneshot sequential --seeds 0 1 2 \
		--policies $(RESULTS)/demo_p0.3 --out $(RESULTS)
	cp -r runs/ablation/fmnist__sequential__p0.3__s0 $(RESULTS)/sequential_p0.3
	$(PY) -m policy.reference --ablation $(RESULTS)/ablation.json --out $(RESULTS)/reference
	$(PY) -m policy.iso_holdout --iso-drops 0 0.05 0.1 --repeats 10 --out $(RESULTS)/iso_holdout
	$(PY) -m policy.iso_bands --setting s3/4/4/32 --out $(RESULTS)/iso_bands
	$(PY) -m policy.recipe_cv --variants ent_coef=0.01 ent_coef=0.001 ent_coef=0 --out $(RESULTS)/recipe_cv
	for p in 0.3 0.01; do $(PY) -m policy.recipe_cv --penalty $$p --variants observation=pooled_probe observation=probe \
		--out $(RESULTS)/recipe_cv_observation/p$$p; done
	$(PY) -m benchmarks.bench_backbone --model adaperceiver_fmnist_stages --json $(RESULTS)/bench_backbone.json
	$(PY) -m benchmarks.bench_env --json $(RESULTS)/bench_env.json
	$(PY) -m benchmarks.bench_train_step --model adaperceiver_fmnist_stages --json $(RESULTS)/bench_train_step.json
	for i in 1 2 3; do $(PY) -m policy.benchmark --policy $(RESULTS)/demo_p0.3 --json $(RESULTS)/bench_adaptive_p0.3/run$$i.json; done
	for i in 1 2 3; do $(PY) -m policy.benchmark --policy $(RESULTS)/demo_p0.3 --processes 2 \
		--json $(RESULTS)/bench_adaptive_p0.3/processes2_run$$i.json; done
	for t in 1 2; do $(PY) -m policy.benchmark --policy $(RESULTS)/demo_p0.3 --threads $$t --batch-sizes 256 \
		--json $(RESULTS)/bench_adaptive_p0.3/threads$$t.json; done
	for t in 1 2; do OMP_NUM_THREADS=$$t $(PY) -m benchmarks.profile_adaptive --policy $(RESULTS)/demo_p0.3 --batch-size 256 \
		--out $(RESULTS)/profile/threads$${t}_batch256.txt; done
	for i in 1 2 3; do $(PY) -m policy.benchmark --policy $(RESULTS)/sequential_p0.3 --json $(RESULTS)/bench_sequential_p0.3/run$$i.json; done
	for i in 1 2 3; do $(PY) -m policy.benchmark --policy $(RESULTS)/sequential_p0.3 --processes 2 \
		--json $(RESULTS)/bench_sequential_p0.3/processes2_run$$i.json; done
	for b in 256 1; do $(PY) -m benchmarks.profile_adaptive --policy $(RESULTS)/demo_p0.3 --batch-size $$b --out $(RESULTS)/profile/after_batch$$b.txt; done
	for i in 1 2 3; do $(PY) -m benchmarks.compile_front --policy $(RESULTS)/demo_p0.3 --json $(RESULTS)/compile_front/run$$i.json; done
	for i in 1 2 3; do $(PY) -m benchmarks.aot_batch1 --policy $(RESULTS)/demo_p0.3 --json $(RESULTS)/aot_batch1/$(CPU_KIND)_run$$i.json; done
	rm -rf $(RESULTS)/cascade_p0.3
	$(PY) train_policy.py --controller cascade --flops-penalty 0.3 --seed 0 --out $(RESULTS)/cascade_p0.3 --no-progress
	for i in 1 2 3; do $(PY) -m policy.benchmark --policy $(RESULTS)/cascade_p0.3 --json $(RESULTS)/bench_cascade_p0.3/run$$i.json; done
	$(PY) -m benchmarks.aot_batch1 --policy $(RESULTS)/cascade_p0.3 --json $(RESULTS)/aot_batch1/$(CPU_KIND)_cascade_run1.json
	for i in 1 2 3; do $(PY) -m policy.benchmark --policy $(RESULTS)/cascade_p0.3 --processes 2 \
		--json $(RESULTS)/bench_cascade_p0.3/processes2_run$$i.json; done
	for b in 256 1; do $(PY) -m benchmarks.profile_adaptive --policy $(RESULTS)/cascade_p0.3 --batch-size $$b --out $(RESULTS)/profile/cascade_batch$$b.txt; done
	for r in demo_p0.3 cascade_p0.3; do $(PY) -m benchmarks.stem_layout --policy $(RESULTS)/$$r --json $(RESULTS)/stem_layout/$$r.json; done

# Issue 21's timings on this machine's CPU kind, into its own folders (about 30 minutes on 2 cores, one job at a
# time): the PPO and cascade controllers in one process and in two worker processes, one and two threads, the
# profiles, the full setting against matmul, and rewrites of small operators that were not shipped (two operator
# rewrites and torch.compile; compiling the full setting at batch 256 alongside, for the ratio). CPU_KIND
# names the folders: amd_epyc (AVX512 with bf16) or amd_epyc_avx2 (AVX2 only), the two kinds measured so far; set it
# by hand on another machine.
CPU_KIND ?= $(shell grep -qw avx512f /proc/cpuinfo 2>/dev/null && echo amd_epyc || echo amd_epyc_avx2)
bench-cpu-kind: install
	for i in 1 2 3; do \
		$(PY) -m policy.benchmark --policy $(RESULTS)/demo_p0.3 --json $(RESULTS)/bench_adaptive_p0.3/$(CPU_KIND)/run$$i.json; \
		$(PY) -m policy.benchmark --policy $(RESULTS)/demo_p0.3 --processes 2 \
			--json $(RESULTS)/bench_adaptive_p0.3/$(CPU_KIND)/processes2_run$$i.json; done
	for i in 1 2 3; do \
		$(PY) -m policy.benchmark --policy $(RESULTS)/cascade_p0.3 --json $(RESULTS)/bench_cascade_p0.3/$(CPU_KIND)/run$$i.json; \
		$(PY) -m policy.benchmark --policy $(RESULTS)/cascade_p0.3 --processes 2 \
			--json $(RESULTS)/bench_cascade_p0.3/$(CPU_KIND)/processes2_run$$i.json; done
	for t in 1 2; do $(PY) -m policy.benchmark --policy $(RESULTS)/demo_p0.3 --threads $$t --batch-sizes 256 \
		--json $(RESULTS)/bench_adaptive_p0.3/$(CPU_KIND)/threads$$t.json; done
	for b in 256 1; do $(PY) -m benchmarks.profile_adaptive --policy $(RESULTS)/demo_p0.3 --batch-size $$b \
		--out $(RESULTS)/profile/$(CPU_KIND)/after_batch$$b.txt; done
	$(PY) -m benchmarks.bench_backbone --model adaperceiver_fmnist_stages --json $(RESULTS)/bench_backbone_$(CPU_KIND).json
	for t in 2 1; do $(PY) -m benchmarks.operator_variants --policy $(RESULTS)/demo_p0.3 --threads $$t \
		--json $(RESULTS)/operator_variants/$(CPU_KIND)_threads$$t.json; done
	$(PY) -m benchmarks.compile_front --policy $(RESULTS)/demo_p0.3 --batch-size 256 --images 2048 \
		--json $(RESULTS)/compile_front/$(CPU_KIND)_batch256.json
	for i in 1 2 3; do $(PY) -m benchmarks.aot_batch1 --policy $(RESULTS)/demo_p0.3 --json $(RESULTS)/aot_batch1/$(CPU_KIND)_run$$i.json; done

clean:
	rm -rf $(VENV) build *.egg-info
