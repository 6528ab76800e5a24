# The two commands of the README:  make train  (set up + the main job)   make test  (set up + tests)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup train test test-gpu bench resources clean

$(STAMP): pyproject.toml scripts/setup.sh
	VENV=$(VENV) bash scripts/setup.sh
	touch $(STAMP)

setup: $(STAMP)

train: $(STAMP)
	$(VENV)/bin/energy-train train

# CPU: the Triton kernels run under the interpreter; GPU tests are reported as skipped.
test: $(STAMP)
	TRITON_INTERPRET=$${TRITON_INTERPRET-$$($(PY) -c "import torch; print(0 if torch.cuda.is_available() else 1)")} \
	  $(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
