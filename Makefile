# alignflow: the two commands of the README, and the benchmarks.
#   make demo    set up .venv and run the embedded default end to end
#   make test    set up .venv and run the test suite
#   make fuzz    the property/fuzz tests of the input readers with many more cases (nightly-sized)
#   make bench   every benchmark against its peer -> bench/REPORT.md + bench/report.json (bench-quick: < 10 min)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install browser demo test test-durations test-fast fuzz sanitize bench bench-quick clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt $(wildcard tasks/ingest/*.c)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	# migrated empty Prefect and MLflow databases, copied into each new work directory (tasks/store_templates.py)
	$(BIN)/python -m alignflow.tasks.store_templates || echo "store templates not built: new work directories migrate their own databases"
	touch $(STAMP)

# Headless Chromium for the UI tests (Debian packages). Best effort: without it,
# tests/test_ui.py is skipped and says why.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) ; } || \
	  echo "chromium not installed: the UI tests will be skipped"

# one intra-op thread per process: the demo runs two branches side by side, and small models train faster that way
demo: install
	PREFECT_SERVER_ANALYTICS_ENABLED=false OMP_NUM_THREADS=1 $(BIN)/alignflow demo

# one test file per core (pytest-xdist), the slowest files first (tests/conftest.py); the slowest tests'
# durations are printed at the end
test: install browser
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/python -m pytest -n auto --dist loadfile --no-loadscope-reorder --durations=25

# the whole suite, then its seconds per file into tests/file_durations.json (the order `make test` starts files in)
test-durations: install browser
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/python -m pytest -n auto --dist loadfile --no-loadscope-reorder \
	  --junitxml=.pytest_cache/suite.xml
	$(BIN)/python tests/file_durations.py .pytest_cache/suite.xml

test-fast: install
	$(BIN)/python -m pytest -m "not slow"

fuzz: install
	HYPOTHESIS_PROFILE=nightly $(BIN)/python -m pytest tests/test_fuzz_inputs.py

# the C extensions rebuilt with AddressSanitizer and UndefinedBehaviorSanitizer into a temporary copy of the
# package, and the tests that drive them run against it (tests/sanitize.py; the installed build is untouched)
sanitize: install
	$(BIN)/python tests/sanitize.py

bench: install
	$(BIN)/python bench/run_all.py

bench-quick: install
	$(BIN)/python bench/run_all.py --quick

clean:
	rm -rf alignflow-work .pytest_cache
