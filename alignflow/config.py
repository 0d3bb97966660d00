"""Typed configuration: one pydantic model per stage, set from YAML and `--set`.

A config file is YAML whose top-level keys are the sections below
(``ingest:``, ...). On the command line, ``--set ingest.max_pairs_per_question=5``
overrides one dotted key; the value is read as YAML, so ``5`` is an int,
``true`` a bool and ``[a, b]`` a list. Unknown keys are errors, not ignored:
a typo in a config must not silently train the wrong thing.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from alignflow import stages as stage_registry

DEFAULT_PROMPT_TEMPLATE = "Question: {title}\n\n{body}\n\nAnswer: "


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SplitConfig(_Section):
    """Fractions of questions (never of pairs) per split."""

    train: float = Field(0.90, ge=0, le=1, description="Fraction of questions in the train split.")
    validation: float = Field(0.05, ge=0, le=1, description="Fraction of questions in the validation split.")
    test: float = Field(0.05, ge=0, le=1, description="Fraction of questions in the test split.")
    salt: str = Field(
        "alignflow-split-v1",
        description="Mixed into the hash of `site:question_id`; change it to draw a different, still stable, split.",
    )

    @model_validator(mode="after")
    def _sums_to_one(self) -> "SplitConfig":
        total = self.train + self.validation + self.test
        if abs(total - 1.0) > 1e-9:
            raise ValueError(f"split fractions must add up to 1, got {total}")
        return self


class RedditConfig(_Section):
    """Stanford SHP rules for turning Reddit comment scores into preferences."""

    min_comment_score: int = Field(2, description="Both comments of a pair need at least this score.")
    min_post_score: int = Field(10, description="Only posts (submissions) with at least this score give pairs.")
    min_score_ratio: float = Field(
        2.0, ge=1.0, description="Preferred comment's score divided by the other's must reach this ratio."
    )
    max_pairs_per_post: int = Field(5, ge=1, description="Cap on pairs drawn from one post (deterministic choice).")
    max_comments_per_post: int = Field(
        200, ge=2, description="Only this many highest-scored comments of one post (or replies to one comment) are "
        "paired; the others are counted as `not_considered`. Candidate pairs grow with the square of the comments.")
    drop_op_comments: bool = Field(True, description="Drop comments written by the post's own author.")
    drop_distinguished: bool = Field(True, description="Drop moderator/admin (distinguished) comments.")


class IngestConfig(_Section):
    """Turn upvote dumps into posts, pairs, demos and prompts datasets."""

    format: str = Field(
        "auto", description="Input format: `auto` decides per source from its name and contents; else the name of a "
        "source reader (stackexchange, reddit, pairs, hf; `alignflow ingest --help`)."
    )
    prompt_template: str = Field(
        DEFAULT_PROMPT_TEMPLATE,
        description="Template that turns a question into a prompt; fields `{title}`, `{body}`, `{site}`, `{tags}`. "
        "Every stage uses this one template.",
    )
    score_source: Literal["auto", "votes", "score"] = Field(
        "auto",
        description="Where up-votes come from: `votes` (Votes.xml, VoteTypeId 2), `score` (the post's Score), "
        "or `auto` (Votes.xml when the source has one).",
    )
    min_answers: int = Field(2, ge=2, description="Questions with fewer answers give no pairs.")
    max_pairs_per_question: int = Field(10, ge=1, description="Cap on pairs per question (deterministic choice).")
    pair_seed: int = Field(0, description="Seed of the deterministic choice of pairs when a question has too many.")
    min_demo_pm_score: int = Field(
        1, description="An answer becomes an SFT demonstration only if it is its question's best and scores this much."
    )
    min_text_chars: int = Field(1, ge=1, description="Texts shorter than this (after cleaning) are quarantined.")
    max_text_chars: int = Field(
        20_000, ge=16, description="Texts longer than this (after cleaning) are quarantined as `too_long`."
    )
    on_bad_row: Literal["error", "quarantine"] = Field(
        "error",
        description="A row with a missing or malformed required field: stop with an error naming file, line and "
        "field (`error`), or quarantine it and go on (`quarantine`).",
    )
    default_license: str = Field(
        "unknown", description="Licence recorded for rows whose source does not state one (Reddit, pairs files)."
    )
    max_row_bytes: int = Field(
        16 << 20, ge=1024,
        description="An input row (a dump <row>, a JSON line) longer than this many bytes is quarantined unread "
        "(its first bytes kept): memory stays bounded whatever the input holds.")
    batch_rows: int = Field(5_000, ge=100, description="Most rows per Parquet row group and per contract validation batch.")
    batch_mb: int = Field(
        4, ge=1, description="Most text (MiB of UTF-8) per batch: bounds memory whatever the length of the texts."
    )
    workers: int = Field(
        0, ge=0, description="Processes that read dump tables in parallel (byte ranges cut at row lines); "
        "0 = every core. The datasets are byte-identical whatever the number."
    )
    range_mb: float = Field(8.0, gt=0, description="Size of the byte ranges (MiB) a dump table is cut into.")
    runner: Literal["local", "dask"] = Field(
        "local", description="Where the byte ranges of dump tables are read: `local` (`ingest.workers` processes on "
        "this machine) or `dask` (Prefect's DaskTaskRunner on the Dask cluster of `ingest.address`; needs "
        "`pip install alignflow[dask]`). The datasets are byte-identical either way."
    )
    address: str = Field(
        "", description="Dask scheduler of `ingest.runner=dask`, e.g. `tcp://host:8786`; empty = a cluster started "
        "for the run on this machine (`ingest.workers` processes, one thread each, 127.0.0.1 only, no dashboard). "
        "Workers elsewhere must see the SOURCE paths under the same names (a shared filesystem)."
    )
    contract_rows: int = Field(
        200_000, ge=100, description="Most rows per data-contract validation (several row groups checked at once)."
    )
    contract_mb: int = Field(
        0, ge=0, description="Most text (MiB of UTF-8) per data-contract validation; 0 = 12 for a build without "
        "Pushshift input, 8 with it. Larger batches save contract CPU (each validation has a fixed cost: ~15 ms on "
        "this 2-core machine once a suite's metric graphs are built) and cost memory: at 1 GiB of Stack Exchange "
        "input with 2 workers, 8 MiB took ~12.4 contract CPU-s and 12 MiB ~10.5-10.8, the process tree's peak RSS "
        "+25-45 MiB; a Pushshift month of 1 GiB gains nothing from 12 and peaks 20-40 MiB higher (bench/REPORT.md).")
    split: SplitConfig = Field(default_factory=SplitConfig, description="How questions are assigned to splits.")
    reddit_reply_pairs: bool = Field(
        False,
        description="Reddit: also pair sibling replies under one parent comment (SHP rules of `ingest.reddit`), with "
        "the parent comment and its ancestors (and the submission's title and text when its RS_ month is given) as the "
        "prompt. Lets a comment month without its submissions month (RC_ without RS_) give pairs.",
    )
    reddit: RedditConfig = Field(default_factory=RedditConfig, description="Rules for Reddit dumps.")


class GenerateConfig(_Section):
    """Synthetic Stack Exchange dump with a planted preference rule."""

    questions: int = Field(200, ge=1, description="Number of questions in the generated dump.")
    seed: int = Field(0, description="Seed; the same seed gives byte-identical files.")
    site: str = Field("synthetic.stackexchange.com", description="Site name written into the dump folder name.")
    generic_questions: int = Field(0, ge=0, description="Questions of a second, generic dump (another site, seed "
                                   "and key-term pool) for preference-model pretraining; 0 = none.")
    generic_site: str = Field("generic.stackexchange.com", description="Site name of the generic dump.")


class ModelConfig(_Section):
    """Which network a stage starts from."""

    name_or_path: str | None = Field(
        None,
        description="Hugging Face model id or local folder for from_pretrained; empty = build the small default "
        "architecture from `arch` (the offline default), or take the previous stage's registered model.",
    )
    arch: Literal["tiny-gpt2", "small-gpt2", "tiny-llama", "small-llama", "gpt2-125m", "llama-350m"] = Field(
        "tiny-gpt2", description="Architecture built from a config when no pretrained model is named."
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the hub/folder to run (off: safer).")
    vocab_size: int = Field(4096, ge=260, description="BPE vocabulary size when alignflow trains the tokenizer.")
    max_length: int = Field(256, ge=16, description="Longest sequence in tokens (prompt + response); longer is cut.")


class TrainConfig(_Section):
    """The training loop every stage shares."""

    max_steps: int = Field(200, ge=1, description="Optimizer steps to run.")
    batch_size: int = Field(8, ge=1, description="Examples per micro-batch per process.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (not applied to biases and norms).")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    adam_beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2.")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    warmup_steps: int = Field(10, ge=0, description="Linear warm-up steps from 0 to `lr`.")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warm-up.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final lr as a fraction of `lr` (cosine/linear).")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm (0 = off).")
    seed: int = Field(0, description="Seed of weights init, data order and dropout.")
    eval_every: int = Field(50, ge=1, description="Evaluate every N optimizer steps (and at the end).")
    eval_batches: int = Field(20, ge=1, description="At most this many micro-batches per evaluation.")
    checkpoint_every: int = Field(50, ge=1, description="Write a full, resumable checkpoint every N steps.")
    keep_checkpoints: int = Field(2, ge=1, description="How many most recent checkpoints to keep.")
    log_every: int = Field(10, ge=1, description="Log training metrics every N steps.")
    mixed_precision: Literal["auto", "no", "bf16"] = Field(
        "auto", description="`auto`: bf16 autocast on a GPU that supports it, full precision on CPU."
    )
    group_by_length: bool = Field(True, description="Batch examples of similar length (less padding).")
    compile: bool = Field(False, description="torch.compile the model (GPU).")


class BaseStageConfig(_Section):
    """Stage `base`: the language model every later stage starts from."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="Pretrained model to register, or the "
                               "small architecture to pretrain.")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(max_steps=300, lr=2e-3),
                               description="Pretraining loop (used only when no pretrained model is named).")
    text_sources: list[Literal["questions", "answers", "threads"]] = Field(
        default_factory=lambda: ["questions", "answers"], description="Which post texts to pretrain on "
        "(threads: each answer after its question, one document)."
    )
    max_documents: int | None = Field(None, ge=1, description="Cap on documents read from posts (None = all).")


