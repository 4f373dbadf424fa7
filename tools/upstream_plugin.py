"""pytest plugin for tools/upstream_tests.py: runs PEFT's own PaCA tests, unmodified, against paca or PEFT.

Loaded with `-p upstream_plugin` (tools/ on PYTHONPATH), so it is imported before any test module:
- PACA_UPSTREAM_IMPL=paca: `import paca` and bind `paca.PacaConfig` to every name the test files import it from, so
  `from peft import PacaConfig` in PEFT's tests gets paca's; =peft leaves PEFT untouched (the baseline).
- No HF hub here: a test that fails because it reads a model from the hub becomes a skip saying which model. Only
  errors raised by huggingface_hub for a missing network/cache entry count; any other failure stays a failure.
- Tests that use PEFT's PaCA internals (its layer classes, its torch.ops.peft ops) get the JUnit property
  `peft_internal`: on paca they test PEFT's code, or nothing, and are reported apart.
"""

import inspect
import os
import re
import sys

import pytest
from huggingface_hub.utils import _http

IMPL = os.environ.get("PACA_UPSTREAM_IMPL", "paca")
# The modules PEFT's tests (and peft's own lazy lookups) take PacaConfig from.
CONFIG_HOMES = ("peft", "peft.tuners", "peft.tuners.paca", "peft.tuners.paca.config")

if IMPL == "paca":
    import importlib

    import paca

    for _name in CONFIG_HOMES:
        importlib.import_module(_name).PacaConfig = paca.PacaConfig
elif IMPL != "peft":
    raise ValueError(f"PACA_UPSTREAM_IMPL must be 'paca' or 'peft', not {IMPL!r}")

# PEFT's `hub_online_once` lets a model's first use go online even under HF_HUB_OFFLINE=1; with no network here each
# such request would sleep through its retries. Retrying cannot help, so fail on the first attempt.
for _fn in (getattr(_http, name, None) for name in ("http_backoff", "http_stream_backoff", "_http_backoff_base")):
    if "max_retries" in (getattr(_fn, "__kwdefaults__", None) or {}):
        _fn.__kwdefaults__["max_retries"] = 0


def pytest_report_header(config):
    import peft

    if IMPL == "paca":
        import paca

        return f"upstream PaCA tests on paca ({paca.__file__}), peft.PacaConfig -> {peft.PacaConfig.__module__}"
    return f"upstream PaCA tests on PEFT {peft.__version__} itself ({peft.__file__})"


# PEFT's generic custom-model tests (test_custom_models.py) on the layer types PEFT's own PaCA does not tune, with the
# models that file already has for LoRA: rows added to its TEST_CASES in paca mode only, named "... PaCA (paca
# only)" so the report tells them from PEFT's rows (they have no baseline: PEFT's PaCA refuses these layers).
PACA_ONLY_CASES = [
    ("Embedding + transformers Conv1D PaCA (paca only)", "EmbConv1D", {"r": 2, "target_modules": ["conv1d"]}),
    ("Conv1d PaCA (paca only)", "Conv1d", {"r": 2, "target_modules": ["conv1d"]}),
    ("Conv2d 1 PaCA (paca only)", "Conv2d", {"r": 2, "target_modules": ["conv2d"]}),
    # r=5: lin0 reads 10 ReLU outputs, several zero for the test's inputs; 2 random columns can all be dead ones
    ("Conv2d 2 PaCA (paca only)", "Conv2d", {"r": 5, "target_modules": ["conv2d", "lin0"]}),
    ("Conv2d 1x1 PaCA (paca only)", "Conv2d1x1", {"r": 2, "target_modules": ["conv2d"]}),
    ("Conv2d Groups PaCA (paca only)", "Conv2dGroups", {"r": 2, "target_modules": ["conv2d"]}),
    ("Conv2d Groups2 PaCA (paca only)", "Conv2dGroups2", {"r": 2, "target_modules": ["conv2d"]}),
    ("Conv3d 1 PaCA (paca only)", "Conv3d", {"r": 2, "target_modules": ["conv3d"]}),
    ("Conv3d 1x1 PaCA (paca only)", "Conv3d1x1", {"r": 2, "target_modules": ["conv3d"]}),
]


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makeitem(collector, name, obj):
    # Called for each name of a module once it is imported, before its test classes parametrize their methods over
    # TEST_CASES (the list object the marks hold): extending that list in place adds rows to every such test.
    module = getattr(collector, "obj", None)
    if (
        IMPL != "paca"
        or not isinstance(collector, pytest.Module)
        or collector.path.name != "test_custom_models.py"
        or getattr(module, "_paca_rows", False)
    ):
        return None
    import paca

    module.TEST_CASES.extend((title, model_id, paca.PacaConfig, kwargs) for title, model_id, kwargs in PACA_ONLY_CASES)
    module._paca_rows = True
    return None


