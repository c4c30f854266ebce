# Two commands set up a fresh machine: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.medscale-installed
# torch is pinned first so pip does not pull a different build while resolving the rest.
TORCH  ?= torch==2.14.1 torchvision==0.29.1
DEMO_N ?= 240

.PHONY: venv test test-fast test-cluster lint demo demo-data bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

# pytest exits 5 when it collects no test; that is not a failure of the code.
# Two workers (pytest-xdist): most of a sweep test's wall time is waiting on Ray (start-up, actor
# pools, Tune's scheduling), so two run side by side on two cores; each worker has its own local
# Ray cluster, shared by all of its tests. A file stays on one worker (--dist loadfile), so a
# module's fixtures (the multi-node cluster scenario, the MLflow server) run once, and files go
# out longest first (tests/conftest.py LONGEST_FIRST) instead of by their number of tests. The
# slowest tests are listed in docs/testing.md.
PYTEST := MLFLOW_DISABLE_TELEMETRY=true $(BIN)/python -m pytest -q -p no:cacheprovider
TEST_WORKERS ?= 2
test: venv
	$(PYTEST) -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

# The inner loop: everything but the tests that start Ray or a sweep and the few that take seconds
# each (marker `slow`). Whole files per worker, so a module's synthetic datasets are written once.
test-fast: venv
	$(PYTEST) -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not slow and not cluster_e2e"; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

# Opt-in: `ray up clusters/onprem.yaml` against 127.0.0.1 over SSH, a tiny sweep, `ray down`.
# Needs sshd, rsync and a key (see tests/test_cluster_e2e.py for MEDSCALE_E2E_SSH_USER/KEY/VENV;
# tests/cluster_e2e_sshd.sh starts an isolated sshd on a shared machine).
test-cluster: venv
	MLFLOW_DISABLE_TELEMETRY=true $(BIN)/python -m pytest -q -p no:cacheprovider -m cluster_e2e tests/test_cluster_e2e.py

lint: venv
	$(BIN)/ruff check orchestrator tasks analysis tests benchmarks clusters sweep.py

data/nih14/Data_Entry_2017.csv: | venv
	$(BIN)/medscale datasets synth nih14 --root data/nih14 --n $(DEMO_N)

data/rsna/stage_2_train_labels.csv: | venv
	$(BIN)/medscale datasets synth rsna_pneumonia --root data/rsna --n $(DEMO_N)

demo-data: data/nih14/Data_Entry_2017.csv data/rsna/stage_2_train_labels.csv

demo: venv demo-data
	$(BIN)/medscale sweep configs/demo.yaml --resume --accelerator cpu-2core
	$(BIN)/medscale analyze --config configs/demo.yaml
	@echo
	@echo "Plan:       runs/demo/plan/plan.md"
	@echo "Report:     runs/demo/analysis/report.md (plots beside it; data axis: plots/data_*.png; report.html opens in a browser)"
	@$(BIN)/medscale runs configs/demo.yaml

bench: venv
	$(BIN)/python benchmarks/extract_throughput.py
	$(BIN)/python benchmarks/sweep_overhead.py

clean:
	rm -rf runs data
