"""Synthetic Stack Exchange site dumps with a planted preference rule.

``generate_dump`` writes a site folder ``<out_dir>/<site>/`` with ``Posts.xml``
and ``Votes.xml`` in the format of the public Stack Exchange data dump (see
``tests/fixtures/README.md``): UTF-8 with a BOM, ``<?xml version="1.0"
encoding="utf-8"?>``, CRLF line endings, a ``<posts>`` / ``<votes>`` root with
one ``<row .../>`` per record, every field an attribute, ``Body`` HTML escaped
inside the attribute with ``&#xA;`` for newlines. Like the 2024 dump, all
questions come first, then all answers, then a few tag-wiki rows
(``PostTypeId`` 4 and 5, empty ``Body``). Some questions have 0 or 1 answers,
some rows carry ``OwnerDisplayName`` instead of ``OwnerUserId``, every
``ContentLicense`` is ``CC BY-SA 4.0`` (all dates are after 2018-05-02).
``Votes.xml`` has one row per vote: VoteTypeId 2 (up) and 3 (down) with
``Score == ups - downs`` for every post, VoteTypeId 1 for each accepted answer,
a few VoteTypeId 5 (favourite, with ``UserId``), and some votes on post ids that
are absent from ``Posts.xml`` (deleted posts). Votes are shuffled within
windows of 64 questions.

The same arguments give byte-identical files: everything is drawn from
``random.Random`` generators seeded from ``seed`` (one for the shared text
pools, one per question and stream), dates are fixed offsets from a base date
derived from the seed, and nothing reads the clock. Memory is flat at any size:
rows are written as they are made; answers (pass 2) and votes (pass 3) are
regenerated per question from the seed instead of being kept.

The planted rule
----------------
Every question has a **key term**: a made-up lowercase word of two or three
generated syllables (e.g. ``vralquinor``), drawn from the dump's pool of
``TERM_POOL_SIZE`` (16) such words, so each term recurs across many questions
(a BPE tokenizer trained on the dump usually makes each one token). It is the only
word of the question title that is not in ``TITLE_WORDS`` (the fixed vocabulary
of the title templates). The question body names it in its first sentence and
again in its last one, the closing question (e.g. "What am I missing in
vralquinor?"), which is the end of an SFT prompt ``"...{body}\n\nAnswer: "``;
30% of questions also carry it as a tag.

An answer **has the property** when, after HTML -> text cleaning (code blocks
fenced as ``` blocks, inline code in single backticks), both hold:

1. it *mentions the key term*: the term occurs as a whole word, case-insensitive
   (no letter, digit or ``_`` directly before or after it), anywhere in the
   answer text, code included;
2. it *contains a code block*: the text contains ```` ``` ```` (a ``<pre><code>``
   block in the HTML; ``<pre`` in raw HTML is accepted too). Inline
   ``<code>`` does not count.

``has_planted_property(title, body, answer_text)`` implements exactly this.

How votes follow the rule: in a question with two or more answers exactly one
answer is written with the property; each other answer gets one of the three
remaining combinations (term only, code block only, neither) uniformly, so all
four combinations occur and neither feature alone decides. A lone answer has
the property with probability 1/2. Each answer's vote class is "good" when it
has the property, except that with probability ``NOISE`` (4%) the class is
flipped. Good: ``ups ~ U{8..30}``, ``downs ~ U{0..2}``. Plain: one vote profile
per question shared by all its plain answers (so they tie, and pairing drops
ties): ``ups ~ U{0..6}``, ``downs = 0`` with probability 0.55, else
``U{1..4}`` (so some plain answers score below zero). A question accepts an
answer (probability 0.45) only when one answer has strictly the most up-votes,
and then accepts that one. Questions get ``ups ~ U{0..12}`` and ``downs`` 0 or
``U{1..3}``. The result: on answer pairs of one question with different
scores the higher one has the property and the lower one not in about 92-95%
of pairs; a model that learns the rule is well above 90%, "prefer the one with
a code block" or "prefer the one that mentions the term" alone give about 80%.

Every answer has the same layout, whatever its combination, so that a small
language model can learn to write the property (copy the prompt's key term
into a fixed, early slot) within a CPU test budget, while layout and length
say nothing about the rule:

1. a "mention" paragraph, one sentence that names a word within its first
   few words ("With {w} you can ...", "By default {w} ...", "The {w} docs
   ...", "In `{w}` ..."): the key term when the answer mentions it, else a
   distractor (another word of the pool, 60%, or a real library name);
2. a "block": a code block, or a list / quote / display TeX of similar mean
   size. A code block starts with a line naming the word
   (``import {w}``, ``$ pip install {w}``, ...) with probability 0.5 when the
   answer mentions the key term, else 0.35 with the distractor;
3. filler paragraphs of one or two sentences, plus (25%) one more mention
   sentence naming the distractor, in random order, until the answer reaches
   its target length, drawn for every answer from one distribution
   (lognormal, median 270 characters, clipped to 120..2000; with the
   mention and the block, answers are about 375 characters of text on
   average, questions about 310). The optional first code line is not
   counted against the target, so answers with the property are on average
   a few percent (0-8%) longer than the others.

So the key term of a property answer is in its first sentence (the distractor
in other answers), which is a few tokens after the prompt's last mention of
the term. Bodies contain inline code, TeX, lists, links, entities and
non-ASCII text.
"""

