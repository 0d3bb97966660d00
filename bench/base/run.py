"""Base (causal-LM) training throughput: alignflow's ``train_loop`` + ``causal_lm_loss`` against TRL's
``SFTTrainer`` on plain text, same model, data and batches.

Both sides train the same initial ``small-gpt2`` (built as ``train_base`` builds
it, saved with ``save_pretrained``) on the same documents (question and answer
texts of the train split + EOS, cut into windows of <= 256 tokens by
alignflow's ``document_examples``: no window spans two documents), loss on
every token, in the same batches of 8 (alignflow's length-grouped order, fed to
TRL through a sequential sampler), padded per batch, no packing, no
padding-free, fp32, on the CPU. See README.md.

    .venv/bin/python bench/base/run.py            # 5 warm-up + 60 timed steps, 2 rounds
    .venv/bin/python bench/base/run.py --quick    # 2 + 10 steps, 1 round
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402  (bench/common.py)

TASK = "base"


def main() -> None:
    args = common.parse_args(TASK, __doc__)
    from alignflow.models import load_tokenizer
    from alignflow.tasks.train.lm import document_examples, iter_post_texts

    assets = common.prepare_assets(args.scratch, questions=args.questions, seed=args.seed, arch=args.arch,
                                   max_length=args.max_length, vocab_size=args.vocab_size)
    tok = load_tokenizer(assets["tokenizer"])
    texts = iter_post_texts(Path(assets["datasets"]) / "posts.parquet", kinds=["questions", "answers"], split="train")
    examples = document_examples(tok, texts, args.max_length)
    for ex in examples:  # as train_base does
        ex["labels"] = ex["input_ids"]
    examples = examples[: len(examples) - len(examples) % args.batch_size]  # every batch full
    examples_path = args.scratch / TASK / "examples.jsonl"
    common.write_jsonl(examples_path, examples)
    notes = [
        "ours: alignflow.tasks.train.loop.train_loop with pad_collate + causal_lm_loss (what train_base runs, "
        "minus tokenizer training and evaluation) in a subprocess of the main venv; TRL: SFTTrainer on a "
        "pre-tokenized language-modelling dataset (input_ids only, labels = input_ids) in bench/.venv-trl",
        "data: the same token windows (alignflow's document_examples) in identical batches (alignflow's "
        "LengthGroupedBatches order, TRL train_sampling_strategy='sequential')",
        "no packing, no padding-free on either side; fp32; TRL gradient_checkpointing=False (its default is True)",
        "lr schedule: identical values at every step (warm-up 10 + cosine to 0.1 x lr): the TRL worker overrides "
        "Trainer.create_scheduler with alignflow's lr_multiplier (HF's own cosine_with_min_lr lags it by one step)",
        "loss values: TRL divides by the label count including position 0 of each sequence (its Trainer counts "
        "unshifted labels when model.loss_type is None), so its logged LM loss is ~B/N_tokens (~1%) lower",
        "optimizer: TRL uses its default (adamw_torch_fused on torch >= 2.8, CPU included); alignflow torch AdamW "
        "(single-tensor on CPU) - same hyper-parameters",
    ]
    common.run_comparison(TASK, args, assets, examples, {"examples_path": str(examples_path)}, notes)


if __name__ == "__main__":
    main()
