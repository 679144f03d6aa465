# Every target runs inside the repo's own virtual environment (.venv), created on demand.
PY = .venv/bin/python
PYTHON ?= $(or $(shell command -v python3.11 2>/dev/null),python3)
STAMP = .venv/.installed

.PHONY: install test demo lint bench clean distclean

install: $(STAMP)

# Re-run pip only when the dependency declarations change (idempotent otherwise).
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv .venv
	$(PY) -m pip install -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -c constraints.txt -e '.[dev,models]'
	touch $@

test: install
	$(PY) -m pytest -q

demo: install
	$(PY) -m qcli quantize --out demo-out --force

lint: install
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks

bench: install
	$(PY) benchmarks/run.py $(if $(SUITE),--suite $(SUITE)) $(if $(QUICK),--quick)

clean:
	rm -rf demo-out build dist .pytest_cache .ruff_cache src/*.egg-info
	find $(wildcard src tests benchmarks) -name __pycache__ -type d -prune -exec rm -rf {} +

# Also removes the virtual environment; the next target rebuilds it.
distclean: clean
	rm -rf .venv
