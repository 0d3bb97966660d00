"""SFT training throughput: alignflow's ``train_sft`` against TRL's ``SFTTrainer``, same model, data and batches.

Both sides train the same initial ``small-gpt2`` (built once from alignflow's
architecture table and saved with ``save_pretrained``) on the same
demonstrations, tokenized once by alignflow's ``sft_example`` (prompt masked:
loss on the response and the closing EOS only), in the same batches of 8
(alignflow's length-grouped order, fed to TRL through a sequential sampler),
padded per batch to its longest example (<= 256 tokens), no packing, no
padding-free, fp32, on the CPU. See README.md.

    .venv/bin/python bench/sft/run.py            # 5 warm-up + 60 timed steps, 2 rounds
    .venv/bin/python bench/sft/run.py --quick    # 2 + 10 steps, 1 round
    .venv/bin/python bench/sft/run.py --profile  # also cProfile ours
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402  (bench/common.py)

TASK = "sft"


def main() -> None:
    args = common.parse_args(TASK, __doc__)
    import pyarrow as pa
    import pyarrow.parquet as pq

    from alignflow.models import load_tokenizer
    from alignflow.tasks.train.lm import read_demos, sft_example

    assets = common.prepare_assets(args.scratch, questions=args.questions, seed=args.seed, arch=args.arch,
                                   max_length=args.max_length, vocab_size=args.vocab_size)
    tok = load_tokenizer(assets["tokenizer"])
    demos = read_demos(Path(assets["datasets"]) / "demos.parquet", "train")
    kept, examples = [], []
    for row in demos:
        ex = sft_example(tok, row["prompt"], row["response"], args.max_length)
        if ex is not None:
            kept.append(row)
            examples.append(ex)
    n = len(examples) - len(examples) % args.batch_size  # every batch full: TRL's sampler then sees the same batches
    kept, examples = kept[:n], examples[:n]
    # train_sft reads this file: the train split only (no validation rows, so its final evaluation is a no-op).
    demos_path = args.scratch / TASK / "demos-train.parquet"
    demos_path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(kept), demos_path)
    notes = [
        "ours: alignflow.tasks.train.lm.train_sft (train_loop + pad_collate + causal_lm_loss) in a subprocess of "
        "the main venv; TRL: SFTTrainer in a subprocess of bench/.venv-trl",
        "data: the same token ids on both sides (alignflow's sft_example); TRL gets input_ids + completion_mask and "
        "builds labels itself (completion_only_loss=True); the worker checks they equal alignflow's labels",
        "batches: identical (alignflow's LengthGroupedBatches order, TRL train_sampling_strategy='sequential')",
        "no packing, no padding-free on either side; fp32; TRL gradient_checkpointing=False (its default is True)",
        "lr schedule: identical values at every step (warm-up 10 + cosine to 0.1 x lr): the TRL worker overrides "
        "Trainer.create_scheduler with alignflow's lr_multiplier (HF's own cosine_with_min_lr lags it by one step)",
        "optimizer: TRL uses its default (adamw_torch_fused on torch >= 2.8, CPU included); alignflow torch AdamW "
        "(single-tensor on CPU) - same hyper-parameters, weight decay on matrices only on both sides",
    ]
    common.run_comparison(TASK, args, assets, examples, {"demos_path": str(demos_path)}, notes)


if __name__ == "__main__":
    main()