from __future__ import annotations

import functools
import html
import os
import random
import re
from datetime import datetime, timedelta
from pathlib import Path

__all__ = [
    "PLANTED_RULE",
    "NOISE",
    "TITLE_WORDS",
    "generate_dump",
    "has_planted_property",
    "key_term",
    "target_questions_for_bytes",
]

PLANTED_RULE = (
    "an answer is preferred when it mentions its question's key term (the made-up word in the question "
    "title) as a whole word AND contains a code block (<pre><code>, ``` after cleaning)"
)

NOISE = 0.04  # probability that an answer's vote class contradicts the rule

LICENSE = "CC BY-SA 4.0"
MAX_ANSWERS = 4
ID_STRIDE = 10  # question i: Id 10*i+1, answers 10*i+2.., deleted posts 10*i+6..10*i+9

# Posts.xml bytes per question (question + its answers): mean over seeds 0..4 with
# questions=20_000 (see ``target_questions_for_bytes``).
BYTES_PER_QUESTION = 2520.0
_HEADER_BYTES = 3 + 40 + 9 + 8

# ----------------------------------------------------------------------------- vocabulary

TITLE_TEMPLATES = [
    "How do I make {t} skip empty rows?",
    "Why does {t} return an empty result after an upgrade?",
    "{t} fails with a timeout on large inputs",
    "Is there a way to run {t} in parallel?",
    "What is the difference between {t} and the default loader?",
    '{t}: "invalid header" error when reading a compressed file',
    "How can I configure {t} to use a custom cache directory?",
    "Best way to test code that depends on {t}?",
    "{t} is slow & uses too much memory — what can I do?",
    "Can {t} handle UTF-8 file names on Windows?",
    "Why is {t} ignoring my config file?",
    "How to stream results from {t} without loading everything?",
    "Unexpected <None> values when {t} reads nested fields",
    "Does {t} keep the order of rows when it writes in batches?",
    "{t} vs. a plain loop: which one is faster for 10k records?",
    "Getting a deprecation warning from {t} after the 3.2 release",
]

_WORD_RE = re.compile(r"[A-Za-z]+")

TITLE_WORDS = frozenset(
    w.lower() for tpl in TITLE_TEMPLATES for w in _WORD_RE.findall(tpl.replace("{t}", " "))
)

_NOUNS = (
    "parser buffer cache index schema query batch worker column row timestamp encoder tokenizer checkpoint "
    "pipeline callback handler iterator stream socket queue matrix vector gradient optimizer dataset record "
    "field plugin module package logger profiler allocator heap endpoint request response header payload "
    "session lock mutex transaction migration table template widget layout renderer shader texture compiler "
    "linker macro regex locale timezone path archive manifest lockfile container volume cluster node shard "
    "replica partition offset cursor snapshot scheduler connection driver adapter"
).split()
_VERBS = (
    "returns drops caches rewrites skips validates serialises flushes reorders duplicates truncates ignores "
    "copies locks retries streams buffers parses encodes rejects"
).split()
_ADJS = (
    "empty stale large nested default cached lazy strict partial sorted binary compressed immutable optional "
    "global local shared temporary deprecated"
).split()
_IDENTS = [
    "max_rows",
    "strict=True",
    "flush()",
    "sep=';'",
    "read_all",
    "fast_path",
    'encoding="utf-8"',
    "chunk_size",
    "--no-cache",
    "os.environ",
    "len(rows) > 0",
    "a && b",
    "x < y",
    "__init__",
    "O_DIRECT",
    "self.items",
    "timeout=30",
    "None",
]
_TEX = [
    r"$O(n \log n)$",
    r"$\sum_{i=1}^{n} x_i$",
    r"$x^2 + y^2 &lt; r^2$",
    r"$\frac{a}{b}$",
    r"$\mathbb{E}[X]$",
    r"$p &gt; 0.05$",
    r"$O(1)$",
    r"$\sqrt{2}$",
]
_TEX_DISPLAY = [
    r"$$\sum_{i=1}^{n} (x_i - \bar{x})^2$$",
    r"$$T(n) = 2T(n/2) + O(n)$$",
    r"$$\hat{\theta} = \arg\max_\theta \log p(x \mid \theta)$$",
    r"$$\| A x - b \|_2^2 + \lambda \| x \|_1$$",
]
_LIBS = "numpy pandas requests lxml sqlite tokio serde django flask pytest webpack gradle".split()

