# Two entry points: `make demo` and `make test`. Each builds ./.venv on a fresh machine.
# torch is pinned to 2.13.0 (constraints.txt): it installs from a local CPU wheel here, and the
# constraint stops any other dependency from upgrading it into several GB of CUDA packages.
PY := .venv/bin/python
PIP := .venv/bin/pip
STAMP := .venv/.installed

.PHONY: demo test bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[quant,trl,test]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m paca train

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests

bench: $(STAMP)
	$(PY) -m paca bench --quick

clean:
	rm -rf .venv build src/*.egg-info
