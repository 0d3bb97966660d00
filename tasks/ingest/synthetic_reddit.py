"""Synthetic Pushshift months: ``RS_<month>.zst`` submissions and ``RC_<month>.zst`` comments.

For benchmarks and tests at any size. Rows carry the key sets of real dumps
(``data-sources.md``): submissions ``id, title, selftext, score, num_comments,
subreddit, created_utc, author, over_18, …``; comments ``id, parent_id
("t3_<post>" top-level, "t1_<comment>" reply), link_id, subreddit,
subreddit_id, author, body, score, ups, created_utc, edited, controversiality,
gilded, distinguished, stickied, retrieved_on, author_flair_*``. Real quirks
appear at fixed rates: ``[deleted]`` / ``[removed]`` bodies and authors,
``&gt;`` / ``&amp;`` entities, ``\\r\\n``, moderators' (distinguished)
comments, replies to comments of another month (missing parents).

Threads are generated in blocks of :data:`BLOCK_THREADS` (fewer for a month
under 4 MB); within a block, all
comments are written in ``created_utc`` order, so threads interleave as in a
real month. Replies pick their parent among the thread's earlier comments, so
sibling replies exist at every depth. Scores are heavy-tailed.

The same ``seed`` and size give byte-identical files (``random.Random`` only,
no clock). Memory is bounded by one block. Compression uses a
``2**window_log`` window (default 2**27, ``zstd --long``'s default; real
Pushshift months use 2**31, whose decoder alone needs up to 2 GiB).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import zstandard

__all__ = ["RedditMonth", "generate_month"]

BLOCK_THREADS = 200
BASE_TS = 1_420_070_400  # 2015-01-01
SUBREDDITS = ("askscience", "AskHistorians", "explainlikeimfive", "cooking", "legaladvice", "askengineers",
              "changemyview", "askculinary", "asksocialscience", "askphilosophy")
WORDS = ("the", "a", "of", "to", "and", "in", "that", "is", "it", "for", "you", "this", "was", "but", "on", "with",
         "as", "have", "not", "be", "are", "they", "at", "what", "can", "would", "just", "think", "like", "more",
         "water", "light", "energy", "because", "actually", "source", "paper", "reason", "answer", "question",
         "temperature", "history", "example", "pressure", "people", "really", "probably", "different", "point",
         "explain", "interesting", "evidence", "theory", "recipe", "butter", "court", "contract", "bridge", "steel")
TITLE_STARTS = ("Why does", "How do", "What happens when", "Is it true that", "ELI5: why does", "Can someone explain")


@dataclass
class RedditMonth:
    rs: Path
    rc: Path
    rs_bytes: int  # uncompressed
    rc_bytes: int
    submissions: int
    comments: int


def _sentence(rng: random.Random, n: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n)]
    return " ".join(words).capitalize() + rng.choice((".", ".", ".", "?", "!"))


def _body(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.03:
        return "[deleted]"
    if roll < 0.045:
        return "[removed]"
    paras = []
    for _ in range(1 + int(rng.expovariate(1.2))):
        paras.append(" ".join(_sentence(rng, rng.randint(5, 22)) for _ in range(rng.randint(1, 4))))
    text = "\n\n".join(paras)
    if rng.random() < 0.15:
        text = "&gt; " + _sentence(rng, 8) + "\n\n" + text
    if rng.random() < 0.1:
        text = text.replace(" and ", " &amp; ", 1)
    if rng.random() < 0.05:
        text = text.replace("\n", "\r\n")
    return text


def _author(rng: random.Random, users: int = 50_000) -> str:
    return "[deleted]" if rng.random() < 0.05 else f"user_{rng.randrange(users):05d}"


def _score(rng: random.Random) -> int:
    return int(2 ** rng.expovariate(0.45)) - (1 if rng.random() < 0.1 else 0)


def _b36(n: int) -> str:
    chars = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = chars[r] + out
        if not n:
            return out


def _thread(rng: random.Random, post_n: int, comment_start: int, t0: int) -> tuple[dict, list[tuple[int, dict]]]:
    sub = rng.choice(SUBREDDITS)
    pid = _b36(36**5 + post_n)
    op = _author(rng)
    n_comments = min(int(rng.expovariate(1 / 18)), 2000)
    title = f"{rng.choice(TITLE_STARTS)} {_sentence(rng, rng.randint(4, 12))[:-1].lower()}?"
    post = {"archived": False, "author": op, "author_flair_css_class": None, "author_flair_text": None,
            "created_utc": t0, "distinguished": None, "domain": f"self.{sub}", "edited": False, "gilded": 0,
            "hidden": False, "id": pid, "is_self": True, "link_flair_css_class": None, "link_flair_text": None,
            "name": f"t3_{pid}", "num_comments": n_comments, "over_18": False,
            "permalink": f"/r/{sub}/comments/{pid}/x/", "retrieved_on": t0 + 3_000_000,
            "score": min(int(2 ** rng.expovariate(0.25)), 1_000_000), "selftext": _body(rng) if rng.random() < 0.6 else "",
            "stickied": False, "subreddit": sub, "subreddit_id": f"t5_{SUBREDDITS.index(sub):05d}", "thumbnail": "self", "title": title,
            "url": f"https://www.reddit.com/r/{sub}/comments/{pid}/x/"}
    post["ups"] = post["score"]
    comments: list[tuple[int, dict]] = []
    times: list[int] = []
    for k in range(n_comments):
        cid = _b36(36**6 + comment_start + k)
        t = t0 + 30 + int(rng.expovariate(1 / 3600)) + k * 7
        if k == 0 or rng.random() < 0.35:
            parent = f"t3_{pid}"
        elif rng.random() < 0.01:
            parent = f"t1_{_b36(36**6 + max(comment_start - 1000, 0) + rng.randrange(500))}"  # another month's
        else:
            j = rng.randrange(len(comments))
            parent = f"t1_{comments[j][1]['id']}"
            t = max(t, times[j] + 1 + int(rng.expovariate(1 / 600)))
        author = op if rng.random() < 0.04 else _author(rng)
        score = _score(rng)
        comments.append((t, {
            "author": author, "author_flair_css_class": None, "author_flair_text": None,
            "body": _body(rng), "controversiality": int(rng.random() < 0.05), "created_utc": t,
            "distinguished": "moderator" if rng.random() < 0.005 else None, "edited": False if rng.random() < 0.9
            else t + 600, "gilded": int(rng.random() < 0.01), "id": cid, "link_id": f"t3_{pid}",
            "parent_id": parent, "retrieved_on": t + 3_000_000, "score": score, "stickied": False,
            "subreddit": sub, "subreddit_id": post["subreddit_id"], "ups": score,
        }))
        times.append(t)
    return post, comments


def generate_month(out_dir: Path, *, rc_bytes: int, seed: int = 0, month: str = "2015-01",
                   window_log: int = 27, level: int = 3) -> RedditMonth:
    """Write ``RS_<month>.zst`` and ``RC_<month>.zst`` into ``out_dir``; stop once the comments'
    uncompressed size reaches ``rc_bytes``. Temp files + rename: never a half-written month."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rs, rc = out_dir / f"RS_{month}.zst", out_dir / f"RC_{month}.zst"
    tmp_rs, tmp_rc = rs.with_name(rs.name + ".tmp"), rc.with_name(rc.name + ".tmp")
    params = zstandard.ZstdCompressionParameters.from_level(level, window_log=window_log, enable_ldm=True)
    rng = random.Random(seed)
    n_posts = n_comments = rs_total = rc_total = 0
    with open(tmp_rs, "wb") as frs, open(tmp_rc, "wb") as frc:
        wrs = zstandard.ZstdCompressor(compression_params=params).stream_writer(frs, closefd=False)
        wrc = zstandard.ZstdCompressor(compression_params=params).stream_writer(frc, closefd=False)
        t0 = BASE_TS
        threads = max(1, min(BLOCK_THREADS, rc_bytes // 20_000))  # a small month: small blocks
        while rc_total < rc_bytes:
            block: list[tuple[int, dict]] = []
            posts = []
            for _ in range(threads):
                t0 += rng.randint(1, 60)
                post, comments = _thread(rng, n_posts, n_comments, t0)
                n_posts += 1
                n_comments += len(comments)
                posts.append(post)
                block.extend(comments)
            data = "".join(json.dumps(p, separators=(",", ":")) + "\n" for p in posts).encode()
            rs_total += len(data)
            wrs.write(data)
            block.sort(key=lambda tc: (tc[0], tc[1]["id"]))
            data = "".join(json.dumps(c, separators=(",", ":")) + "\n" for _, c in block).encode()
            rc_total += len(data)
            wrc.write(data)
        wrs.flush(zstandard.FLUSH_FRAME)
        wrc.flush(zstandard.FLUSH_FRAME)
    tmp_rs.replace(rs)
    tmp_rc.replace(rc)
    return RedditMonth(rs, rc, rs_total, rc_total, n_posts, n_comments)


if __name__ == "__main__":  # python -m alignflow.tasks.ingest.synthetic_reddit OUT_DIR MIB
    import sys

    m = generate_month(Path(sys.argv[1]), rc_bytes=int(float(sys.argv[2]) * (1 << 20)))
    print(m)
