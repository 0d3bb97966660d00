from pathlib import Path

import pytest

from alignflow.config import AlignflowConfig, ConfigError, flatten, load_config, parse_override

REPO = Path(__file__).resolve().parents[1]


def test_defaults_match_the_documented_ones():
    cfg = AlignflowConfig()
    assert cfg.ingest.max_pairs_per_question == 10
    assert cfg.ingest.prompt_template == "Question: {title}\n\n{body}\n\nAnswer: "
    assert (cfg.ingest.split.train, cfg.ingest.split.validation, cfg.ingest.split.test) == (0.9, 0.05, 0.05)


def test_every_field_has_a_description():
    def walk(model):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            ann = field.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann)

    walk(AlignflowConfig)


def test_dotted_override_types_and_precedence(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("ingest:\n  max_pairs_per_question: 3\n  on_bad_row: quarantine\n")
    cfg = load_config(f, ["ingest.max_pairs_per_question=5", "ingest.split.salt=abc"])
    assert cfg.ingest.max_pairs_per_question == 5  # --set wins over the file
    assert cfg.ingest.on_bad_row == "quarantine"  # file wins over the default
    assert cfg.ingest.split.salt == "abc"


def test_unknown_key_is_an_error_not_ignored():
    with pytest.raises(ConfigError, match="ingest.max_pair_per_question"):
        load_config(None, ["ingest.max_pair_per_question=5"])


def test_bad_value_names_the_field():
    with pytest.raises(ConfigError, match="ingest.max_pairs_per_question"):
        load_config(None, ["ingest.max_pairs_per_question=zero"])


def test_split_fractions_must_add_up():
    with pytest.raises(ConfigError, match="add up to 1"):
        load_config(None, ["ingest.split.train=0.5"])


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("ingest.max_pairs_per_question")
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    assert parse_override("a=true") == ("a", True)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_shipped_configs_validate():
    files = sorted((REPO / "configs").glob("*.yaml"))
    assert files, "configs/ holds no YAML"
    for f in files:
        load_config(f)


def test_flatten_and_digest_are_stable():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}
    assert AlignflowConfig().digest() == AlignflowConfig().digest()
    assert AlignflowConfig().digest() != load_config(None, ["ingest.pair_seed=1"]).digest()