class SftStageConfig(_Section):
    """Stage `sft`: the base LM fine-tuned on demonstrations, loss on response tokens only."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="Start model; empty = `alignflow-base`.")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(max_steps=200, lr=1e-3),
                               description="Fine-tuning loop.")
    generation_prompts: int = Field(4, ge=0, description="Validation prompts whose greedy answers are logged.")
    max_new_tokens: int = Field(64, ge=1, description="Length of the logged generations.")


class PairSourceConfig(_Section):
    """One source of the PMP mixture: the pairs of one site (or all sites) of an ingested dataset, with a weight."""

    site: str = Field("*", description="Site name as in the pairs' `site` column (e.g. `conlang.meta.stackexchange."
                      "com`, `reddit/askscience`); `*` = every site not named by another source.")
    weight: float = Field(1.0, gt=0, description="Mixture weight: this source's share of the PMP training pairs is "
                          "weight / sum of weights.")
    data: str | None = Field(None, description="Ingest output folder (holding pairs.parquet) or a pairs file; empty "
                             "= the work directory's latest ingest.")


class PmpStageConfig(_Section):
    """Stage `pmp`: preference-model pretraining on a large, generic mixture of pairs (Askell et al. 2021)."""

    enabled: bool = Field(True, description="Off: `pm` starts from the base LM (no PMP).")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Start model; empty = `alignflow-base`.")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(max_steps=200, lr=1e-3, batch_size=16),
                               description="Training loop; `batch_size` counts pairs per micro-batch.")
    sources: list[PairSourceConfig] = Field(
        default_factory=lambda: [PairSourceConfig()],
        description="The mixture: pair sources with weights (several sites / Reddit subreddits).",
    )
    max_pairs: int | None = Field(None, ge=1, description="Size of the drawn training mixture (None = every pair "
                                  "of the sources, each source drawn to its weight's share of that total).")
    binarize: bool = Field(False, description="Train on the PMP paper's binarised comparisons (GOOD:/BAD: prefixes) "
                           "instead of the ranked pairs.")
    group_by_question: bool = Field(True, description="Keep all pairs of one question in one batch (InstructGPT).")
    use_margin: bool = Field(False, description="Subtract the pairs' score-gap margin inside the sigmoid.")
    centering: float = Field(0.0, ge=0, description="Weight of the centring term mean((r_c + r_r)^2).")
    eval_pairs: int = Field(512, ge=0, description="Held-out pairs scored by the final evaluation.")


class PmStageConfig(_Section):
    """Stage `pm`: the reward model fine-tuned on a small, task-specific pair set."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="Start model; empty = `alignflow-pmp` when "
                               "`pmp.enabled`, else `alignflow-base`.")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(max_steps=200, lr=5e-4, batch_size=16),
                               description="Training loop; `batch_size` counts pairs per micro-batch.")
    site: str | None = Field(None, description="Task site: only its pairs are used (empty = every site).")
    pairs_file: str | None = Field(None, description="A user's prompt/chosen/rejected file (JSONL or Parquet) "
                                   "instead of the ingested pairs; split by question like the ingest does.")
    max_train_pairs: int | None = Field(None, ge=1, description="Use at most this many training pairs (a seeded "
                                        "draw of whole questions).")
    mismatched_pairs: float = Field(0.0, ge=0, le=4, description="Extra training pairs per drawn pair: a question's "
                                    "best answer preferred over another question's best answer, under its prompt "
                                    "(hard negatives: fluent, on topic, wrong in what they refer to). 0 = none.")
    mismatched_donors: Literal["random", "nearest"] = Field(
        "random", description="Which other questions' best answers the mismatched pairs take: `random` (seeded) "
        "or `nearest` (the most similar by word overlap: near-duplicates that differ in a few words).")
    use_margin: bool = Field(False, description="Subtract a margin from the score gap inside the sigmoid "
                             "(the pairs' `margin` column).")
    centering: float = Field(0.0, ge=0, description="Weight of the centring term mean((r_c + r_r)^2).")
    normalize_on_demos: bool = Field(True, description="After training, set the bias so that the validation demos "
                                     "score 0 on average.")
    eval_pairs: int = Field(1024, ge=0, description="Held-out pairs scored by the final evaluation.")
    worst_pairs: int = Field(20, ge=0, description="Rows of the worst-ranked-pairs table.")


