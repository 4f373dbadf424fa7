"""Run PEFT's own PaCA tests, unmodified, against paca's PacaConfig (and against PEFT's, as the baseline).

PEFT ships its own PaCA (peft.PacaConfig, peft/tuners/paca/); its tests are the best outside spec of what a PaCA
must do in PEFT. This script fetches the sdist of the *installed* peft (cached, never copied into this repository),
unpacks it and runs, with `sys.executable -m pytest` and the sdist's own pytest configuration:
  tests/test_paca.py and the PaCA cases (`-k paca`, case-insensitive, on the test ids) of the PEFT test files below.

  --impl peft   PEFT's PaCA unmodified: the baseline.
  --impl paca   (default) tools/upstream_plugin.py binds paca.PacaConfig to peft.PacaConfig and friends first.
  --impl both   both, then the conformance gap: tests failing on paca that pass on PEFT (those that use PEFT's
                PaCA internals, its layer classes or torch.ops.peft, listed apart).

In paca mode the plugin also adds rows to test_custom_models.py's TEST_CASES for the layers only paca tunes
(transformers Conv1D, Conv1d/2d/3d, grouped): PEFT's generic tests on them, named "... (paca only)", must pass too.

Tests that read a model from the HF hub are reported as skipped, with the model id (no network here). Outcomes go to
JUnit XML files in the cache dir ($PACA_CACHE_DIR, default ~/.cache/paca/upstream); `--impl paca` compares against
the baseline stored there for the same versions (running it first if there is none) and exits 1 on any gap.
Extra arguments after `--` go to pytest (e.g. `-- -x -k gradcheck`).
"""

import argparse
import hashlib
import importlib.metadata as md
import importlib.util
import os
import platform
import re
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
FILES = [
    "test_paca.py",
    "test_config.py",
    "test_custom_models.py",
    "test_initialization.py",
    "test_decoder_models.py",
    "test_encoder_decoder_models.py",
    "test_feature_extraction_models.py",
    "test_seq_classifier.py",
    "test_lora_conversion.py",
]
# What these files import at module level beyond paca's own requirements (tests/testing_common.py: diffusers,
# test_initialization.py: scipy); without them collection fails. Versions tried with peft 0.22.0.
TEST_DEPS = {"diffusers": "diffusers==0.42.1", "scipy": "scipy==1.17.1"}


def sh(*cmd, **kw):
    print("+", " ".join(map(str, cmd)), flush=True)
    return subprocess.run([str(c) for c in cmd], **kw)


def fetch_tests(cache: Path, version: str) -> Path:
    """The tests/ dir of peft==version's sdist, downloaded and unpacked into the cache once."""
    root = cache / f"peft-{version}"
    if (root / "tests" / "test_paca.py").exists():
        return root
    sdist = cache / f"peft-{version}.tar.gz"
    if not sdist.exists():
        sh(
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-binary",
            ":all:",
            "--no-deps",
            f"peft=={version}",
            "-d",
            cache,
            check=True,
        )
    tmp = cache / f".unpack-{os.getpid()}"
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp, filter="data")
    (tmp / f"peft-{version}").rename(root)  # atomic: a half-unpacked tree is never taken for a cached one
    tmp.rmdir()
    return root


def run(impl: str, root: Path, results: Path, extra: list) -> float:
    partial = results.with_suffix(".partial")
    env = dict(
        os.environ,
        PACA_UPSTREAM_IMPL=impl,
        HF_HUB_OFFLINE="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(TOOLS), os.environ.get("PYTHONPATH")])),
    )
    # -o addopts=: the sdist's pyproject adds --cov (pytest-cov); its markers and filterwarnings still apply.
    # --import-mode=importlib: the sdist drops tests/__init__.py, which the tests' relative imports need.
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-p",
        "upstream_plugin",
        "-o",
        "addopts=",
        "--import-mode=importlib",
        "-q",
        "-rfE",
        "--disable-warnings",
        "--junitxml",
        partial,
        "-k",
        "paca",
        *[f"tests/{f}" for f in FILES],
        *extra,
    ]
    start = time.monotonic()
    rc = sh(*cmd, cwd=root, env=env).returncode
    if rc not in (0, 1):  # 0: all passed, 1: some failed; anything else means the run itself broke
        sys.exit(f"pytest exited {rc} for --impl {impl}")
    partial.replace(results)  # only a finished run can serve as a stored baseline
    return time.monotonic() - start


def outcomes(results: Path) -> dict:
    """{test id: (outcome, first line of the message, PEFT internals it uses or "")} from a JUnit XML file."""
    out = {}
    for case in ET.parse(results).iter("testcase"):
        key = f"{case.get('classname')}::{case.get('name')}"
        internal = next((p.get("value") for p in case.iter("property") if p.get("name") == "peft_internal"), "")
        out[key] = ("passed", "", internal)
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                message = (node.get("message") or node.text or "").strip().splitlines() or [""]
                out[key] = ({"failure": "failed", "error": "errors"}.get(tag, tag), message[0], internal)
                break
    return out


