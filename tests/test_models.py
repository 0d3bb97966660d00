"""alignflow.models: BPE tokenizer, named architectures, safe loading and saving (all offline, fast)."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from alignflow.models import (
    ARCHS,
    EOS_TOKEN,
    PAD_TOKEN,
    ModelLoadError,
    build_causal_lm,
    build_config,
    count_parameters,
    load_causal_lm,
    load_sequence_classifier,
    load_tokenizer,
    save_pretrained,
    save_tokenizer,
    train_bpe_tokenizer,
)

_WORDS = (
    "the a of to in is how why what does my your function return value list dict error python "
    "model train loss gradient vote answer question code tokenizer byte pair encoding café naïve "
    "日本語 λ Ω — “quotes” emoji 🙂 x y z i j k 0 1 2 42 3.14"
).split()
_SNIPPETS = [
    "def f(x):\n    return x + 1\n",
    "for i in range(10):\n\tprint(i)\n",
    "SELECT * FROM posts WHERE score > 10;",
    "if (a && b) { return -1; }",
    "Question: Why?\n\nAnswer: Because.",
]


def _corpus(n: int = 200, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 20)))
        texts.append(words + ("\n" + _SNIPPETS[i % len(_SNIPPETS)] if i % 3 == 0 else ""))
    return texts


ROUND_TRIP = [
    "Hello world",
    "  leading spaces and trailing  ",
    "line one\nline two\n\n\ttabbed\r\nwindows",
    "def f(x):\n    return {'a': [1, 2]}  # comment\n",
    "café naïve 日本語 λ→Ω 🙂👍🏽 ≠ ∑",
    "never seen: Ж ꙮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \u200b\u00a0end",
    "<|endoftext|> inside text",
    "",
]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return _corpus()


@pytest.fixture(scope="module")
def tok(corpus):
    return train_bpe_tokenizer(corpus, vocab_size=512, model_max_length=128)


@pytest.fixture(scope="module")
def tiny_lm(tok):
    cfg = build_config(
        "tiny-gpt2",
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        max_position=128,
    )
    return build_causal_lm(cfg, seed=0).eval()


@pytest.fixture(scope="module")
def saved_lm(tok, tiny_lm, tmp_path_factory):
    return save_pretrained(tiny_lm, tok, tmp_path_factory.mktemp("lm") / "tiny")


def _config_for(arch: str, vocab_size: int, max_position: int = 256):
    return build_config(
        arch, vocab_size=vocab_size, pad_token_id=1, eos_token_id=0, bos_token_id=0, max_position=max_position
    )


def _meta_count(cfg) -> int:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return count_parameters(model)


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_special_tokens(tok):
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert tok.eos_token == EOS_TOKEN and tok.bos_token == EOS_TOKEN and tok.pad_token == PAD_TOKEN
    assert tok.pad_token_id is not None and tok.eos_token_id is not None
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.bos_token_id == tok.eos_token_id
    assert tok.padding_side == "right"
    assert tok.model_max_length == 128
    assert 258 < len(tok) <= 512
    # Special tokens are atomic, and the tokenizer adds none by itself.
    assert tok(EOS_TOKEN)["input_ids"] == [tok.eos_token_id]
    assert tok("hello")["input_ids"][-1] != tok.eos_token_id


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_tokenizer_round_trips_text_exactly(tok, text):
    ids = tok(text)["input_ids"]
    decoded = tok.decode(ids)
    assert decoded == text
    assert "Ġ" not in decoded and "Ċ" not in decoded


def test_tokenizer_merges_common_words(tok, corpus):
    # BPE learned something: common words take fewer tokens than bytes.
    text = "the function return value"
    assert len(tok(text)["input_ids"]) < len(text.encode()) // 2


def test_tokenizer_right_padding(tok):
    batch = tok(["a", "the model train loss"], padding=True)
    first = batch["input_ids"][0]
    assert first[-1] == tok.pad_token_id
    assert batch["attention_mask"][0][0] == 1 and batch["attention_mask"][0][-1] == 0


def test_saved_tokenizer_loads_with_autotokenizer(tok, tmp_path):
    path = save_tokenizer(tok, tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(path)
    assert loaded.pad_token_id == tok.pad_token_id
    assert loaded.eos_token_id == tok.eos_token_id
    assert loaded.bos_token_id == tok.bos_token_id
    assert loaded.pad_token_id != loaded.eos_token_id
    assert loaded.padding_side == "right"
    assert len(loaded) == len(tok)
    for text in ROUND_TRIP:
        ids = loaded(text)["input_ids"]
        assert ids == tok(text)["input_ids"]
        assert loaded.decode(ids) == text
    # Portable name: transformers 4 cannot resolve "TokenizersBackend".
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_tokenizer_training_is_deterministic(corpus):
    a = train_bpe_tokenizer(corpus, vocab_size=400)
    b = train_bpe_tokenizer(iter(corpus), vocab_size=400)  # a one-pass iterator works too
    assert a.get_vocab() == b.get_vocab()
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    shuffled = corpus[:]
    random.Random(1).shuffle(shuffled)
    c = train_bpe_tokenizer(shuffled, vocab_size=400)
    assert c.backend_tokenizer.to_str() == a.backend_tokenizer.to_str()


def test_tokenizer_is_deterministic_across_processes_and_threads(tmp_path):
    # Another process (fresh Rust hash seeds) with a single-threaded pool gives the same file.
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_models import _corpus
        from alignflow.models import train_bpe_tokenizer
        sys.stdout.write(train_bpe_tokenizer(_corpus(), vocab_size=400).backend_tokenizer.to_str())
        """
    )
    env = {**os.environ, "RAYON_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout == train_bpe_tokenizer(_corpus(), vocab_size=400).backend_tokenizer.to_str()


def test_tokenizer_rejects_bad_arguments():
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer(["abc"], vocab_size=100)
    with pytest.raises(TypeError):
        train_bpe_tokenizer([b"bytes"], vocab_size=300)


# --------------------------------------------------------------------------- architectures


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_build_config(arch):
    cfg = _config_for(arch, vocab_size=4096, max_position=512)
    assert cfg.vocab_size == 4096
    assert (cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id) == (1, 0, 0)
    assert cfg._attn_implementation == "sdpa"
    family = ARCHS[arch].family
    if family == "gpt2":
        assert cfg.model_type == "gpt2" and cfg.n_positions == 512
        assert cfg.attn_pdrop == cfg.resid_pdrop == cfg.embd_pdrop == cfg.summary_first_dropout == 0
        assert cfg.tie_word_embeddings is True
    else:
        assert cfg.model_type == "llama" and cfg.max_position_embeddings == 512
        assert cfg.attention_dropout == 0
        assert cfg.tie_word_embeddings is False
    assert _meta_count(cfg) > 0


@pytest.mark.parametrize("arch", ["tiny-gpt2", "small-gpt2", "tiny-llama"])
def test_small_archs_build_real_weights(arch):
    cfg = _config_for(arch, vocab_size=1000)
    model = build_causal_lm(cfg, seed=0)
    assert count_parameters(model) == _meta_count(cfg)
    assert model.config._attn_implementation == "sdpa"
    assert not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())
    if ARCHS[arch].family == "gpt2":
        assert model.lm_head.weight is model.get_input_embeddings().weight


