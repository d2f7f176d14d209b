# Entry points: `make demo` (the main job on the built-in digits data), `make reproduce` (both claims,
# both families, against plain baselines) and `make test`.
# Both set up .venv from scratch on a fresh machine; nothing else needs to be installed by hand.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch lies on disk here; on a GPU machine: make TORCH=torch ...
TORCH ?= torch==2.13.0

.PHONY: setup demo reproduce test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]" "$(TORCH)"
	@# DeepSpeed JIT-compiles its CPU ops on first use (~1-2 min): here, not at a newcomer's first step 0
	$(PY) -c "from elt_scale.engine.ds_internals import build_cpu_ops; build_cpu_ops()"
	touch $@

demo: setup
	$(PY) -m elt_scale.demo

# both claims, both families: ILSD, vanilla and two plain baselines (docs/reproduce.md)
reproduce: setup
	$(PY) -m elt_scale.reproduce

test: setup
	$(PY) -m pytest -q --durations=15 tests

clean:
	rm -rf runs shards demo_out reproduce_out
