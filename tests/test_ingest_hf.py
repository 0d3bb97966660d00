"""Hugging Face datasets on disk (save_to_disk folders, SHP-style Parquet): one reader file, found by the registry."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alignflow.config import IngestConfig
from alignflow.tasks.ingest.errors import IngestError
from alignflow.tasks.ingest.run import execute_ingest, plan_ingest
from alignflow.tasks.ingest.sources import detect_format, format_names

SHP = {
    "post_id": ["p1", "p1", "p2"],
    "domain": ["askculinary_train"] * 3,
    "history": ["How long do I rest a steak?", "How long do I rest a steak?", "Why does bread go stale?"],
    "human_ref_A": ["Five minutes, tented.", "Do not rest it.", "Starch retrogradation."],
    "human_ref_B": ["Do not rest it.", "Ten minutes.", "Moisture loss only."],
    "labels": [1, 0, 1],
    "score_A": [40, 2, 12],
    "score_B": [2, 9, 3],
}


def save_to_disk(folder: Path, columns: dict) -> Path:
    """The layout ``datasets.Dataset.save_to_disk`` writes: state.json, dataset_info.json, Arrow stream files."""
    folder.mkdir(parents=True)
    table = pa.table(columns)
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table, max_chunksize=2)
    (folder / "state.json").write_text(json.dumps(
        {"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_fingerprint": "0", "_format_type": None,
         "_split": "train"}))
    (folder / "dataset_info.json").write_text(json.dumps({"features": {k: {"dtype": "string"} for k in columns}}))
    return folder


def ingest(tmp_path: Path, *sources):
    cfg = IngestConfig()
    return execute_ingest(plan_ingest(list(sources), tmp_path / "work", cfg), cfg)


def test_registry_lists_the_reader_from_its_own_file():
    assert format_names()[-3:] == ("stackexchange", "reddit", "pairs")
    assert "hf" in format_names()


def test_shp_save_to_disk_folder(tmp_path):
    folder = save_to_disk(tmp_path / "shp", SHP)
    assert detect_format(folder) == "hf"
    result = ingest(tmp_path, folder)
    pairs = pd.read_parquet(result.datasets["pairs"]["path"]).sort_values("chosen").reset_index(drop=True)
    assert len(pairs) == 3
    first = pairs[pairs.chosen == "Five minutes, tented."].iloc[0]
    assert first.rejected == "Do not rest it." and first.chosen_score == 40 and first.rejected_score == 2
    assert first.site == "askculinary_train" and first.question_id == "p1"
    # labels = 0: B is preferred
    assert "Ten minutes." in set(pairs.chosen)
    arrow = str(folder / "data-00000-of-00001.arrow")
    assert result.report["files"][arrow]["rows"] == 3 and result.report["adds_up"]


def test_hh_dataset_dict_with_two_splits(tmp_path):
    root = tmp_path / "hh"
    root.mkdir()
    rows = {"chosen": ["\n\nHuman: Hi?\n\nAssistant: Hello, how can I help?"],
            "rejected": ["\n\nHuman: Hi?\n\nAssistant: Go away."]}
    save_to_disk(root / "train", rows)
    save_to_disk(root / "test", {"chosen": ["\n\nHuman: 2+2?\n\nAssistant: 4."],
                                 "rejected": ["\n\nHuman: 2+2?\n\nAssistant: 5."]})
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    result = ingest(tmp_path, root)
    pairs = pd.read_parquet(result.datasets["pairs"]["path"])
    assert sorted(pairs.chosen) == ["4.", "Hello, how can I help?"]
    assert set(pairs.prompt) == {"\n\nHuman: Hi?\n\nAssistant:", "\n\nHuman: 2+2?\n\nAssistant:"}


def test_shp_parquet_is_hf_and_plain_pairs_parquet_is_not(tmp_path):
    shp = tmp_path / "shp.parquet"
    pq.write_table(pa.table(SHP), shp)
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"prompt": ["p"], "chosen": ["a"], "rejected": ["b"]}), plain)
    assert detect_format(shp) == "hf" and detect_format(plain) == "pairs"
    assert ingest(tmp_path, shp).datasets["pairs"]["rows"] == 3


def test_bad_label_fails_with_the_row(tmp_path):
    bad = dict(SHP, labels=[1, 7, 0])
    folder = save_to_disk(tmp_path / "shp", bad)
    with pytest.raises(IngestError) as err:
        ingest(tmp_path, folder)
    assert "line 2" in str(err.value) and "labels" in str(err.value)