def test_parameter_counts():
    # GPT-2 small with its own vocabulary is the well-known 124,439,808.
    assert _meta_count(_config_for("gpt2-125m", vocab_size=50257, max_position=1024)) == 124_439_808
    n_llama = _meta_count(_config_for("llama-350m", vocab_size=32000, max_position=1024))
    assert 330e6 <= n_llama <= 370e6, n_llama
    assert _meta_count(_config_for("tiny-gpt2", vocab_size=4096)) < 1_000_000
    assert _meta_count(_config_for("tiny-llama", vocab_size=4096)) < 1_000_000
    assert _meta_count(_config_for("small-gpt2", vocab_size=4096)) < 10_000_000


def test_build_config_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown arch"):
        _config_for("gpt5", vocab_size=100)
    with pytest.raises(ValueError, match="pad_token_id"):
        build_config("tiny-gpt2", vocab_size=10, pad_token_id=10, eos_token_id=0, bos_token_id=0, max_position=8)


def test_seed_makes_init_reproducible():
    cfg = _config_for("tiny-llama", vocab_size=300)
    a, b, c = build_causal_lm(cfg, seed=3), build_causal_lm(cfg, seed=3), build_causal_lm(cfg, seed=4)
    wa, wb, wc = (m.get_input_embeddings().weight for m in (a, b, c))
    assert torch.equal(wa, wb)
    assert not torch.equal(wa, wc)


