"""What a user sees for bad input, bad config, a bad work directory: exit code 2 and one line, no traceback.

The commands run as the installed ``alignflow`` in fresh processes, against the session's Prefect test
server (so each does not pay a temporary server start).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

EXE = str(Path(sys.executable).parent / "alignflow")
POSTS = (b'<posts>\n<row Id="1" PostTypeId="1" Score="3" Title="Q" Body="q" />\n'
         b'<row Id="2" PostTypeId="2" ParentId="1" Score="2" Body="a" />\n'
         b'<row Id="3" PostTypeId="2" ParentId="1" Score="1" Body="b" />\n</posts>\n')


@pytest.fixture(scope="module")
def api_url(prefect_harness):
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def run_cli(tmp_path: Path, api_url: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "ALIGNFLOW_"))}
    env.update(PREFECT_API_URL=api_url, PREFECT_SERVER_ANALYTICS_ENABLED="false", HF_HUB_OFFLINE="1")
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)


def assert_one_line(proc: subprocess.CompletedProcess, *expected: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    for text in expected:
        assert text in lines[0], lines[0]


def site(tmp_path: Path, posts: bytes = POSTS, name: str = "site") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "Posts.xml").write_bytes(posts)
    return folder


def test_dtd_after_a_comment(tmp_path, api_url):
    s = site(tmp_path, b'<!-- <a> --><!DOCTYPE posts [<!ENTITY x "EXPANDED">]>\n' + POSTS.replace(b'"Q"', b'"&x;"'))
    proc = run_cli(tmp_path, api_url, "ingest", str(s), "--workdir", "w")
    assert_one_line(proc, "Posts.xml, line 2", "DTD")
    assert "EXPANDED" not in proc.stderr


def test_score_beyond_64_bits(tmp_path, api_url):
    s = site(tmp_path, POSTS.replace(b'Score="2"', b'Score="99999999999999999999"'))
    assert_one_line(run_cli(tmp_path, api_url, "ingest", str(s), "--workdir", "w"), "line 3", "field Score")


@pytest.mark.parametrize("command", ["ingest", "pipeline"])
@pytest.mark.parametrize("case", ["missing", "empty"])
def test_bad_source_is_refused_before_anything_starts(tmp_path, case, command):
    """Checked before Prefect or the flow start: with an API that nobody serves, a command that got as far
    as its flow would fail on the connection (a traceback) instead of naming the SOURCE."""
    source = tmp_path / "pairs.jsonl"
    if case == "empty":
        source.touch()
    args = [str(source)] if command == "ingest" else ["--set", f'pipeline.sources=["{source}"]']
    proc = run_cli(tmp_path, "http://127.0.0.1:9/api", command, *args, "--workdir", "w")
    assert_one_line(proc, f"{source}: {'no such file or folder' if case == 'missing' else 'empty file'}")


def test_posts_xml_that_is_a_folder(tmp_path, api_url):
    (tmp_path / "site" / "Posts.xml").mkdir(parents=True)
    assert_one_line(run_cli(tmp_path, api_url, "ingest", "site", "--workdir", "w"), "Posts.xml: a folder")


def test_unknown_prompt_template_field(tmp_path, api_url):
    s = site(tmp_path)
    proc = run_cli(tmp_path, api_url, "ingest", str(s), "--workdir", "w", "--set", 'ingest.prompt_template="{nope}"')
    assert_one_line(proc, "prompt_template", "nope")


@pytest.mark.parametrize("case", ["binary", "folder", "missing"])
def test_config_that_is_not_a_yaml_file(tmp_path, api_url, case):
    path = tmp_path / "cfg.yaml"
    if case == "binary":
        path.write_bytes(bytes(range(256)) * 4)
    elif case == "folder":
        path.mkdir()
    proc = run_cli(tmp_path, api_url, "show-config", "--config", str(path))
    assert_one_line(proc, {"binary": "not a text file", "folder": "is a folder", "missing": "not found"}[case])


@pytest.mark.parametrize("case", ["file", "unwritable"])
def test_workdir_that_cannot_be_used(tmp_path, api_url, case):
    s = site(tmp_path)
    if case == "file":
        workdir = tmp_path / "w"
        workdir.write_text("not a folder")
        expected = "is a file, not a folder"
    else:
        workdir = Path("/proc/self/alignflow-work")  # a read-only place, even for root
        expected = "is not a writable folder"
    assert_one_line(run_cli(tmp_path, api_url, "ingest", str(s), "--workdir", str(workdir)), expected)


def test_generate_dump_site_outside_its_folder(tmp_path, api_url):
    proc = run_cli(tmp_path, api_url, "generate-dump", "--out", "out", "--questions", "3", "--site", "../x")
    assert_one_line(proc, "bad site name")
    assert not (tmp_path / "x").exists()


def test_debug_shows_the_traceback(tmp_path, api_url):
    s = site(tmp_path, b"<!DOCTYPE posts>\n" + POSTS)
    proc = run_cli(tmp_path, api_url, "--debug", "ingest", str(s), "--workdir", "w")
    assert proc.returncode == 2 and "Traceback" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") or "error: " in proc.stderr


def test_every_user_error_class_is_named_where_it_lives():
    """The CLI looks user errors up by module and name (without importing the modules): a wrong name would stop
    that class from being reported as one line."""
    import importlib

    from alignflow.flows import cli

    for module, name in cli._USER_ERRORS:
        cls = getattr(importlib.import_module(module), name)
        assert isinstance(cls, type) and issubclass(cls, Exception), (module, name)
    assert len(cli._user_errors()) == len(cli._USER_ERRORS) + 1  # all imported now, and FileNotFoundError
