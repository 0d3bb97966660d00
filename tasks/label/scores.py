"""Elo-scale scores from comparisons: Bradley-Terry maximum likelihood, bootstrap intervals, online Elo.

A comparison is ``(a, b, outcome)`` with ``outcome`` = 1 when ``a`` won, 0 when
``b`` won and 0.5 for a tie, plus a weight and a group (the ranking it came
from). Only differences of scores mean anything: on the Elo scale a difference
``d`` gives ``P(a beats b) = 1 / (1 + 10^(-d / 400))``.

* :func:`fit_bradley_terry`: the maximum-likelihood strengths (logistic
  regression on +-1 indicator features, solved on the sufficient statistics of
  each pair of alternatives), put on the Elo scale and anchored (the mean, or
  one alternative, at ``base``).
* :func:`bootstrap_scores`: resample whole groups (each ranking once) with
  replacement, refit; percentile 95% intervals of every score and of every
  difference (:func:`compare`), ``P(first better)`` and whether two
  alternatives are distinguishable (the difference's interval excludes 0).
* :func:`online_elo`: the sequential update with a K-factor, for comparison
  (it depends on the order of the games; the fit does not).
* :func:`leaderboard`: the bootstrap summary as rows sorted by score.

Pure numpy/scipy; nothing here touches a database, MLflow or Prefect.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize

__all__ = [
    "ELO_SCALE",
    "BootstrapResult",
    "Comparisons",
    "compare",
    "fit_bradley_terry",
    "bootstrap_scores",
    "leaderboard",
    "online_elo",
    "prob_better",
]

#: Elo points per natural-log unit of strength: 400 / ln(10).
ELO_SCALE = 400.0 / math.log(10.0)
DEFAULT_BASE = 1000.0
#: A weak Gaussian prior on the strengths (in natural units, per unit of total comparison weight):
#: keeps the fit finite when one alternative won every comparison, and is negligible otherwise.
DEFAULT_PRIOR = 1e-3


def prob_better(diff_elo: float | np.ndarray) -> float | np.ndarray:
    """P(first beats second) for an Elo difference ``diff_elo`` = score(first) - score(second)."""
    return 1.0 / (1.0 + np.power(10.0, -np.asarray(diff_elo, dtype=float) / 400.0))


@dataclass
class Comparisons:
    """Comparisons as parallel arrays over integer item indices (build with :meth:`from_records`)."""

    items: list[Hashable]
    a: np.ndarray  # index of the first alternative
    b: np.ndarray  # index of the second alternative
    outcome: np.ndarray  # 1: a won, 0: b won, 0.5: tie
    weight: np.ndarray
    group: np.ndarray  # integer group id (one ranking = one group)

    @classmethod
    def from_records(
        cls,
        records: Iterable[tuple],
        items: Sequence[Hashable] | None = None,
    ) -> "Comparisons":
        """From ``(a, b, outcome[, weight[, group]])`` tuples; ``items`` fixes the order (else first seen)."""
        index: dict[Hashable, int] = {}
        order: list[Hashable] = []
        for it in items or ():
            if it not in index:
                index[it] = len(order)
                order.append(it)
        cols: list[list] = [[], [], [], [], []]
        groups: dict[Hashable, int] = {}
        for n, rec in enumerate(records):
            a, b, y = rec[0], rec[1], float(rec[2])
            w = float(rec[3]) if len(rec) > 3 else 1.0
            g = rec[4] if len(rec) > 4 else n
            if y not in (0.0, 0.5, 1.0):
                raise ValueError(f"comparison {n}: outcome must be 1 (first won), 0 (second won) or 0.5, not {y}")
            if a == b:
                raise ValueError(f"comparison {n}: an alternative compared with itself ({a!r})")
            if not (w > 0 and math.isfinite(w)):
                raise ValueError(f"comparison {n}: weight must be positive and finite, not {w}")
            for it in (a, b):
                if it not in index:
                    if items is not None:
                        raise ValueError(f"comparison {n}: {it!r} is not one of the given items")
                    index[it] = len(order)
                    order.append(it)
            cols[0].append(index[a])
            cols[1].append(index[b])
            cols[2].append(y)
            cols[3].append(w)
            cols[4].append(groups.setdefault(g, len(groups)))
        return cls(order, np.asarray(cols[0], dtype=np.int64), np.asarray(cols[1], dtype=np.int64),
                   np.asarray(cols[2], dtype=float), np.asarray(cols[3], dtype=float),
                   np.asarray(cols[4], dtype=np.int64))

    def __len__(self) -> int:
        return len(self.a)

    @property
    def n_groups(self) -> int:
        return int(self.group.max()) + 1 if len(self.group) else 0


def _pair_statistics(c: Comparisons, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sufficient statistics per unordered pair (i < j): total weight and i's weighted wins (ties = 1/2)."""
    lo = np.minimum(c.a, c.b)
    hi = np.maximum(c.a, c.b)
    wins_lo = np.where(c.a == lo, c.outcome, 1.0 - c.outcome) * weight
    m = len(c.items)
    key = lo * m + hi
    uniq, inv = np.unique(key, return_inverse=True)
    n = np.bincount(inv, weights=weight, minlength=len(uniq))
    s = np.bincount(inv, weights=wins_lo, minlength=len(uniq))
    keep = n > 0
    return uniq[keep] // m, uniq[keep] % m, n[keep], s[keep]