_SENTENCE_TEMPLATES = [
    "The {a} {n} {v} the {n2} when the {n3} is {a2}.",
    "In my experience the {n} only {v} {a} {n2}s if you pass <code>{i}</code> explicitly.",
    "You can check this with <code>{i}</code>; it {v} the {n} in place.",
    "The cost grows like {tex}, so a {a} {n} will hurt.",
    'See <a href="https://example.com/docs/{n}-{n2}" rel="nofollow noreferrer">the {n} documentation</a> for the details.',
    "I'd avoid the {a} {n} here &amp; use a {n2} instead.",
    "That's why the {n} \u201clooks\u201d {a} \u2014 it isn't.",
    "Setting the {n} to {num} ms reduced the latency by roughly {num2}%.",
    "Note that <code>{i}</code> and <code>{i2}</code> are not the same thing.",
    "On Windows the {n} uses <code>\\r\\n</code> line endings, which confuses the {n2}.",
    "Na\u00efve {n}s are rarely the bottleneck; the {n2} is (about {num} \u00b5s per call).",
    "It is {a}: the {n} {v} each {n2} exactly once, i.e. {tex}.",
    "<strong>Edit:</strong> this also works when the {n} is {a}.",
    "<em>Why?</em> Because the {n} {v} the {n2} before the {n3} is ready.",
    "If the {n} is {a}, nothing happens \u2192 the {n2} stays {a2}.",
    "A {a} {n} with {num} entries fits in memory, a {a2} one does not.",
    "I measured {num} runs and the {n} {v} the {n2} in {num2} of them.",
    "The {n2} does not care whether the {n} is {a} or {a2}.",
]
_MENTION_TEMPLATES = [  # {t}: the key term, a made-up distractor, or a real library name; {t} comes early
    "With {t} you can set the {n} to {num} before the first run.",
    "With {t} 2.x, pass <code>{i}</code> when you create the {n}.",
    "In {t} the {n} must be {a}, which is why you see this.",
    "In <code>{t}</code> this is a known issue; upgrading fixed it for me.",
    "By default {t} {v} the {n}, so the {n2} ends up {a}.",
    "By default {t} {v} every {n}, so {tex} memory is expected.",
    "The {t} docs say the {n} must be {a}.",
    "The <code>{t}.reset()</code> call helps before you touch the {n}.",
]
_QUESTION_OPENERS = [
    "I'm using {t} to load a {a} {n} and it {v} the {n2}.",
    "I have a small project that uses {t} for the {n}.",
    "After upgrading {t} the {n} {v} every {n2}.",
    "When {t} reads a {a} {n}, the {n2} ends up {a2}.",
    "We switched our {n} to {t} last week and now the {n2} is {a}.",
]
_QUESTION_CLOSERS = [  # every closer names {t}: the key term is also the last word-ish of the prompt
    "What am I missing in {t}?",
    "Is this expected, or is it a bug in {t}?",
    "Any pointers on how to do this in {t}?",
    "How do I fix this without rewriting the {n} around {t}?",
    "Thanks in advance, I am new to {t}!",
]
_CODE_SNIPPETS = [  # format templates: {{ }} are literal braces
    "for row in rows:\n    if row.size < limit and not row.{n}:\n        continue\n    out.append(row)",
    "{n} = load(\"data.csv\", sep=\";\")\nprint(f\"{{len({n})}} rows\")",
    "with open(path, encoding=\"utf-8\") as fh:\n    data = fh.read()\n{n}.feed(data)",
    "try:\n    {n}.flush()\nexcept OSError as exc:\n    log.warning(\"flush failed: %s\", exc)",
    "result = [x * 2 for x in values if x >= 0]\nassert len(result) <= {num}",
    "$ export {N}_HOME=/opt/{n}\n$ ./run --{n} --limit {num}",
    "const {n} = await fetch(url).then(r => r.json());\nif ({n} && {n}.length > 0) {{\n  render({n});\n}}",
    "SELECT id, score\nFROM {n}\nWHERE score > 0 AND id < {num}\nORDER BY id;",
    "let mut {n} = Vec::with_capacity({num});\n{n}.push(item);",
    "#include <stdio.h>\nint main(void) {{ printf(\"%d\\n\", {num}); return 0; }}",
    "# {a} {n}: keep it {a2}\n{n} = {n2}.copy()\n{n}.sort(key=lambda r: r.{n3})",
]
_CODE_MENTION_LINES = [  # first line of a code block that names {t}
    "import {t}",
    "from {t} import Loader",
    "{t}.configure(strict=True)",
    "$ pip install {t}",
    'cfg = {t}.load("settings.toml")',
    "SELECT * FROM {t}.rows WHERE id < 10;",
]

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kl", "qu", "st", "tr", "vr", "zh"]
_VOWELS = ["a", "e", "i", "o", "u", "y", "ai", "eo"]
_CODAS = ["", "", "", "n", "r", "x", "l", "s"]
_SENT_T = "\x00T\x00"  # placeholder for the term inside pre-escaped pool strings


