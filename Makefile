# Entry points: `make demo` (the main job on the built-in digits data), `make reproduce` (both claims,
# both families, against plain baselines), `make test` and `make test-fast`.
# Both set up .venv from scratch on a fresh machine; nothing else needs to be installed by hand.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch lies on disk here; on a GPU machine: make TORCH=torch ...
TORCH ?= torch==2.13.0

.PHONY: setup demo reproduce test test-fast test-multiproc test-e2e test-cluster clean

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
	$(PY) -m studies.demo

# both claims, both families: ILSD, vanilla and two plain baselines (docs/reproduce.md)
reproduce: setup
	$(PY) -m studies.reproduce

# Two pytest workers, a test file each at a time (a file's tests run in order, on one worker): most tests wait on
# processes they started, so two at once save time on 2 cores (docs/tests.md). Run alone after them: the Slurm
# tier (two loopback clusters on one host disturb each other: munge, ports) and the `alone` tests (throughput
# ratios that need the cores to themselves).
PAR ?= -n 2 --dist loadfile -m "not alone"

# the whole suite, as CI runs it (.ci/run); the long e2e and multiproc files first, so no worker ends alone
test: setup
	$(PY) -m pytest -q --durations=15 $(PAR) tests/e2e tests/multiproc tests/unit
	$(PY) -m pytest -q --durations=10 -m "alone or slurm" tests/multiproc tests/cluster

# one tier each (tests/<tier>/__init__.py says what belongs there); test-fast is the inner loop
test-fast: setup
	$(PY) -m pytest -q --durations=10 $(PAR) tests/unit

test-multiproc: setup
	$(PY) -m pytest -q --durations=10 $(PAR) tests/multiproc
	$(PY) -m pytest -q --durations=10 -m alone tests/multiproc

test-e2e: setup
	$(PY) -m pytest -q --durations=10 $(PAR) tests/e2e

# needs root and slurm-wlm + munge (.ci/run apt-installs them): a real two-node Slurm cluster on loopback
test-cluster: setup
	$(PY) -m pytest -q --durations=10 tests/cluster

clean:
	rm -rf runs shards demo_out reproduce_out
