# Two entry points: `make demo` and `make test`. Each builds ./.venv on a fresh machine from the lock,
# constraints.txt: every distribution pinned to an exact, tested version, torch at 2.13.0 (a local CPU wheel
# here; any other version pulls several GB of CUDA packages). docs/DEPENDENCIES.md says how the lock moves.
PY := .venv/bin/python
STAMP := .venv/.installed
EXTRAS := .[quant,trl,tensorboard,test]
TORCH := torch==2.13.0
# Held back when `make lock` takes the newest releases, each for a known break:
#   transformers 5.24 refuses peft < 0.22 (unreleased on 2026-12-01) in add_adapter.
HOLD := transformers==5.23.0

.PHONY: demo test bench test-latest lock clean

# A fresh venv in $(1) with the newest releases (torch held), then $(2) more requirements.
define newest_venv
	rm -rf $(1) && python3 -m venv $(1)
	$(1)/bin/pip install -q --upgrade pip setuptools
	$(1)/bin/pip install -q $(TORCH)
	$(1)/bin/pip install -q --no-build-isolation -e "$(EXTRAS)" $(TORCH) $(2)
endef

# Rebuilt from scratch whenever the lock or the project's requirements change: exactly the lock, nothing left over.
$(STAMP): pyproject.toml constraints.txt
	rm -rf .venv && python3 -m venv .venv
	.venv/bin/pip install -q -c constraints.txt pip setuptools
	.venv/bin/pip install -q -c constraints.txt torch
	.venv/bin/pip install -q -c constraints.txt --no-build-isolation -e "$(EXTRAS)"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m paca train

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests

bench: $(STAMP)
	$(PY) -m paca bench --quick

# The suite against the newest releases (in .venv-latest, torch held): drift shows here before users see it.
test-latest:
	$(call newest_venv,.venv-latest,)
	.venv-latest/bin/python tools/lock.py diff constraints.txt
	PACA_UNLOCKED=1 .venv-latest/bin/python -m pytest -q -p no:cacheprovider tests

# Rewrite constraints.txt from the newest releases but $(HOLD); then `make test` rebuilds .venv from it.
lock:
	$(call newest_venv,.venv-lock,$(HOLD))
	.venv-lock/bin/python tools/lock.py write constraints.txt --hold "$(HOLD)"
	rm -rf .venv-lock

clean:
	rm -rf .venv .venv-latest .venv-lock build src/*.egg-info