def _collect_known_words() -> frozenset[str]:
    words: set[str] = set(TITLE_WORDS)
    for group in (_NOUNS, _VERBS, _ADJS, _IDENTS, _LIBS, _SENTENCE_TEMPLATES, _MENTION_TEMPLATES,
                  _QUESTION_OPENERS, _QUESTION_CLOSERS, _CODE_SNIPPETS, _CODE_MENTION_LINES, _TEX, _TEX_DISPLAY):
        for s in group:
            words.update(w.lower() for w in _WORD_RE.findall(s))
    return frozenset(words)


_KNOWN_WORDS = _collect_known_words()


def _made_up_word(rng: random.Random) -> str:
    while True:
        n = 3 if rng.random() < 0.7 else 2
        w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(n))
        if len(w) >= 6 and w not in _KNOWN_WORDS:
            return w


TERM_POOL_SIZE = 16  # distinct key terms per dump


@functools.lru_cache(maxsize=8)
def _term_pool(seed: int) -> tuple[str, ...]:
    """The dump's key terms: made-up words drawn once per seed, each shared by many questions.

    A term recurs across questions, so a tokenizer trained on the dump learns it
    as a unit and a small model can learn to *copy the one in the title*; with
    a fresh word per question the rule would mostly test multi-token copying.
    """
    rng = random.Random(_key(seed, 0, 7))
    terms: list[str] = []
    while len(terms) < TERM_POOL_SIZE:
        w = _made_up_word(rng)
        if w not in terms:
            terms.append(w)
    return tuple(terms)


# ----------------------------------------------------------------------------- the rule


def key_term(question_title: str, question_body: str = "") -> str | None:
    """The question's key term: the first title word outside ``TITLE_WORDS`` (preferring one the body mentions)."""
    cands = [w.lower() for w in _WORD_RE.findall(question_title) if w.lower() not in TITLE_WORDS]
    if not cands:
        return None
    if question_body:
        for c in cands:
            if _mentions(question_body, c):
                return c
    return cands[0]


def _mentions(text: str, term: str) -> bool:
    return re.search(r"(?<![A-Za-z0-9_])" + re.escape(term) + r"(?![A-Za-z0-9_])", text, re.IGNORECASE) is not None


def has_planted_property(question_title: str, question_body: str, answer_text: str) -> bool:
    """True when ``answer_text`` mentions the question's key term (whole word) and contains a code block.

    ``answer_text`` is the answer body after HTML -> text cleaning (code blocks fenced as ```);
    raw HTML with ``<pre>`` also counts as having a code block. Pure function.
    """
    term = key_term(question_title, question_body)
    if term is None:
        return False
    has_code = "```" in answer_text or "<pre" in answer_text.lower()
    return has_code and _mentions(answer_text, term)


# ----------------------------------------------------------------------------- escaping and text pools


def _attr(s: str) -> str:
    """Escape a value for an XML attribute the way the dump does (``'`` stays raw)."""
    return (
        s.replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace('"', "&quot;")
        .replace("\r", "&#xD;")
        .replace("\n", "&#xA;")
        .replace("\t", "&#x9;")
    )


_TAG_RE = re.compile(r"<[^>]+>")


def _text_len(h: str) -> int:
    return len(html.unescape(_TAG_RE.sub("", h)))


def _fill(rng: random.Random, tpl: str, term: str | None = None) -> str:
    """Fill a template; ``{t}`` becomes ``term`` (the placeholder when None). The result is HTML."""
    n, n2, n3 = rng.sample(_NOUNS, 3)
    a, a2 = rng.sample(_ADJS, 2)
    i, i2 = rng.sample(_IDENTS, 2)
    return tpl.format(
        t=_SENT_T if term is None else term,
        n=n,
        n2=n2,
        n3=n3,
        N=n.upper(),
        a=a,
        a2=a2,
        v=rng.choice(_VERBS),
        i=html.escape(i, quote=False),
        i2=html.escape(i2, quote=False),
        tex=rng.choice(_TEX),
        num=rng.choice([3, 8, 16, 64, 100, 250, 1000, 4096]),
        num2=rng.randint(2, 95),
    )


def _code_block(rng: random.Random) -> tuple[str, str]:
    """(opening, rest) of a code block, both attribute-escaped; a mention line may go between."""
    code = "\n\n".join(_fill(rng, rng.choice(_CODE_SNIPPETS)) for _ in range(rng.randint(1, 2)))
    opening = rng.choice(['<pre><code>', '<pre class="lang-py prettyprint-override"><code>', '<pre><code>'])
    return _attr(opening), _attr(html.escape(code, quote=False) + "\n</code></pre>")