def pytest_collection_finish(session):
    # Guard against a silent baseline run: every collected test module must see the PacaConfig of the chosen impl,
    # and the baseline must not have paca (which re-registers PEFT's "PACA" type on import) loaded at all.
    import peft

    if IMPL == "peft" and "paca" in sys.modules:
        raise pytest.UsageError("paca was imported during a --impl peft run: the baseline would not be PEFT's")
    for module in {item.module for item in session.items if getattr(item, "module", None)}:
        cfg = getattr(module, "PacaConfig", None)
        if cfg is not None and cfg is not peft.PacaConfig:
            raise pytest.UsageError(f"{module.__name__}.PacaConfig is {cfg!r}, not {peft.PacaConfig!r}")


def _source(obj):
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return ""


def pytest_collection_modifyitems(items):
    # Tests that use PEFT's PaCA internals (layer classes from peft.tuners.paca, PEFT's torch.ops.peft custom ops),
    # directly or through a module-level helper, test PEFT's code whichever PacaConfig they get: tag them, so the
    # report can list them apart (in the JUnit XML as property peft_internal).
    internal = {}
    for module in {item.module for item in items if getattr(item, "module", None)}:
        names = {
            name
            for name, obj in vars(module).items()
            if name != "PacaConfig" and getattr(obj, "__module__", "").startswith("peft.tuners.paca.")
        }
        names |= {
            name
            for name, obj in vars(module).items()
            if inspect.isfunction(obj)
            and not name.startswith("test")
            and any(re.search(rf"\b{n}\b", _source(obj)) for n in names)
        }
        internal[module] = names
    for item in items:
        src = _source(getattr(item, "function", None))
        used = [n for n in sorted(internal.get(getattr(item, "module", None), ())) if re.search(rf"\b{n}\b", src)]
        used += ["torch.ops.peft"] if "torch.ops.peft." in src else []
        if used:
            item.user_properties.append(("peft_internal", ", ".join(used)))


def _chain(exc):
    """exc and the exceptions it was raised from or while handling."""
    seen = []
    while exc is not None and all(exc is not e for e in seen):
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def _is_hub_error(excinfo):
    # Only what huggingface_hub raises when neither the hub nor its local cache has the file; transformers and PEFT
    # wrap it (OSError, ValueError) but keep it in the chain.
    from huggingface_hub import errors

    hub_errors = (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled)
    return excinfo is not None and any(isinstance(e, hub_errors) for e in _chain(excinfo.value))


REPO_ID = r"[\w.-]+/[\w.-]+"


def _model_id(item, excinfo):
    """The hub repo the test failed to read: the URL in the errors, else the test's `model_id` (a parameter for most,
    a class attribute for TestPacaLoraConversion), else a quoted repo id in the errors; None if none is found."""
    text = "\n".join(str(e) for e in _chain(excinfo.value))
    url = re.search(rf"huggingface\.co/({REPO_ID}?)/resolve/", text)
    params = getattr(getattr(item, "callspec", None), "params", {})
    quoted = re.search(rf"'({REPO_ID})'", text)
    for value in [
        url and url.group(1),
        params.get("model_id"),
        getattr(item.cls, "model_id", None),
        quoted and quoted.group(1),
    ]:
        if isinstance(value, str) and re.fullmatch(REPO_ID, value):
            return value
    return None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed and call.when in ("setup", "call"):
        model_id = _model_id(item, call.excinfo) if _is_hub_error(call.excinfo) else None
        # A local directory missing a file is the code's fault, not the network's: that stays a failure.
        if model_id is not None and not os.path.exists(model_id):
            reason = f"reads {model_id} from the hub (offline here)"
            report.outcome = "skipped"
            report.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: {reason}")
    return report
