"""The C extensions under AddressSanitizer and UndefinedBehaviorSanitizer (`make sanitize`).

    .venv/bin/python tests/sanitize.py [PYTEST ARGS...]

Every extension that pyproject.toml declares (``[[tool.setuptools.ext-modules]]``: the ingest's readers of dump
rows, votes, Pushshift lines, HTML and ids, which all read untrusted bytes) is compiled with
``-fsanitize=address,undefined`` into a copy of the package tree in a temporary folder; the installed build is
not touched. The tests that drive those extensions then run against that copy, with

* the ASan runtime preloaded into every process (the tests, the reading workers, the contract process),
* Python's own allocator off (``PYTHONMALLOC=malloc``), so that ASan sees every buffer the extensions get
  from ``PyMem_Malloc``,
* the first report fatal (``halt_on_error``), written to a file per process.

The run fails if a test fails or if any process wrote a report. It runs :data:`TESTS`, or the test files
PYTEST ARGS name (``tests/sanitize.py tests/test_reddit_fast.py -k image``); other PYTEST ARGS (``-q``, ``-x``)
are passed on. It needs gcc with
its sanitizer runtimes (libasan, libubsan) and Linux.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The tests that take the extensions' fast paths and their fallbacks: differential tests against the Python
# readers, hostile and fuzzed inputs, and whole ingests (1 and 2 workers, Stack Exchange and Pushshift).
TESTS = [
    "tests/test_clean.py", "tests/test_clean_fast_path.py", "tests/test_fast_posts.py", "tests/test_ids.py",
    "tests/test_reddit_fast.py", "tests/test_fuzz_inputs.py", "tests/test_hostile_rows.py",
    "tests/test_hostile_xml.py", "tests/test_ingest_parallel.py", "tests/test_ingest_names.py",
    "tests/test_ingest_stackexchange.py", "tests/test_ingest_formats.py", "tests/test_ingest_empty.py",
    "tests/test_reddit.py", "tests/test_reddit_parallel.py", "tests/test_reddit_replies.py",
]
FLAGS = ["-O1", "-g", "-fno-omit-frame-pointer", "-fwrapv", "-fsanitize=address,undefined",
         "-fno-sanitize-recover=all", "-fPIC", "-shared"]


class SetupError(Exception):
    """Something this check needs is missing (a compiler, a sanitizer runtime, the package's layout)."""


def extensions(pyproject: Path = REPO / "pyproject.toml") -> list[dict]:
    """The C extensions pyproject.toml declares: module name, sources, libraries."""
    data = tomllib.loads(pyproject.read_text())
    return [{"name": e["name"], "sources": list(e["sources"]), "libraries": list(e.get("libraries", []))}
            for e in data["tool"]["setuptools"].get("ext-modules", [])]


def package_dirs(pyproject: Path = REPO / "pyproject.toml") -> dict[str, str]:
    """Package name -> folder of the repository (``[tool.setuptools.package-dir]``)."""
    return dict(tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-dir"])


def copy_tree(dest: Path) -> None:
    """The package as an ordinary tree under ``dest`` (``dest/alignflow/...``), without built extensions."""
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.pyd")
    for package, folder in sorted(package_dirs().items(), key=lambda kv: kv[0].count(".")):
        target = dest.joinpath(*package.split("."))
        if not target.exists():
            shutil.copytree(REPO / folder, target, ignore=ignore)


def runtime(name: str) -> str:
    """The path of a gcc sanitizer runtime (``libasan.so``), or SetupError."""
    cc = shutil.which("gcc")
    if cc is None:
        raise SetupError("gcc not found: the sanitizer build needs gcc and its sanitizer runtimes")
    path = subprocess.run([cc, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(path) or not os.path.exists(path):
        raise SetupError(f"gcc has no {name} (Debian: the libasan8 / libubsan1 packages come with gcc)")
    return path


def build(dest: Path) -> list[Path]:
    """Compile every extension with the sanitizers into the tree under ``dest``; returns the built files."""
    include = sysconfig.get_paths()["include"]
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    built = []
    for ext in extensions():
        out = dest.joinpath(*ext["name"].split(".")).with_name(ext["name"].rsplit(".", 1)[1] + suffix)
        cmd = ["gcc", *FLAGS, f"-I{include}", *(str(REPO / s) for s in ext["sources"]),
               *(f"-l{lib}" for lib in ext["libraries"]), "-o", str(out)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise SetupError(f"building {ext['name']} failed:\n{res.stderr[-3000:]}")
        built.append(out)
    return built


def environment(tree: Path, reports: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LD_PRELOAD")}
    env.update({
        "PYTHONPATH": str(tree),  # the sanitized copy first, in every process the tests start
        "LD_PRELOAD": runtime("libasan.so"),
        "ASAN_OPTIONS": f"detect_leaks=0:halt_on_error=1:log_path={reports / 'asan'}",
        "UBSAN_OPTIONS": f"print_stacktrace=1:halt_on_error=1:log_path={reports / 'ubsan'}",
        "PYTHONMALLOC": "malloc",
        # py7zr's pycryptodomex loads its C parts with RTLD_DEEPBIND, which the ASan runtime refuses
        "PYCRYPTODOME_DISABLE_DEEPBIND": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    })
    return env


def check_loaded(tree: Path, env: dict[str, str]) -> None:
    """Every extension imports from the sanitized copy, not from the installed build."""
    names = [e["name"] for e in extensions()]
    code = "import importlib, sys\nfor n in sys.argv[1:]: print(importlib.import_module(n).__file__)"
    res = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, env=env, cwd=tree)
    if res.returncode != 0:
        raise SetupError(f"the sanitized extensions do not import:\n{res.stderr[-3000:]}")
    stray = [path for path in res.stdout.split() if not Path(path).resolve().is_relative_to(tree.resolve())]
    if stray:
        raise SetupError(f"extensions imported from outside the sanitized copy: {stray}")


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory(prefix="alignflow-sanitize-") as tmp:
        tree, reports = Path(tmp) / "tree", Path(tmp) / "reports"
        tree.mkdir()
        reports.mkdir()
        try:
            copy_tree(tree)
            built = build(tree)
            env = environment(tree, reports)
            check_loaded(tree, env)
        except SetupError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"sanitize: {len(built)} extensions built with {' '.join(FLAGS[4:6])}")
        # cwd: the copy (`python -m` puts the cwd first on sys.path; the repository's own `alignflow/` would
        # shadow the copy); test paths absolute, so pytest still takes its settings from the repository
        paths = [a for a in argv if not a.startswith("-") and (REPO / a.split("::")[0]).exists()]
        args = [str(REPO / a) if a in paths else a for a in argv] + ([] if paths else [str(REPO / t) for t in TESTS])
        rc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist",
                             "--rootdir", str(REPO), "-c", str(REPO / "pyproject.toml"), *args],
                            env=env, cwd=tree).returncode
        found = sorted(reports.iterdir())
        for path in found:
            text = path.read_text(errors="replace")  # the error and its first frames lead
            print(f"\n== sanitizer report {path.name}\n{text[:6000]}", file=sys.stderr)
        if found:
            print(f"sanitize: {len(found)} sanitizer report(s) (above)", file=sys.stderr)
            return 1
        print(f"sanitize: no sanitizer report; pytest exit status {rc}")
        return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