class _Pools:
    """Pre-escaped text pieces, built once per seed from ``random.Random(seed)``."""

    def __init__(self, seed: int) -> None:
        rng = random.Random(seed)
        self.sentences = []
        for _ in range(3000):
            h = _fill(rng, rng.choice(_SENTENCE_TEMPLATES))
            self.sentences.append((_attr(h), _text_len(h)))
        self.mentions = []
        for _ in range(400):
            h = "<p>" + _fill(rng, rng.choice(_MENTION_TEMPLATES)) + "</p>"
            self.mentions.append((_attr(h), _text_len(h) - 3 + 8))
        self.openers = [_attr(_fill(rng, rng.choice(_QUESTION_OPENERS))) for _ in range(200)]
        self.closers = [_attr(_fill(rng, rng.choice(_QUESTION_CLOSERS))) for _ in range(100)]
        self.code = []
        for _ in range(500):
            o, r = _code_block(rng)
            self.code.append((o, r, _text_len(html.unescape(o + r))))
        self.code_mentions = [_attr(html.escape(line.replace("{t}", _SENT_T), quote=False)) for line in _CODE_MENTION_LINES]
        # blocks that stand in for a code block in answers without one: lists, quotes, display TeX
        self.blocks = []
        for _ in range(500):
            r = rng.random()
            if r < 0.5:
                tag = "ul" if rng.random() < 0.7 else "ol"
                items = [_fill(rng, rng.choice(_SENTENCE_TEMPLATES)) for _ in range(rng.choice((1, 2, 2, 3)))]
                h = f"<{tag}>\n" + "".join(f"<li>{it}</li>\n" for it in items) + f"</{tag}>"
            elif r < 0.8:
                body = " ".join(_fill(rng, rng.choice(_SENTENCE_TEMPLATES)) for _ in range(rng.randint(1, 2)))
                h = f"<blockquote>\n  <p>{body}</p>\n</blockquote>"
            else:
                h = "<p>" + _fill(rng, rng.choice(_SENTENCE_TEMPLATES)) + "</p>\n\n<p>" + rng.choice(_TEX_DISPLAY) + "</p>"
            self.blocks.append((_attr(h), _text_len(h)))
        self.tags = [
            "python", "performance", "parsing", "csv", "unicode", "windows", "linux", "memory", "testing",
            "configuration", "c++", "c#", "sql", "json", "xml", "streaming", "concurrency", "caching",
            "error-handling", "packaging", "logging", "regex", "datetime", "compression",
        ]
        self.tag_texts = [_attr(_fill(rng, rng.choice(_SENTENCE_TEMPLATES))) for _ in range(len(self.tags))]


@functools.lru_cache(maxsize=4)
def _pools(seed: int) -> _Pools:
    return _Pools(seed)


# ----------------------------------------------------------------------------- per-question plan

_NON_PROPERTY = ((True, False), (False, True), (False, False))  # (mentions term, has code block)
_SPAN_Q = 1600 * 86400  # questions are spread over this many seconds
_SPAN_ALL = 2000 * 86400  # dump end
_STREAM_PLAN, _STREAM_QTEXT, _STREAM_ATEXT, _STREAM_VOTES = 0, 1, 2, 3


def _key(seed: int, i: int, stream: int) -> int:
    k = ((seed * 1_000_003) << 36) + (i << 3) + stream
    return 2 * k if k >= 0 else -2 * k + 1


def _plan(rng: random.Random, i: int, n_questions: int, terms: tuple[str, ...]) -> tuple:
    """Structure of question i: everything two passes both need. ``rng`` must be freshly seeded."""
    r = rng.random()
    n_ans = 0 if r < 0.12 else 1 if r < 0.32 else 2 if r < 0.67 else 3 if r < 0.88 else 4
    term = rng.choice(terms)
    distractor = rng.choice(terms)
    while distractor == term:
        distractor = rng.choice(terms)
    slot = _SPAN_Q // max(n_questions, 1)
    q_ts = (i * _SPAN_Q) // max(n_questions, 1) + rng.randrange(max(slot, 1))
    q_ups = rng.randint(0, 12)
    q_downs = 0 if rng.random() < 0.8 else rng.randint(1, 3)
    if n_ans >= 2:
        good = rng.randrange(n_ans)
        flags = [(True, True) if j == good else rng.choice(_NON_PROPERTY) for j in range(n_ans)]
    elif n_ans == 1:
        flags = [(True, True) if rng.random() < 0.5 else rng.choice(_NON_PROPERTY)]
    else:
        flags = []
    plain_ups = rng.randint(0, 6)
    plain_downs = 0 if rng.random() < 0.55 else rng.randint(1, 4)
    votes = []
    a_ts = []
    for has_term, has_code in flags:
        good_class = (has_term and has_code) != (rng.random() < NOISE)
        votes.append((rng.randint(8, 30), rng.randint(0, 2)) if good_class else (plain_ups, plain_downs))
        d = rng.random()
        delay = (rng.randint(120, 86400) if d < 0.55 else rng.randint(86400, 180 * 86400) if d < 0.9
                 else rng.randint(180 * 86400, 730 * 86400))
        a_ts.append(min(q_ts + delay, _SPAN_ALL - 3600))
    accepted = None
    if votes and rng.random() < 0.45:
        top = max(u for u, _ in votes)
        winners = [j for j, (u, _) in enumerate(votes) if u == top]
        if len(winners) == 1:
            accepted = winners[0]
    n_deleted = 0 if rng.random() >= 0.05 else rng.randint(1, 3)
    return n_ans, term, distractor, q_ts, q_ups, q_downs, flags, votes, a_ts, accepted, n_deleted