@pytest.mark.parametrize("arch", ["tiny-gpt2", "tiny-llama"])
def test_forward_backward_and_training_with_trained_tokenizer(tok, corpus, arch):
    cfg = build_config(
        arch,
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        max_position=128,
    )
    model = build_causal_lm(cfg, seed=0).train()
    batch = tok([t + EOS_TOKEN for t in corpus[:8]], padding=True, truncation=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        if not losses:
            grads = [p.grad for p in model.parameters()]
            assert all(g is not None and torch.isfinite(g).all() for g in grads)
            assert model.get_input_embeddings().weight.grad.abs().sum() > 0
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] * 0.8, losses


@pytest.mark.parametrize("arch", ["tiny-gpt2", "tiny-llama"])
def test_right_padding_does_not_change_real_token_logits(tok, arch):
    cfg = build_config(
        arch,
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        max_position=128,
    )
    model = build_causal_lm(cfg, seed=0).eval()
    texts = ["def f(x):", "the model train loss gradient vote answer question\n  code"]
    batch = tok(texts, padding=True, return_tensors="pt")
    n_real = int(batch["attention_mask"][0].sum())
    assert n_real < batch["input_ids"].shape[1]  # the first row really is padded
    with torch.no_grad():
        padded = model(**batch).logits
        alone = model(input_ids=tok(texts[0], return_tensors="pt")["input_ids"]).logits
    assert alone.shape[1] == n_real
    torch.testing.assert_close(padded[0, :n_real], alone[0], atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- save / load


def test_save_load_round_trip_gives_identical_logits(tok, tiny_lm, saved_lm):
    files = set(os.listdir(saved_lm))
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= files
    assert not any(f.endswith(".bin") for f in files)
    tok2 = load_tokenizer(saved_lm)
    assert tok2.alignflow_added_pad is False
    assert tok2.pad_token_id == tok.pad_token_id and tok2.eos_token_id == tok.eos_token_id
    model = load_causal_lm(saved_lm, tokenizer=tok2).eval()
    assert model.config.pad_token_id == tok.pad_token_id
    ids = tok2(["café 🙂 def f(x):\n    return x"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, tiny_lm(input_ids=ids).logits)


def test_save_pretrained_replaces_existing_folder_atomically(tok, tiny_lm, tmp_path):
    target = tmp_path / "model"
    save_pretrained(tiny_lm, tok, target)
    (target / "stale.txt").write_text("from the old save")
    other = build_causal_lm(tiny_lm.config, seed=1).eval()
    save_pretrained(other, tok, target)
    assert not (target / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no .tmp-/.old- left over
    reloaded = load_causal_lm(target)
    assert torch.equal(reloaded.get_input_embeddings().weight, other.get_input_embeddings().weight)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(NotADirectoryError):
        save_pretrained(other, tok, tmp_path / "a_file")


def test_load_causal_lm_dtype(saved_lm):
    model = load_causal_lm(saved_lm, torch_dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16


def test_bin_only_checkpoint_loads_with_warning(saved_lm, tiny_lm, tmp_path, caplog):
    from safetensors.torch import load_file

    folder = tmp_path / "bin-only"
    shutil.copytree(saved_lm, folder)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    with caplog.at_level(logging.WARNING, logger="alignflow.models.loading"):
        model = load_causal_lm(folder)
    assert any("no safetensors" in r.getMessage() for r in caplog.records)
    assert torch.equal(model.get_input_embeddings().weight, tiny_lm.get_input_embeddings().weight)


@pytest.mark.parametrize(
    "loader",
    [load_causal_lm, load_sequence_classifier, load_tokenizer],
    ids=["causal_lm", "classifier", "tokenizer"],
)
def test_missing_name_fails_fast_offline(monkeypatch, loader):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = "alignflow-nobody/no-such-model-xyz"
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as info:
        loader(name)
    assert time.monotonic() - start < 5
    msg = str(info.value)
    assert name in msg and "local folder" in msg and "hub" in msg
    assert isinstance(info.value, OSError)


def test_missing_local_path_fails_with_clear_error(tmp_path):
    missing = tmp_path / "nope" / "model"
    with pytest.raises(ModelLoadError, match="no such folder"):
        load_causal_lm(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="local folder"):
        load_causal_lm(empty)


def test_sequence_classifier_from_causal_lm_folder(tok, tiny_lm, saved_lm, tmp_path):
    rm = load_sequence_classifier(saved_lm, num_labels=1, tokenizer=tok).eval()
    assert rm.config.num_labels == 1
    assert rm.config.pad_token_id == tok.pad_token_id
    # The body is the causal LM's; only the score head is new.
    assert torch.equal(rm.get_input_embeddings().weight, tiny_lm.get_input_embeddings().weight)
    texts = ["def f(x):", "the model train loss gradient vote answer"]
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        scores = rm(**batch).logits
        alone = rm(**tok(texts[:1], return_tensors="pt")).logits
    assert scores.shape == (2, 1)
    assert torch.isfinite(scores).all()
    # Right padding: the score is read at the last real token, not at a pad.
    torch.testing.assert_close(scores[0], alone[0], atol=1e-5, rtol=1e-4)
    # A saved reward model reloads with its trained head.
    path = save_pretrained(rm, tok, tmp_path / "rm")
    rm2 = load_sequence_classifier(path, tokenizer=tok).eval()
    with torch.no_grad():
        assert torch.equal(rm2(**batch).logits, scores)


def _tokenizer_without_pad(corpus, tmp_path, *, pad_is_eos: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(corpus, trainer=trainer)
    extra = {"pad_token": EOS_TOKEN} if pad_is_eos else {}
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, **extra)
    assert (hf.pad_token is None) != pad_is_eos
    return save_tokenizer(hf, tmp_path / ("pad-eos" if pad_is_eos else "no-pad")), len(hf)


@pytest.mark.parametrize("pad_is_eos", [False, True], ids=["no-pad", "pad-is-eos"])
def test_load_tokenizer_adds_distinct_pad(corpus, tmp_path, pad_is_eos):
    path, n_before = _tokenizer_without_pad(corpus, tmp_path, pad_is_eos=pad_is_eos)
    tok = load_tokenizer(path)
    assert tok.alignflow_added_pad is True
    assert tok.pad_token == PAD_TOKEN
    assert tok.pad_token_id != tok.eos_token_id
    assert len(tok) == n_before + 1 and tok.pad_token_id == n_before
    assert tok.padding_side == "right"
    batch = tok(["ab", "the model"], padding=True)
    assert tok.pad_token_id in batch["input_ids"][0]
    assert tok.eos_token_id not in batch["input_ids"][0]
    assert load_tokenizer(path, padding_side="left").padding_side == "left"


def test_model_grows_embeddings_for_added_pad(corpus, tmp_path):
    path, n_before = _tokenizer_without_pad(corpus, tmp_path, pad_is_eos=False)
    plain = AutoTokenizer.from_pretrained(path)
    cfg = build_config(
        "tiny-gpt2",
        vocab_size=n_before,
        pad_token_id=plain.eos_token_id,
        eos_token_id=plain.eos_token_id,
        bos_token_id=plain.eos_token_id,
        max_position=64,
    )
    folder = save_pretrained(build_causal_lm(cfg, seed=0), plain, tmp_path / "m")
    tok = load_tokenizer(folder)
    assert tok.alignflow_added_pad is True
    model = load_causal_lm(folder, tokenizer=tok)
    assert model.get_input_embeddings().weight.shape[0] == len(tok) == n_before + 1
    assert model.config.pad_token_id == tok.pad_token_id != tok.eos_token_id
    rm = load_sequence_classifier(folder, tokenizer=tok)
    assert rm.get_input_embeddings().weight.shape[0] == len(tok)
    out = rm(**tok(["ab", "the model"], padding=True, return_tensors="pt")).logits
    assert out.shape == (2, 1)
