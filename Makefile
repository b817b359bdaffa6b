PYTHON ?= python3
export PYTHON

.PHONY: install test demo lint bench

install:
	bash scripts/install.sh

test: install
	bash scripts/check_cuda_compile.sh
	FASTES_BENCH_RESULTS=$${TMPDIR:-/tmp}/fastes-bench-smoke $(PYTHON) -m bench --quick
	$(PYTHON) -m pytest -q -p no:cacheprovider

demo: install
	$(PYTHON) -m fastes train

lint:
	$(PYTHON) -m ruff check fastes tests bench scripts

bench: install
	$(PYTHON) -m bench --quick
