# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ratta-installed
TEST_STAMP := $(VENV)/.ratta-test-installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch from the local wheel cache on x86_64; elsewhere pip picks a matching build
	if [ "$$(uname -m)" = "x86_64" ]; then \
		$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1; fi
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# the suite also runs the Ray backend's tests on a local Ray instance
$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,ray]'
	touch $(TEST_STAMP)

demo: $(STAMP)
	$(BIN)/ratta demo

test: $(TEST_STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_adapt.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
