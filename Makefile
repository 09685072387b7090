PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench build native clean

# The hot path is compiled with mypyc when a C compiler and Python's headers are at hand
# (setup.py, router/native.py); without them the package is the same in pure Python.
# Which build is installed; `--fresh` fails, saying why, when it should be compiled again.
NATIVE := $(BIN)/python -c 'import sys, router.native as n; sys.exit(n.main(sys.argv[1:]))'
HAVE_TOOLCHAIN := command -v gcc >/dev/null && $(PY) -c 'import os, sys, sysconfig; \
  sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'

$(STAMP): pyproject.toml setup.py
	@test -x $(BIN)/python || $(PY) -m venv $(VENV) || { \
	  rm -rf $(VENV); \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing python3-venv (Debian ships venv separately)"; \
	    apt-get update -q >/dev/null && apt-get install -y -q python3-venv >/dev/null && \
	    $(PY) -m venv $(VENV); \
	  else \
	    echo "cannot create .venv: on Debian, run 'sudo apt-get install python3-venv' first"; \
	    exit 1; \
	  fi; }
	@$(HAVE_TOOLCHAIN) || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing gcc and python3-dev (to compile the hot path)"; \
	    apt-get update -q >/dev/null && apt-get install -y -q gcc python3-dev >/dev/null; \
	  else \
	    echo "no C compiler or Python headers: the hot path stays pure Python" \
	      "(on Debian: sudo apt-get install gcc python3-dev, then make build)"; \
	  fi; }
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# Compile the hot path again, in place (about a minute; the compiled modules sit beside
# their sources, and importing one whose source changed since fails, naming this target).
build: $(STAMP)
	$(BIN)/pip install -q --no-build-isolation --no-deps -e .
	@$(NATIVE) --fresh
	@$(NATIVE)

# Compile again only when a compiled module's source changed (or none is compiled yet).
native: $(STAMP)
	@$(NATIVE) --fresh || $(MAKE) --no-print-directory build

demo: native
	$(BIN)/grayroute demo

test: native
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: native
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache build router/_native.json grayroute__mypyc.*.so
	find router -name '*.so' -delete
