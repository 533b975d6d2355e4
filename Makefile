# Entry points for a fresh machine (see README): `make demo`, `make test` and, for the
# edit loop, `make test-fast`. Each creates a virtualenv in .venv (Python 3.11) and
# installs the package into it.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
TEST_STAMP := $(VENV)/.installed-test-stamp

.PHONY: install test test-fast demo clean

$(STAMP): setup.py requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[all]'
	touch $(STAMP)

# The test, peer, export and flax extras (pytest, torch/timm for interop tests, the
# export converters and runtimes, Flax for nfnets_jax.nnx) on top.
$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[all,test,peers,export,flax]'
	touch $(TEST_STAMP)

install: $(STAMP)

# Trains the demo config on the embedded digits dataset, then evaluates it.
demo: $(STAMP)
	$(BIN)/python -m nfnets_jax.train --config=experiments/demo.py --workdir=workdirs/demo

# The whole suite, on every core (pytest-xdist), JAX deprecations as errors (pytest.ini).
test: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist worksteal tests

# The fast tier for the edit loop: everything not marked slow (docs/testing.md).
test-fast: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist worksteal -m "not slow" tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache workdirs
