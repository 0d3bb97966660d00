"""Column schemas of the datasets that ingest writes (Parquet).

Every dataset is sorted deterministically (see ``SORT_KEYS``) so that the same
inputs and config give byte-identical files and equal digests.

posts      one row per kept question or answer
  site            Stack Exchange site (``conlang.meta.stackexchange.com``) or ``reddit/<subreddit>``
  source          ``stackexchange`` | ``reddit`` | ``pairs``
  post_id         the post's id in its site (string: Reddit ids are base-36)
  kind            ``question`` | ``answer``
  question_id     the question's id (a question's own id for questions)
  title           question title (answers: their question's title)
  body            cleaned text (HTML -> readable text)
  tags            tags joined by ``|`` (questions; empty for answers)
  score           the dump's Score (up minus down votes)
  upvotes         up-votes from Votes.xml, or null when no Votes.xml was read
  accepted        the asker accepted this answer
  pm_score        preference score of an answer (see ``tasks.ingest.scoring``); null for questions
  author          author id (``user:<OwnerUserId>``) or display name (``name:<OwnerDisplayName>``)
  license         the row's ContentLicense (e.g. ``CC BY-SA 4.0``)
  created_at      CreationDate as written in the dump
  split           ``train`` | ``validation`` | ``test`` (by stable hash of site and question id)

pairs      one row per preference pair
  pair_id, prompt, chosen, rejected, chosen_score, rejected_score, margin,
  question_id, site, source, split, chosen_id, rejected_id, chosen_author,
  rejected_author, license

demos      SFT demonstrations: the best answer of a question
  demo_id, prompt, response, question_id, answer_id, site, source, split, pm_score, author, license

prompts    PPO prompts: one per question
  prompt_id, prompt, question_id, site, source, split

quarantine every rejected input row with its reason
  source_file, line, row_id, site, dataset, reason, detail, raw
"""

from __future__ import annotations

import pyarrow as pa

POSTS = pa.schema(
    [
        ("site", pa.string()),
        ("source", pa.string()),
        ("post_id", pa.string()),
        ("kind", pa.string()),
        ("question_id", pa.string()),
        ("title", pa.string()),
        ("body", pa.string()),
        ("tags", pa.string()),
        ("score", pa.int64()),
        ("upvotes", pa.int64()),
        ("accepted", pa.bool_()),
        ("pm_score", pa.int64()),
        ("author", pa.string()),
        ("license", pa.string()),
        ("created_at", pa.string()),
        ("split", pa.string()),
    ]
)

PAIRS = pa.schema(
    [
        ("pair_id", pa.string()),
        ("prompt", pa.string()),
        ("chosen", pa.string()),
        ("rejected", pa.string()),
        ("chosen_score", pa.float64()),
        ("rejected_score", pa.float64()),
        ("margin", pa.float64()),
        ("question_id", pa.string()),
        ("site", pa.string()),
        ("source", pa.string()),
        ("split", pa.string()),
        ("chosen_id", pa.string()),
        ("rejected_id", pa.string()),
        ("chosen_author", pa.string()),
        ("rejected_author", pa.string()),
        ("license", pa.string()),
    ]
)

DEMOS = pa.schema(
    [
        ("demo_id", pa.string()),
        ("prompt", pa.string()),
        ("response", pa.string()),
        ("question_id", pa.string()),
        ("answer_id", pa.string()),
        ("site", pa.string()),
        ("source", pa.string()),
        ("split", pa.string()),
        ("pm_score", pa.int64()),
        ("author", pa.string()),
        ("license", pa.string()),
    ]
)

PROMPTS = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("prompt", pa.string()),
        ("question_id", pa.string()),
        ("site", pa.string()),
        ("source", pa.string()),
        ("split", pa.string()),
    ]
)

QUARANTINE = pa.schema(
    [
        ("source_file", pa.string()),
        ("line", pa.int64()),
        ("row_id", pa.string()),
        ("site", pa.string()),
        ("dataset", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("raw", pa.string()),
    ]
)

SCHEMAS: dict[str, pa.Schema] = {
    "posts": POSTS,
    "pairs": PAIRS,
    "demos": DEMOS,
    "prompts": PROMPTS,
    "quarantine": QUARANTINE,
}

SORT_KEYS: dict[str, list[str]] = {
    "posts": ["site", "question_id", "kind", "post_id"],
    "pairs": ["site", "question_id", "pair_id"],
    "demos": ["site", "question_id", "answer_id"],
    "prompts": ["site", "question_id"],
    "quarantine": ["source_file", "line", "row_id", "reason"],
}