def summary(impl: str, res: dict, seconds: float = None) -> str:
    counts = {k: sum(1 for o, *_ in res.values() if o == k) for k in ("passed", "failed", "skipped", "errors")}
    hub = sum(1 for o, m, _ in res.values() if o == "skipped" and "from the hub" in m)
    took = f" in {seconds:.0f} s" if seconds is not None else " (stored run)"
    return f"{impl}: " + ", ".join(f"{v} {k}" for k, v in counts.items()) + f" ({hub} skips read the hub){took}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", choices=["paca", "peft", "both"], default="paca")
    parser.add_argument("pytest_args", nargs="*", help="after --: passed on to pytest")
    args = parser.parse_args()

    missing = [pin for mod, pin in TEST_DEPS.items() if importlib.util.find_spec(mod) is None]
    if missing:
        sys.exit(f"PEFT's tests need {' '.join(missing)} (or the lock's versions) in {sys.prefix}")

    version = md.version("peft")
    cache = Path(os.environ.get("PACA_CACHE_DIR") or Path.home() / ".cache" / "paca" / "upstream")
    cache.mkdir(parents=True, exist_ok=True)
    root = fetch_tests(cache, version)
    # The baseline holds for one set of versions and pytest arguments only: key its results file by them.
    versions = [f"{d}=={md.version(d)}" for d in ("peft", "torch", "transformers", "huggingface_hub")]
    key = hashlib.sha1(repr((versions, platform.python_version(), args.pytest_args)).encode()).hexdigest()[:10]
    result = {impl: cache / f"results-{impl}-peft{version}-{key}.xml" for impl in ("peft", "paca")}

    res = {}  # impl: (outcomes, seconds or None when read from a stored run)
    if args.impl != "paca" or not result["peft"].exists():
        seconds = run("peft", root, result["peft"], args.pytest_args)
        res["peft"] = (outcomes(result["peft"]), seconds)
    if args.impl != "peft":
        seconds = run("paca", root, result["paca"], args.pytest_args)
        res["paca"] = (outcomes(result["paca"]), seconds)
        res.setdefault("peft", (outcomes(result["peft"]), None))
    print("\n" + "\n".join(summary(impl, *res[impl]) for impl in ("peft", "paca") if impl in res))
    if "paca" not in res:
        return 0
    base, mine = res["peft"][0], res["paca"][0]
    gap = sorted(t for t, (o, *_) in mine.items() if o in ("failed", "errors") and base.get(t, ("",))[0] == "passed")
    groups = {}  # by first error line, paths (temporary dirs) left out, so that one cause reads as one group
    for test in gap:
        groups.setdefault(re.sub(r"(?<![\w.])/\S+", "<path>", mine[test][1])[:200], []).append(test)
    if gap:
        print(f"\nconformance gap: {len(gap)} tests fail on paca but pass on PEFT {version}, by first error line:")
    # Tests using PEFT's PaCA internals are marked. They count too (paca can make them pass, e.g. by registering its
    # layers as virtual subclasses of PEFT's), but their failure may say nothing about paca's behaviour.
    for message, tests in sorted(groups.items(), key=lambda g: -len(g[1])):
        print(f"  [{len(tests)}] {message}")
        print("\n".join(f"      {t}" + (f"  [uses PEFT's {mine[t][2]}]" if mine[t][2] else "") for t in tests))
    # Rows upstream_plugin.py adds to PEFT's generic custom-model tests for the layers only paca tunes (no baseline).
    extra = {t: o for t, (o, *_) in mine.items() if "(paca only)" in t}
    broken = sorted(t for t, o in extra.items() if o in ("failed", "errors"))
    if extra:
        counts = {k: sum(1 for o in extra.values() if o == k) for k in ("passed", "failed", "skipped", "errors")}
        print(
            "\nPEFT's generic tests on layers only paca tunes (Conv1D, Conv1d/2d/3d, grouped): "
            + ", ".join(f"{v} {k}" for k, v in counts.items())
        )
        print("\n".join(f"  {t}: {mine[t][1]}" for t in broken))
    passing = sorted(t for t, (o, _, internal) in mine.items() if internal and o == "passed")
    if passing:
        print(
            f"\n{len(passing)} pass on paca but use PEFT's PaCA internals: there they test PEFT's code (or nothing):"
        )
        print("\n".join(f"  {t}  [{mine[t][2]}]" for t in passing))
    return 1 if gap or broken else 0


if __name__ == "__main__":
    sys.exit(main())