def _fit_natural(m: int, i: np.ndarray, j: np.ndarray, n: np.ndarray, s: np.ndarray, prior: float,
                 x0: np.ndarray | None = None) -> np.ndarray:
    """Strengths (natural units, mean 0) maximising the weighted BT likelihood plus a Gaussian prior."""
    lam = prior * max(float(n.sum()), 1.0) / max(m, 1)

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        d = theta[i] - theta[j]
        # -[s log σ(d) + (n - s) log σ(-d)], written stably.
        nll = float(np.sum(n * np.logaddexp(0.0, -d) + (n - s) * d)) + 0.5 * lam * float(theta @ theta)
        p = 0.5 * (1.0 + np.tanh(0.5 * d))  # σ(d)
        g_d = n * p - s  # d nll / d d
        grad = np.bincount(i, weights=g_d, minlength=m) - np.bincount(j, weights=g_d, minlength=m) + lam * theta
        return nll, grad

    res = minimize(objective, np.zeros(m) if x0 is None else x0, jac=True, method="L-BFGS-B",
                   options={"maxiter": 500, "gtol": 1e-9})
    theta = res.x
    return theta - theta.mean()


def _anchor(theta: np.ndarray, items: Sequence[Hashable], anchor: Hashable | None, base: float) -> np.ndarray:
    elo = theta * ELO_SCALE
    if anchor is None:
        return elo - elo.mean(axis=-1, keepdims=True) + base
    if anchor not in items:
        raise ValueError(f"anchor {anchor!r} is not one of the scored alternatives")
    k = list(items).index(anchor)
    return elo - elo[..., k : k + 1] + base


def fit_bradley_terry(c: Comparisons, *, anchor: Hashable | None = None, base: float = DEFAULT_BASE,
                      prior: float = DEFAULT_PRIOR) -> dict[Hashable, float]:
    """Maximum-likelihood Bradley-Terry scores on the Elo scale: ``{item: score}``.

    Anchored so the mean score (or ``anchor``'s score) is ``base``. Alternatives
    never compared keep the anchor level (the prior pulls them to the mean).
    """
    if not len(c):
        raise ValueError("no comparisons to fit")
    i, j, n, s = _pair_statistics(c, c.weight)
    elo = _anchor(_fit_natural(len(c.items), i, j, n, s, prior), c.items, anchor, base)
    return dict(zip(c.items, elo.tolist()))


@dataclass
class BootstrapResult:
    """Point scores and bootstrap draws (rows = rounds, columns = ``items``), all on the Elo scale."""

    items: list[Hashable]
    scores: np.ndarray
    draws: np.ndarray
    level: float = 0.95
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def _q(self, x: np.ndarray) -> tuple[float, float]:
        a = (1.0 - self.level) / 2.0
        lo, hi = np.quantile(x, [a, 1.0 - a])
        return float(lo), float(hi)

    def interval(self, item: Hashable) -> tuple[float, float]:
        return self._q(self.draws[:, self.items.index(item)])

    def diff_interval(self, first: Hashable, second: Hashable) -> tuple[float, float]:
        k, m = self.items.index(first), self.items.index(second)
        return self._q(self.draws[:, k] - self.draws[:, m])


