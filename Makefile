PYTHON ?= python3
export PYTHON

.PHONY: install test demo lint bench compile-report

install:
	bash scripts/install.sh

test: install
	bash scripts/check_cuda_compile.sh
	$(PYTHON) -m bench.compile --subset --jobs 2
	FASTES_BENCH_RESULTS=$${TMPDIR:-/tmp}/fastes-bench-smoke $(PYTHON) -m bench --quick
	$(PYTHON) -m pytest -q -p no:cacheprovider

demo: install
	$(PYTHON) -m fastes train

lint:
	$(PYTHON) -m ruff check fastes tests bench scripts

bench: install
	$(PYTHON) -m bench --quick

# every Triton kernel compiled for sm_90 (no GPU needed); writes bench/results/compile-sm90-<triton>.json
compile-report:
	$(PYTHON) -m bench.compile --jobs $${JOBS:-2}
