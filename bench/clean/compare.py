"""The cleaning of `tasks/ingest/clean.py` against the libraries that do the same job: markdownify and html2text
(HTML -> Markdown) and ftfy (mojibake repair).

    .venv/bin/python -m pip install markdownify html2text ftfy    # not dependencies of alignflow
    .venv/bin/python bench/clean/compare.py

For each library: how many of `tests/test_clean.py`'s tests pass with it in place of alignflow's function
(the test file is run with the function swapped), and its speed on every post body of the Stack Exchange
fixtures (best of 3) against alignflow's, measured in the same run.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SWAPS = ("markdownify", "html2text", "ftfy")

# Imported by pytest (-p) in a child process: swaps alignflow's function for the library's before the tests import it.
PLUGIN = '''
import os
import alignflow.tasks.ingest.clean as clean
from importlib import import_module
which = os.environ["ALIGNFLOW_CLEAN_SWAP"]
if which == "markdownify":
    md = import_module("markdownify").markdownify
    clean.html_to_text = lambda h: md(h or "", heading_style="ATX").strip()
elif which == "html2text":
    h2t = import_module("html2text")
    def render(h):
        conv = h2t.HTML2Text(); conv.body_width = 0; conv.ignore_links = True; conv.ignore_images = True
        return conv.handle(h or "").strip()
    clean.html_to_text = render
elif which == "ftfy":
    clean._fix_mojibake = import_module("ftfy").fix_encoding
'''


def tests_with(swap: str, tmp: Path) -> str:
    (tmp / "clean_swap_plugin.py").write_text(PLUGIN)
    env = {**os.environ, "ALIGNFLOW_CLEAN_SWAP": swap, "PYTHONPATH": f"{tmp}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "clean_swap_plugin", "-p", "no:cacheprovider",
                          str(REPO / "tests" / "test_clean.py")], capture_output=True, text=True, env=env, cwd=REPO)
    lines = [ln for ln in out.stdout.splitlines() if re.search(r"\d+ (passed|failed)", ln)]
    return lines[-1] if lines else out.stdout[-300:]


def best_of(fn, data, reps: int = 3) -> float:
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        for item in data:
            fn(item)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> int:
    import tempfile

    from lxml import etree

    from alignflow.tasks.ingest.clean import _fix_mojibake, html_to_text

    missing = [m for m in SWAPS if not _importable(m)]
    if missing:
        print(f"install {' '.join(missing)} first (see the docstring)")
        return 2
    import ftfy
    import html2text
    from markdownify import markdownify

    with tempfile.TemporaryDirectory() as tmp:
        print("tests/test_clean.py with alignflow's own functions:", tests_with("none", Path(tmp)))
        for swap in SWAPS:
            print(f"tests/test_clean.py with {swap:<12}", tests_with(swap, Path(tmp)))

    bodies = []
    for f in sorted(glob.glob(str(REPO / "tests" / "fixtures" / "stackexchange" / "*" / "Posts.xml"))):
        for _, el in etree.iterparse(f, tag="row"):
            bodies.append(el.get("Body") or "")
            el.clear()

    def h2t(h: str) -> str:
        conv = html2text.HTML2Text()
        conv.body_width, conv.ignore_links, conv.ignore_images = 0, True, True
        return conv.handle(h)

    print(f"\n{len(bodies)} post bodies of the fixtures ({sum(map(len, bodies))} characters), best of 3")
    own = best_of(html_to_text, bodies)
    print(f"  html_to_text (alignflow) {own * 1e3:8.1f} ms")
    for name, fn in (("markdownify", lambda h: markdownify(h, heading_style="ATX")), ("html2text", h2t)):
        t = best_of(fn, bodies)
        print(f"  {name:<24} {t * 1e3:8.1f} ms  ({t / own:.1f}x alignflow's time)")
    texts = [html_to_text(b) for b in bodies]
    broken = [t.encode("utf-8").decode("cp1252", errors="replace") for t in texts]  # UTF-8 read as cp1252
    own = best_of(_fix_mojibake, texts + broken)
    lib = best_of(ftfy.fix_encoding, texts + broken)
    print(f"\nmojibake repair on {len(texts)} texts and the same texts broken: alignflow {own * 1e3:.1f} ms, "
          f"ftfy.fix_encoding {lib * 1e3:.1f} ms ({lib / own:.1f}x)")
    print(f"  broken texts restored exactly: alignflow {sum(_fix_mojibake(b) == t for b, t in zip(broken, texts))}, "
          f"ftfy {sum(ftfy.fix_encoding(b) == t for b, t in zip(broken, texts))} of {len(texts)}")
    return 0


def _importable(name: str) -> bool:
    try:
        __import__(name)
        return True
    except ImportError:
        return False


if __name__ == "__main__":
    sys.exit(main())