def _pair_index(c: Comparisons) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(pair of each comparison, its i, its j, whether comparison's ``a`` is the pair's i) over unordered pairs."""
    lo = np.minimum(c.a, c.b)
    hi = np.maximum(c.a, c.b)
    m = len(c.items)
    uniq, inv = np.unique(lo * m + hi, return_inverse=True)
    return inv, uniq // m, uniq % m, c.a == lo


def _fit_newton_batch(m: int, i: np.ndarray, j: np.ndarray, n: np.ndarray, s: np.ndarray, prior: float,
                      iters: int = 60) -> np.ndarray:
    """Many fits at once (rows of ``n``/``s`` = rounds) by damped Newton; strengths with mean 0 per row."""
    rounds, n_pairs = n.shape
    e = np.zeros((n_pairs, m))
    e[np.arange(n_pairs), i] = 1.0
    e[np.arange(n_pairs), j] = -1.0
    lam = (prior * np.maximum(n.sum(axis=1), 1.0) / m + 1e-9)[:, None]
    theta = np.zeros((rounds, m))
    eye = np.eye(m)
    for _ in range(iters):
        d = theta @ e.T
        p = 0.5 * (1.0 + np.tanh(0.5 * d))
        grad = (n * p - s) @ e + lam * theta
        h = np.einsum("rp,pa,pb->rab", n * p * (1.0 - p), e, e) + lam[:, :, None] * eye
        step = np.linalg.solve(h, grad[:, :, None])[:, :, 0]
        step = np.clip(step, -2.0, 2.0)  # damping: the log-likelihood is concave, big first steps can overshoot
        theta -= step
        if float(np.abs(step).max()) < 1e-10:
            break
    return theta - theta.mean(axis=1, keepdims=True)


#: Up to this many alternatives the bootstrap refits all rounds at once (Newton, an m x m system per round).
BATCH_FIT_MAX_ITEMS = 40


def bootstrap_scores(c: Comparisons, *, rounds: int = 1000, seed: int = 0, level: float = 0.95,
                     anchor: Hashable | None = None, base: float = DEFAULT_BASE,
                     prior: float = DEFAULT_PRIOR) -> BootstrapResult:
    """Point fit plus ``rounds`` refits on groups resampled with replacement (each ranking stays whole)."""
    if not len(c):
        raise ValueError("no comparisons to fit")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, not {rounds}")
    m = len(c.items)
    i0, j0, n0, s0 = _pair_statistics(c, c.weight)
    theta0 = _fit_natural(m, i0, j0, n0, s0, prior)
    rng = np.random.default_rng(seed)
    g = c.n_groups
    mult = np.stack([np.bincount(rng.integers(0, g, size=g), minlength=g) for _ in range(rounds)]).astype(float)
    if m <= BATCH_FIT_MAX_ITEMS:
        inv, pi, pj, a_is_i = _pair_index(c)
        w = c.weight[None, :] * mult[:, c.group]  # rounds x comparisons
        wins_i = np.where(a_is_i, c.outcome, 1.0 - c.outcome)[None, :] * w
        n = np.zeros((rounds, len(pi)))
        s = np.zeros((rounds, len(pi)))
        np.add.at(n.T, inv, w.T)
        np.add.at(s.T, inv, wins_i.T)
        draws = _fit_newton_batch(m, pi, pj, n, s, prior)
    else:
        draws = np.empty((rounds, m))
        for r in range(rounds):
            i, j, n1, s1 = _pair_statistics(c, c.weight * mult[r, c.group])
            draws[r] = _fit_natural(m, i, j, n1, s1, prior, x0=theta0) if len(n1) else theta0
    counts = np.bincount(np.concatenate([c.a, c.b]), minlength=m).astype(float)
    return BootstrapResult(list(c.items), _anchor(theta0, c.items, anchor, base),
                           _anchor(draws, c.items, anchor, base), level, counts)


def compare(result: BootstrapResult, first: Hashable, second: Hashable) -> dict[str, float | bool]:
    """Difference of two alternatives: estimate, bootstrap interval, P(first better), distinguishable."""
    k, m = result.items.index(first), result.items.index(second)
    diff = float(result.scores[k] - result.scores[m])
    lo, hi = result.diff_interval(first, second)
    return {"diff": diff, "diff_low": lo, "diff_high": hi, "p_first_better": float(prob_better(diff)),
            "distinguishable": bool(lo > 0 or hi < 0)}


def leaderboard(result: BootstrapResult) -> list[dict]:
    """Rows ``rank, item, score, low, high, comparisons, p_better_than_next, distinguishable_from_next``."""
    order = np.argsort(-result.scores, kind="stable")
    rows = []
    for pos, k in enumerate(order):
        item = result.items[k]
        lo, hi = result.interval(item)
        row = {"rank": pos + 1, "item": item, "score": float(result.scores[k]), "low": lo, "high": hi,
               "comparisons": int(result.counts[k]) if len(result.counts) else 0}
        if pos + 1 < len(order):
            nxt = compare(result, item, result.items[order[pos + 1]])
            row["p_better_than_next"] = nxt["p_first_better"]
            row["distinguishable_from_next"] = nxt["distinguishable"]
        rows.append(row)
    return rows


def online_elo(c: Comparisons, *, k_factor: float = 32.0, base: float = DEFAULT_BASE) -> dict[Hashable, float]:
    """The sequential Elo update over the comparisons in their order (weights scale the K-factor)."""
    r = np.full(len(c.items), base)
    for a, b, y, w in zip(c.a, c.b, c.outcome, c.weight):
        expected = float(prob_better(r[a] - r[b]))
        delta = k_factor * w * (y - expected)
        r[a] += delta
        r[b] -= delta
    return dict(zip(c.items, r.tolist()))
