"""The pipeline's cache key holds the content of the files a stage's config names: a file edited in place under
the same name is not a cache hit."""

from __future__ import annotations

import json

from alignflow.config import load_config
from alignflow.tasks.stage_cache import stage_key
from alignflow.tasks.named_files import named_file_digests, named_paths, path_digest

PAIR = {"prompt": "Which is better?", "chosen": "this one", "rejected": "that one"}


def _key(stage: str, overrides: list[str]) -> str:
    return stage_key(stage, load_config(None, overrides), {"pairs": "d1", "demos": "d2"}, {})


def test_a_pairs_file_edited_in_place_changes_the_pm_key(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps(PAIR) + "\n")
    overrides = [f"pm.pairs_file={pairs}"]
    first = _key("pm", overrides)
    assert _key("pm", overrides) == first  # nothing changed: the same key (a cache hit)
    pairs.write_text(json.dumps({**PAIR, "chosen": "another one"}) + "\n")  # same name, new content
    edited = _key("pm", overrides)
    assert edited != first
    pairs.unlink()
    assert _key("pm", overrides) not in (first, edited)


def test_a_pair_source_folder_edited_in_place_changes_the_pmp_key(tmp_path):
    folder = tmp_path / "ingest"
    folder.mkdir()
    (folder / "pairs.parquet").write_bytes(b"one")
    overrides = [f"pmp.sources=[{{site: '*', data: {folder}}}]"]
    first = _key("pmp", overrides)
    (folder / "pairs.parquet").write_bytes(b"two")
    assert _key("pmp", overrides) != first


def test_named_paths_of_a_dumped_config():
    cfg = load_config(None, ["pm.pairs_file=a.jsonl", "pmp.sources=[{site: x, data: b}, {site: y}]",
                             "ppo.reward_model=r"]).model_dump(mode="json")
    found = dict(named_paths(cfg))
    assert found == {"pm.pairs_file": "a.jsonl", "pmp.sources[0].data": "b", "ppo.reward_model": "r"}


def test_path_digest(tmp_path):
    (tmp_path / "f").write_bytes(b"x")
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "sub" / "w").write_bytes(b"y")
    before = path_digest(tmp_path / "d")
    (tmp_path / "d" / "sub" / "w").write_bytes(b"z")
    assert path_digest(tmp_path / "d") != before
    (tmp_path / "d" / "sub" / "w").write_bytes(b"y")
    assert path_digest(tmp_path / "d") == before
    (tmp_path / "d" / "sub" / "w").rename(tmp_path / "d" / "sub" / "v")  # same bytes, another name
    assert path_digest(tmp_path / "d") != before
    assert path_digest(tmp_path / "missing") is None
    assert named_file_digests({"pairs_file": str(tmp_path / "f"), "site": str(tmp_path / "f")}) == {
        f"pairs_file={tmp_path / 'f'}": path_digest(tmp_path / "f")}