class PmpTransferConfig(_Section):
    """Flow `pmp-transfer`: reward-model accuracy vs number of task pairs, from PMP and from the base LM."""

    sizes: list[int] = Field(default_factory=lambda: [64, 256, 1024, 0], description="Task-pair counts N "
                             "(0 = all training pairs).")
    seeds: list[int] = Field(default_factory=lambda: [0], description="One fine-tune per (start, N, seed).")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(max_steps=100, lr=5e-4, batch_size=16,
                                                                   eval_every=10**6, checkpoint_every=10**6),
                               description="The same loop for every fine-tune (same steps whatever N).")
    eval_pairs: int = Field(512, ge=1, description="Held-out task pairs each fine-tune is scored on.")


class PpoStageConfig(_Section):
    """Stage `ppo`: the SFT policy optimised against the reward model (the N+ / OAI19 recipe)."""

    policy_model: str | None = Field(None, description="Start policy (HF id or folder); empty = "
                                     "`alignflow-policy-sft@challenger`. The frozen reference is the same weights.")
    reward_model: str | None = Field(None, description="Reward model folder (a *ForSequenceClassification, "
                                     "num_labels=1); empty = `alignflow-reward@challenger`. The critic starts "
                                     "from a copy of it.")
    max_prompt_tokens: int = Field(192, ge=1, description="Prompts longer than this keep their last tokens.")
    max_new_tokens: int = Field(64, ge=1, description="Longest response in tokens (truncated after the first EOS).")
    temperature: float = Field(0.7, gt=0, description="Sampling temperature; logits are divided by it for the "
                               "log-probs of policy, reference and update alike. top_k=0, top_p=1 always.")
    total_steps: int = Field(100, ge=1, description="PPO steps; each samples `batch_size` rollouts and updates on "
                             "them.")
    batch_size: int = Field(64, ge=1, description="Rollouts (prompts) per PPO step.")
    minibatch_size: int = Field(16, ge=1, description="Rollouts per optimizer step; must divide `batch_size`.")
    micro_batch_size: int = Field(8, ge=1, description="Rollouts per forward/backward (gradient accumulation); "
                                  "must divide `minibatch_size`.")
    forward_batch_size: int = Field(32, ge=1, description="Rollouts per no-grad forward (reference, critic, reward) "
                                    "while collecting a batch.")
    ppo_epochs: int = Field(4, ge=1, description="Passes over each batch, reshuffled into minibatches every pass.")
    lr: float = Field(1e-5, gt=0, description="Policy learning rate (Adam), annealed linearly to 0 over the run.")
    critic_lr: float | None = Field(None, gt=0, description="Critic learning rate; empty = `lr`.")
    adam_eps: float = Field(1e-5, gt=0, description="Adam epsilon (1e-5 as in N+/OAI19, not torch's 1e-8).")
    anneal_lr: bool = Field(True, description="Decay both learning rates linearly to 0 at the last step.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm per network (0 = off).")
    gamma: float = Field(1.0, ge=0, le=1, description="GAE discount over response tokens.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    cliprange: float = Field(0.2, gt=0, description="Clip range of the policy ratio (PPO's epsilon).")
    cliprange_value: float = Field(0.2, gt=0, description="Clip range of the new values around the old ones.")
    vf_coef: float = Field(0.1, ge=0, description="Weight of the value loss in the total loss.")
    kl_coef: float = Field(0.05, ge=0, description="beta of the per-token KL penalty (the start value when "
                           "`adaptive_kl`).")
    kl_estimator: Literal["k1", "k3"] = Field("k1", description="Per-token KL estimator inside the reward: k1 = "
                                              "log pi - log pi_ref; k3 = (r - 1) - log r with r = pi_ref / pi.")
    adaptive_kl: bool = Field(False, description="Adapt beta towards `target_kl` with the OAI19 controller.")
    target_kl: float = Field(6.0, gt=0, description="Target KL (sum over a response, nats) of the adaptive "
                             "controller.")
    kl_horizon: int = Field(10_000, ge=1, description="Horizon (in rollouts) of the adaptive controller.")
    missing_eos: Literal["replace", "subtract", "none"] = Field(
        "replace", description="Responses without EOS: `replace` the score by -`missing_eos_penalty` (N+), "
        "`subtract` the penalty from it (TRL), or `none`.")
    missing_eos_penalty: float = Field(1.0, ge=0, description="Size of the no-EOS penalty.")
    whiten_rewards: bool = Field(False, description="Whiten the per-token rewards (masked) before GAE.")
    ratio_threshold: float = Field(10.0, gt=1, description="Skip (and count) a minibatch whose mean importance "
                                   "ratio exceeds this.")
    negative_kl_tolerance: float = Field(0.05, ge=0, description="Warn when the batch's mean KL falls below "
                                         "minus this (negative KL means the sampler and the log-probs disagree).")
    lora_r: int = Field(0, ge=0, description="LoRA rank of the policy (0 = full fine-tuning). With LoRA the "
                        "reference is the adapter-free base: no second copy of the weights.")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA alpha.")
    lora_target_modules: list[str] | None = Field(None, description="Modules that get LoRA adapters; empty = "
                                                  "peft's default for the architecture.")
    seed: int = Field(0, description="Seed of sampling, prompt order and minibatch shuffles.")
    log_every: int = Field(1, ge=1, description="Log `ppo/*` metrics every N steps.")
    generations_every: int = Field(10, ge=1, description="Log a table of sample generations every N steps.")
    generations_rows: int = Field(4, ge=0, description="Rows of each generations table.")
    eval_prompts: int = Field(64, ge=0, description="Validation prompts of the final evaluation against the SFT "
                              "policy (0 = no evaluation).")
    eval_every: int | None = Field(None, ge=1, description="Also evaluate every N steps (empty = only at the end).")
    checkpoint_every: int = Field(10, ge=1, description="Write a full, resumable checkpoint every N steps.")
    keep_checkpoints: int = Field(2, ge=1, description="How many most recent checkpoints to keep.")
    reward_max_length: int = Field(512, ge=16, description="Longest prompt + response (reward-model tokens) "
                                   "scored; longer prompts are cut from the left.")

    @model_validator(mode="after")
    def _batches_divide(self) -> "PpoStageConfig":
        if self.batch_size % self.minibatch_size:
            raise ValueError(f"minibatch_size {self.minibatch_size} must divide batch_size {self.batch_size}")
        if self.minibatch_size % self.micro_batch_size:
            raise ValueError(f"micro_batch_size {self.micro_batch_size} must divide minibatch_size "
                             f"{self.minibatch_size}")
        return self


class PromoteConfig(_Section):
    """Flow `promote`: the gates that move a registered model's `champion` alias (challenger vs champion,
    same held-out evaluation)."""

    eval_split: Literal["test", "validation"] = Field("test", description="Held-out split the gates evaluate on.")
    eval_pairs: int = Field(256, ge=1, description="Held-out pairs scored for preference models (pmp, reward).")
    eval_prompts: int = Field(32, ge=1, description="Held-out prompts answered by policies (greedy) and scored.")
    eval_texts: int = Field(64, ge=1, description="Held-out texts / demos whose loss gates base and policy-sft.")
    max_new_tokens: int = Field(48, ge=1, description="Length of the policies' answers in the policy gate.")
    max_length: int = Field(256, ge=16, description="Longest sequence (tokens) scored in any gate.")
    batch_size: int = Field(8, ge=1, description="Batch size of the gate evaluations.")
    min_pairwise_accuracy: float = Field(0.5, ge=0, le=1, description="Preference gate: the challenger's held-out "
                                         "pairwise accuracy must reach this.")
    min_accuracy_gain: float = Field(0.0, ge=-1, le=1, description="Preference gate: challenger accuracy - "
                                     "champion accuracy must reach this (negative = a tolerated loss).")
    min_reward_gain: float = Field(0.0, description="Policy gate: challenger mean reward - champion mean reward "
                                   "must reach this.")
    max_kl: float = Field(10.0, ge=0, description="Policy gate: KL(challenger || reference), summed over the "
                          "answer tokens and averaged over prompts, must stay below this.")
    min_win_rate: float = Field(0.5, ge=0, le=1, description="Policy gate: share of prompts where the challenger's "
                                "answer out-scores the champion's (ties 1/2) must reach this.")
    max_loss_increase: float = Field(0.0, ge=0, description="LM gate (base, policy-sft): challenger held-out loss "
                                     "may exceed the champion's by at most this.")
    max_judged_drop: float = Field(0.1, ge=0, le=1, description="Policy gate, where the data has a judge (the "
                                   "planted rule of a generated dump): the share of the challenger's greedy answers "
                                   "the judge accepts may fall below its reference policy's by at most this.")
    models: list[str] = Field(
        default_factory=stage_registry.models,
        description="Registered models the pipeline's promote stage gates, in this order (default: every model "
        "a registered stage produces).")


class PipelineConfig(_Section):
    """Flow `pipeline`: every stage in order as one parent MLflow run."""

    sources: list[str] = Field(default_factory=list, description="Dumps to ingest; empty = generate the synthetic "
                               "dump of `generate` into the work directory.")
    cache: bool = Field(True, description="Skip a stage whose inputs (content digests) and config section match a "
                        "finished earlier run of it.")
    concurrent: bool = Field(False, description="Run the two independent branches (pmp -> pm) and sft side by side "
                             "(worth it with a device per branch; on a small CPU they only compete for cores).")
    stages: list[str] = Field(
        default_factory=stage_registry.default_pipeline_stages,
        description="Stages to run (in pipeline order; `pmp` also follows `pmp.enabled`); default: every "
        "default pipeline stage of the registry (alignflow/stages.py); `pmp-transfer` runs only when named.")

    @field_validator("stages")
    @classmethod
    def _registered(cls, value: list[str]) -> list[str]:
        known = stage_registry.pipeline_stages()
        unknown = [s for s in value if s not in known]
        if unknown:
            raise ValueError(f"unknown stage(s) {', '.join(map(repr, unknown))}; pipeline stages are {', '.join(known)}")
        return value


class AlignflowConfig(_Section):
    """The whole configuration; each stage reads its own section."""

    experiment: str = Field("alignflow/demo", description="MLflow experiment that the runs go to.")
    ingest: IngestConfig = Field(default_factory=IngestConfig, description="The ingest stage.")
    generate: GenerateConfig = Field(default_factory=GenerateConfig, description="The synthetic dump of the demo.")
    base: BaseStageConfig = Field(default_factory=BaseStageConfig, description="The base LM stage.")
    sft: SftStageConfig = Field(default_factory=SftStageConfig, description="The SFT stage.")
    pmp: PmpStageConfig = Field(default_factory=PmpStageConfig, description="Preference-model pretraining.")
    pm: PmStageConfig = Field(default_factory=PmStageConfig, description="The reward-model (fine-tuning) stage.")
    pmp_transfer: PmpTransferConfig = Field(default_factory=PmpTransferConfig,
                                            description="The PMP sample-efficiency experiment.")
    ppo: PpoStageConfig = Field(default_factory=PpoStageConfig, description="The PPO stage.")
    promote: PromoteConfig = Field(default_factory=PromoteConfig, description="Promotion gates.")
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig, description="The whole pipeline.")
    plugins: dict[str, Any] = Field(default_factory=dict, description="Sections of registered stages that bring "
                                    "their own config model (set as top-level sections, read with `section()`).")

    @model_validator(mode="before")
    @classmethod
    def _plugin_sections(cls, data: Any) -> Any:
        """Top-level sections of registered stages with their own ``config_model`` go to ``plugins``, validated."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        plugins = dict(data.get("plugins") or {})
        for stage in stage_registry.REGISTRY.values():
            if stage.config_model is None or not stage.section or stage.section in cls.model_fields:
                continue
            raw = data.pop(stage.section, plugins.get(stage.section, {}))
            try:
                plugins[stage.section] = stage.section_model().model_validate(raw if raw is not None else {})
            except ValidationError as exc:
                raise ValueError("; ".join(f"{'.'.join(map(str, (stage.section, *e['loc'])))}: {e['msg']}"
                                           for e in exc.errors())) from None
        data["plugins"] = plugins
        return data

    def section(self, name: str) -> Any:
        """A config section by name: a field of this model, or a registered stage's own section."""
        if name in type(self).model_fields:
            return getattr(self, name)
        try:
            return self.plugins[name]
        except KeyError:
            raise KeyError(f"no config section {name!r}") from None

    def digest(self, section: str | None = None) -> str:
        """A stable content digest of the config (or one section of it)."""
        data = self.model_dump(mode="json") if section is None else getattr(self, section).model_dump(mode="json")
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


class ConfigError(ValueError):
    """A config file or override that does not validate."""


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: `{key}` is a value, not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``key.sub=value`` and read the value as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. ingest.max_pairs_per_question=5")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # "Q: {title}" reads as a YAML mapping; only an explicit {...} or [...] is a collection.
    if isinstance(value, (dict, list)) and not raw.strip().startswith(("{", "[")):
        value = raw
    return key, value


MAX_CONFIG_BYTES = 1 << 20


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> AlignflowConfig:
    """Read a YAML config (optional), apply dotted overrides, validate."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file not found: {path}")
        if not path.is_file():
            raise ConfigError(f"config {path} is {'a folder' if path.is_dir() else 'not a regular file'}, "
                              "not a YAML file")
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {path.stat().st_size} bytes is not a config (the limit is {MAX_CONFIG_BYTES})")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not a text file (byte {exc.start} is not UTF-8)") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        tree = loaded
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    try:
        return AlignflowConfig.model_validate(tree)
    except ValidationError as exc:
        where = f" in {path}" if path else ""
        lines = [f"invalid config{where}:"]
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"  {loc}: {msg}" if loc else f"  {msg}")
        raise ConfigError("\n".join(lines)) from exc


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (for MLflow params)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out