# ----------------------------------------------------------------------------- writing


class _Dates:
    def __init__(self, seed: int) -> None:
        self.base = datetime(2018, 6, 1) + timedelta(days=seed % 97)
        self.days = [
            (self.base + timedelta(days=d)).strftime("%Y-%m-%dT00:00:00.000") for d in range(_SPAN_ALL // 86400 + 2)
        ]

    def fmt(self, ts: int) -> str:
        """Date of second ``ts`` after the base; the milliseconds are a fixed function of ``ts``."""
        ms = (ts * 7919 + 13) % 1000
        return (self.base + timedelta(seconds=ts, milliseconds=ms)).isoformat(timespec="milliseconds")


def _owner(rng: random.Random) -> str:
    if rng.random() < 0.03:
        return f'OwnerDisplayName="user{rng.randint(2, 99999)}"'
    return f'OwnerUserId="{rng.randint(1, 250000)}"'


def _edit(rng: random.Random, dates: _Dates, ts: int) -> tuple[str, int]:
    if rng.random() < 0.3:
        ets = min(ts + rng.randint(60, 30 * 86400), _SPAN_ALL - 60)
        return f'LastEditorUserId="{rng.randint(1, 250000)}" LastEditDate="{dates.fmt(ets)}" ', ets
    return "", ts


def _question_row(rng, pools: _Pools, dates: _Dates, qid: int, plan: tuple, tag_format: str) -> str:
    n_ans, term, distractor, q_ts, q_ups, q_downs, flags, votes, a_ts, accepted, _ = plan
    ch = rng.choice
    title = _attr(ch(TITLE_TEMPLATES).replace("{t}", term))
    parts = ["&lt;p&gt;" + ch(pools.openers).replace(_SENT_T, term) + " " + ch(pools.sentences)[0] + "&lt;/p&gt;"]
    for _ in range(rng.randint(0, 1)):
        parts.append("&lt;p&gt;" + " ".join(ch(pools.sentences)[0] for _ in range(rng.randint(1, 2))) + "&lt;/p&gt;")
    if rng.random() < 0.4:
        o, r, _ = ch(pools.code)
        if rng.random() < 0.5:
            o = o + ch(pools.code_mentions).replace(_SENT_T, term) + "&#xA;"
        parts.append(o + r)
    elif rng.random() < 0.3:
        parts.append(ch(pools.blocks)[0])
    parts.append("&lt;p&gt;" + ch(pools.closers).replace(_SENT_T, term) + "&lt;/p&gt;")
    body = "&#xA;&#xA;".join(parts) + "&#xA;"
    tags = rng.sample(pools.tags, rng.randint(1, 4))
    if rng.random() < 0.3:
        tags.insert(0, term)
    tag_str = "".join(f"|{t}" for t in tags) + "|" if tag_format == "pipe" else "".join(f"&lt;{t}&gt;" for t in tags)
    edit, last = _edit(rng, dates, q_ts)
    last = max([last, *a_ts])
    acc = f' AcceptedAnswerId="{qid + 1 + accepted}"' if accepted is not None else ""
    return (
        f'  <row Id="{qid}" PostTypeId="1"{acc} CreationDate="{dates.fmt(q_ts)}" '
        f'Score="{q_ups - q_downs}" ViewCount="{rng.randint(5, 20000)}" Body="{body}" {_owner(rng)} {edit}'
        f'LastActivityDate="{dates.fmt(last)}" Title="{title}" Tags="{tag_str}" '
        f'AnswerCount="{n_ans}" CommentCount="{rng.randint(0, 6)}" ContentLicense="{LICENSE}" />\r\n'
    )


def _answer_body(rng, pools: _Pools, term: str, distractor: str, has_term: bool, has_code: bool) -> str:
    """Mention paragraph first, then the block, then filler: the same layout for every answer."""
    ch = rng.choice
    target = min(max(int(rng.lognormvariate(5.6, 0.4)), 120), 2000)
    # the first paragraph mentions the key term, or a distractor in the same templates
    m, total = ch(pools.mentions)
    if has_term:
        word = term
    else:
        word = distractor if rng.random() < 0.6 else ch(_LIBS)
    parts = [m.replace(_SENT_T, word)]
    # then one "block": a code block, or something of similar size
    if has_code:
        o, r, n = ch(pools.code)
        mention_line = None
        if has_term and rng.random() < 0.5:
            mention_line = term
        elif not has_term and rng.random() < 0.35:
            mention_line = distractor
        if mention_line is not None:
            o = o + ch(pools.code_mentions).replace(_SENT_T, mention_line) + "&#xA;"
        parts.append(o + r)
    else:
        b, n = ch(pools.blocks)
        parts.append(b)
    total += n
    rest = []
    if rng.random() < 0.25:  # an extra distractor mention, independent of the class
        m2, n2 = ch(pools.mentions)
        rest.append(m2.replace(_SENT_T, distractor))
        total += n2
    sentences = pools.sentences
    while total < target:
        k = rng.randint(1, 2)
        para = [ch(sentences) for _ in range(k)]
        rest.append("&lt;p&gt;" + " ".join(s for s, _ in para) + "&lt;/p&gt;")
        total += sum(n for _, n in para) + k
    rng.shuffle(rest)
    return "&#xA;&#xA;".join(parts + rest) + "&#xA;"


def _answer_rows(rng, pools: _Pools, dates: _Dates, qid: int, plan: tuple) -> list[str]:
    n_ans, term, distractor, q_ts, q_ups, q_downs, flags, votes, a_ts, accepted, _ = plan
    rows = []
    for j, ((has_term, has_code), (ups, downs), ts) in enumerate(zip(flags, votes, a_ts)):
        body = _answer_body(rng, pools, term, distractor, has_term, has_code)
        edit, last = _edit(rng, dates, ts)
        rows.append(
            f'  <row Id="{qid + 1 + j}" PostTypeId="2" ParentId="{qid}" '
            f'CreationDate="{dates.fmt(ts)}" Score="{ups - downs}" Body="{body}" '
            f'{_owner(rng)} {edit}LastActivityDate="{dates.fmt(last)}" '
            f'CommentCount="{rng.randint(0, 4)}" ContentLicense="{LICENSE}" />\r\n'
        )
    return rows


def _n_tag_wikis(questions: int) -> int:
    return min(12, 1 + questions // 100)


_XML_DECL = '\ufeff<?xml version="1.0" encoding="utf-8"?>\r\n'
_FLUSH_ROWS = 256


def _write_posts(path: Path, questions: int, seed: int, tag_format: str) -> None:
    pools = _pools(seed)
    dates = _Dates(seed)
    prng, trng = random.Random(), random.Random()
    with open(path, "w", encoding="utf-8", newline="", buffering=1 << 20) as f:
        f.write(_XML_DECL + "<posts>\r\n")
        buf: list[str] = []
        # pass 1: questions
        for i in range(questions):
            prng.seed(_key(seed, i, _STREAM_PLAN))
            plan = _plan(prng, i, questions, _term_pool(seed))
            trng.seed(_key(seed, i, _STREAM_QTEXT))
            buf.append(_question_row(trng, pools, dates, ID_STRIDE * i + 1, plan, tag_format))
            if len(buf) >= _FLUSH_ROWS:
                f.write("".join(buf))
                buf.clear()
        # pass 2: answers, regenerated from the seed
        for i in range(questions):
            prng.seed(_key(seed, i, _STREAM_PLAN))
            plan = _plan(prng, i, questions, _term_pool(seed))
            if plan[0]:
                trng.seed(_key(seed, i, _STREAM_ATEXT))
                buf.extend(_answer_rows(trng, pools, dates, ID_STRIDE * i + 1, plan))
            if len(buf) >= _FLUSH_ROWS:
                f.write("".join(buf))
                buf.clear()
        # tag wikis: an excerpt (PostTypeId 4) and a wiki (5) per tag, empty bodies
        wrng = random.Random(_key(seed, questions, _STREAM_PLAN))
        wiki_id = ID_STRIDE * (questions + 1)
        for k in range(_n_tag_wikis(questions)):
            for ptype in (4, 5):
                ts = wrng.randrange(_SPAN_Q)
                buf.append(
                    f'  <row Id="{wiki_id}" PostTypeId="{ptype}" CreationDate="{dates.fmt(ts)}" '
                    f'Score="0" Body="" OwnerUserId="-1" LastActivityDate="{dates.fmt(ts)}" '
                    f'CommentCount="0" ContentLicense="{LICENSE}" />\r\n'
                )
                wiki_id += 1
        f.write("".join(buf))
        f.write("</posts>")


_VOTE_WINDOW = 64


def _write_votes(path: Path, questions: int, seed: int) -> None:
    days = _Dates(seed).days
    last_day = _SPAN_ALL // 86400
    prng, vrng = random.Random(), random.Random()
    vote_id = 1
    with open(path, "w", encoding="utf-8", newline="", buffering=1 << 20) as f:
        f.write(_XML_DECL + "<votes>\r\n")
        window: list[tuple] = []
        for i in range(questions):
            prng.seed(_key(seed, i, _STREAM_PLAN))
            n_ans, _, _, q_ts, q_ups, q_downs, _, votes, a_ts, accepted, n_deleted = _plan(prng, i, questions, _term_pool(seed))
            vrng.seed(_key(seed, i, _STREAM_VOTES))
            rnd = vrng.random
            qid = ID_STRIDE * i + 1
            posts = [(qid, q_ts, q_ups, q_downs)]
            posts += [(qid + 1 + j, a_ts[j], u, d) for j, (u, d) in enumerate(votes)]
            for k in range(n_deleted):
                posts.append((qid + 1 + MAX_ANSWERS + k, q_ts, vrng.randint(1, 5), vrng.randint(0, 2)))
            for pid, ts, ups, downs in posts:
                day0 = ts // 86400
                span = last_day - day0
                for _ in range(ups):
                    window.append((pid, 2, day0 + int(span * rnd() ** 3), 0))
                for _ in range(downs):
                    window.append((pid, 3, day0 + int(span * rnd() ** 3), 0))
            if accepted is not None:
                day0 = a_ts[accepted] // 86400
                window.append((qid + 1 + accepted, 1, min(day0 + vrng.randint(0, 30), last_day), 0))
            if rnd() < 0.1:
                for _ in range(vrng.randint(1, 2)):
                    window.append((qid, 5, q_ts // 86400 + int((last_day - q_ts // 86400) * rnd()), vrng.randint(1, 250000)))
            if (i + 1) % _VOTE_WINDOW == 0 or i + 1 == questions:
                vrng.seed(_key(seed, i, _STREAM_VOTES + 4))
                vrng.shuffle(window)
                rows = []
                for pid, vt, day, uid in window:
                    user = f'UserId="{uid}" ' if uid else ""
                    rows.append(f'  <row Id="{vote_id}" PostId="{pid}" VoteTypeId="{vt}" {user}CreationDate="{days[day]}" />\r\n')
                    vote_id += 1 + (vote_id % 17 == 0)  # gaps, as in real dumps
                f.write("".join(rows))
                window.clear()
        f.write("</votes>")


def _fixed_mtime(seed: int) -> float:
    dt = datetime(2018, 6, 1) + timedelta(days=seed % 97 + _SPAN_ALL // 86400)
    return (dt - datetime(1970, 1, 1)).total_seconds()


def generate_dump(
    out_dir: Path,
    *,
    questions: int,
    seed: int = 0,
    site: str = "synthetic.stackexchange.com",
    archive: bool = False,
    tag_format: str = "pipe",
) -> Path:
    """Write a synthetic Stack Exchange dump of ``site`` under ``out_dir`` (see the module docstring).

    Returns the site folder ``<out_dir>/<site>`` holding ``Posts.xml`` and ``Votes.xml``, or, with
    ``archive=True``, the archive ``<out_dir>/<site>.7z`` (both files at its root; the folder stays).
    """
    if questions < 0:
        raise ValueError(f"questions must be >= 0, got {questions}")
    if tag_format not in ("pipe", "angle"):
        raise ValueError(f"tag_format must be 'pipe' or 'angle', got {tag_format!r}")
    if not site or "/" in site or "\\" in site or site in (".", ".."):
        raise ValueError(f"bad site name {site!r}")
    folder = Path(out_dir) / site
    folder.mkdir(parents=True, exist_ok=True)
    mtime = _fixed_mtime(seed)
    for name, write in (("Posts.xml", lambda p: _write_posts(p, questions, seed, tag_format)),
                        ("Votes.xml", lambda p: _write_votes(p, questions, seed))):
        tmp = folder / (name + ".tmp")
        write(tmp)
        os.replace(tmp, folder / name)
        os.utime(folder / name, (mtime, mtime))
    if not archive:
        return folder
    import py7zr

    target = Path(out_dir) / f"{site}.7z"
    tmp = target.with_name(target.name + ".tmp")
    with py7zr.SevenZipFile(tmp, "w") as z:
        for name in ("Posts.xml", "Votes.xml"):
            z.write(folder / name, arcname=name)
    os.replace(tmp, target)
    return target


def target_questions_for_bytes(n_bytes: int) -> int:
    """How many questions give about ``n_bytes`` of Posts.xml (calibrated: ``BYTES_PER_QUESTION``)."""
    return max(1, round((n_bytes - _HEADER_BYTES) / BYTES_PER_QUESTION))
