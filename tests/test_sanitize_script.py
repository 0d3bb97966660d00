"""`make sanitize` (tests/sanitize.py) covers every C extension and builds them into a copy of the package tree."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import sanitize

REPO = Path(__file__).resolve().parents[1]


def test_every_c_source_is_an_extension_the_check_builds():
    exts = sanitize.extensions()
    sources = {s for e in exts for s in e["sources"]}
    assert sources == {str(p.relative_to(REPO)) for p in (REPO / "tasks" / "ingest").glob("*.c")}
    assert all(e["name"].startswith("alignflow.") for e in exts)
    # the tests it runs exist, and the differential tests of each extension are among them
    assert all((REPO / t).is_file() for t in sanitize.TESTS)
    assert {"tests/test_reddit_fast.py", "tests/test_fast_posts.py", "tests/test_clean_fast_path.py",
            "tests/test_ids.py"} <= set(sanitize.TESTS)


def test_the_copy_is_the_package_without_built_extensions(tmp_path):
    sanitize.copy_tree(tmp_path)
    root = tmp_path / "alignflow"
    for package in sanitize.package_dirs():
        folder = tmp_path.joinpath(*package.split("."))
        assert (folder / "__init__.py").is_file(), package
    assert (root / "tasks" / "ingest" / "reddit_parallel.py").is_file()
    assert not list(root.rglob("*.so")) and not list(root.rglob("__pycache__"))
    # each extension's built file goes where the copy's package imports it from
    for ext in sanitize.extensions():
        assert tmp_path.joinpath(*ext["name"].split(".")[:-1]).is_dir(), ext["name"]


@pytest.mark.skipif(shutil.which("gcc") is None, reason="no gcc here: the runtime lookup asks gcc")
def test_a_missing_sanitizer_runtime_is_named():
    with pytest.raises(sanitize.SetupError, match="no libnot-a-sanitizer.so"):
        sanitize.runtime("libnot-a-sanitizer.so")
