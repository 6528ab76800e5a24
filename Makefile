# The two commands of the README:  make train  (set up + the main job)   make test  (set up + tests)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup train test test-latest lock bench resources gpu-check runtime runtime-test clean \
	setup-oft test-oft

$(STAMP): pyproject.toml scripts/setup.sh requirements/lock.txt
	VENV=$(VENV) bash scripts/setup.sh
	touch $(STAMP)

setup: $(STAMP)

train: $(STAMP)
	$(VENV)/bin/energy-train train

# CPU: the Triton kernels run under the interpreter; GPU tests are reported as skipped.
# With pytest-xdist (the dev extra) two workers, one test file each at a time (a file's
# fixtures, e.g. the C++ runtime build or the 2-rank job, run once).
test: $(STAMP)
	TRITON_INTERPRET=$${TRITON_INTERPRET-$$($(PY) -c "import torch; print(0 if torch.cuda.is_available() else 1)")} \
	  $(PY) -m pytest -q $$($(PY) -c "import xdist; print('-n 2 --dist loadfile')" 2>/dev/null)

# OpenVLA-OFT's own stack (requirements/oft-pins.txt: transformers 4.40.1, peft 0.11.1,
# tokenizers 0.19.1; the rest from the lock) in $(VENV_OFT), and the OFT integration tests
# there. CI (.ci/run) runs them after `make test`, which runs them on the lock's stack.
VENV_OFT ?= .venv-oft
OFT_TESTS ?= tests/test_oft.py tests/test_oft_stack.py tests/test_fork_energy.py
$(VENV_OFT)/.installed: pyproject.toml scripts/setup.sh requirements/lock.txt requirements/oft-pins.txt
	VENV=$(VENV_OFT) PINS=requirements/oft-pins.txt bash scripts/setup.sh
	touch $@

setup-oft: $(VENV_OFT)/.installed

test-oft: $(VENV_OFT)/.installed
	$(VENV_OFT)/bin/python -c "import transformers, peft, tokenizers; print('OFT pins stack: transformers', transformers.__version__, 'peft', peft.__version__, 'tokenizers', tokenizers.__version__)"
	TRITON_INTERPRET=$${TRITON_INTERPRET-$$($(VENV_OFT)/bin/python -c "import torch; print(0 if torch.cuda.is_available() else 1)")} \
	  $(VENV_OFT)/bin/python -m pytest -q $(OFT_TESTS) $$($(VENV_OFT)/bin/python -c "import xdist; print('-n 2 --dist loadfile')" 2>/dev/null)

# The lock (requirements/lock.txt, what CI tests): `make lock` builds .venv-latest with the newest
# releases, runs the whole suite there and, only if it passes, rewrites the lock from it;
# `make test-latest` does the same without rewriting (does a new release break us?).
lock:
	bash scripts/lock.sh

test-latest:
	WRITE_LOCK=0 bash scripts/lock.sh

# Benchmarks (bench/harness.py): GPU figures on CUDA, eager providers + ratios on the CPU.
BENCH ?= layer_actions
bench: $(STAMP)
	$(PY) -m bench.run $(BENCH) $(BENCH_ARGS)

# Hopper evidence without a GPU: compile every shipped kernel config for sm_90, report
# registers / spills / shared memory / wgmma (TRITON_INTERPRET must be unset).
resources: $(STAMP)
	env -u TRITON_INTERPRET $(PY) -m bench.resources

# One time-boxed command that proves and measures everything on a GPU (scripts/gpu_check.py):
# 8 minutes from here, set-up included; results in bench/results/*-<device>.*, a compact set
# in --out DIR (GPU_CHECK_ARGS="--out $$OUT"). GPU_CHECK_DRY=1: the same on the CPU, reduced.
gpu-check:
	@t0=$$(date +%s); $(MAKE) --no-print-directory setup && \
	  $(PY) scripts/gpu_check.py --t0 $$t0 $(GPU_CHECK_ARGS)

# The C++ runtime of the trained verifier (CMakeLists.txt, runtime/): libenergy_train_runtime,
# et-verify and runtime_tests in $(RUNTIME_BUILD), against the venv's torch (libtorch from the wheel).
RUNTIME_BUILD ?= build/runtime
runtime: $(STAMP)
	cmake -S . -B $(RUNTIME_BUILD) -DCMAKE_BUILD_TYPE=Release -DET_PYTHON=$(abspath $(PY)) \
	  $$(command -v ninja >/dev/null && echo -G Ninja)
	cmake --build $(RUNTIME_BUILD) -j $$(nproc)

# Export a small trained model, build, run et-verify and ctest, compare with Python.
runtime-test: $(STAMP)
	$(PY) -m pytest -q tests/test_runtime.py

clean:
	rm -rf $(VENV) $(VENV_OFT) .venv-latest build *.egg-info
