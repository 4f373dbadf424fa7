# Two entry points: `make demo` and `make test`. Each builds ./.venv on a fresh machine from the lock,
# constraints.txt: every distribution pinned to an exact, tested version, torch at 2.13.0 (a local CPU wheel
# here; any other version pulls several GB of CUDA packages). docs/DEPENDENCIES.md says how the lock moves.
PY := .venv/bin/python
STAMP := .venv/.installed
EXTRAS := .[train,quant,tensorboard,test,lint,upstream-tests,quality]
TORCH := torch==2.13.0
# Held back when `make lock` takes the newest releases, each for a known break:
#   (nothing held on 2026-12-07)
HOLD :=

.PHONY: demo test bench test-latest test-upstream test-axolotl lock clean

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

LINTED := src tests tools examples benchmarks
test: $(STAMP)
	$(PY) -m ruff format --check -q $(LINTED)
	$(PY) -m ruff check -q $(LINTED)
	$(PY) -m pytest -q -p no:cacheprovider tests

bench: $(STAMP)
	$(PY) -m paca bench --quick

# The suite against the newest releases (in .venv-latest, torch held): drift shows here before users see it.
test-latest:
	$(call newest_venv,.venv-latest,)
	.venv-latest/bin/python tools/lock.py diff constraints.txt
	PACA_UNLOCKED=1 .venv-latest/bin/python -m pytest -q -p no:cacheprovider tests

# PEFT's own PaCA tests (from the sdist of the installed peft, fetched and cached, never copied here), run unmodified
# with peft.PacaConfig routed to paca's: every one that passes on PEFT's PaCA must pass on paca (tools/upstream_tests.py).
test-upstream: $(STAMP)
	$(PY) tools/upstream_tests.py --impl both

# paca's core beside axolotl 0.19 at exactly the versions it pins (constraints-axolotl.txt, in .venv-axolotl): pip
# must accept paca's lower bounds there, the plugin trains through `axolotl train`, the tuner's tests pass.
AXOLOTL_TESTS := tests/test_axolotl.py tests/test_bad_input.py tests/test_ops.py tests/test_columns.py \
	tests/test_layers.py tests/test_layers_adapters.py tests/test_layers_precision.py tests/test_layers_training.py \
	tests/test_peft_integration.py tests/test_peft_integration_merge.py tests/test_peft_integration_transformers.py \
	tests/test_save_load.py tests/test_switching.py tests/test_export.py tests/test_architectures.py \
	tests/test_experts.py tests/test_experts_models.py tests/test_experts_routers.py \
	tests/test_selection.py tests/test_qpaca.py tests/test_compile.py
test-axolotl:
	rm -rf .venv-axolotl && python3 -m venv .venv-axolotl
	.venv-axolotl/bin/pip install -q -c constraints-axolotl.txt pip setuptools
	.venv-axolotl/bin/pip install -q -c constraints-axolotl.txt torch
	.venv-axolotl/bin/pip install -q -c constraints-axolotl.txt axolotl
	.venv-axolotl/bin/pip install -q -c constraints-axolotl.txt --no-build-isolation -e ".[quant,test]"
	.venv-axolotl/bin/python -m pytest -q -p no:cacheprovider $(AXOLOTL_TESTS)

# Rewrite constraints.txt from the newest releases but $(HOLD); then `make test` rebuilds .venv from it.
lock:
	$(call newest_venv,.venv-lock,$(HOLD))
	.venv-lock/bin/python tools/lock.py write constraints.txt --hold "$(HOLD)"
	rm -rf .venv-lock

clean:
	rm -rf .venv .venv-latest .venv-lock .venv-axolotl build src/*.egg-info
