"""Numba kernels for the exact subset searches of mda and smea, on the n × n Gram.

Both pick, among the k-subsets of the candidate rows, the one minimising a score that can only
grow when a row is added — the diameter (max pairwise squared distance) for mda, the largest
eigenvalue of the scatter matrix Σ_{i∈S} (y_i − ȳ_S)(y_i − ȳ_S)ᵀ for smea (adding y_j to S adds
|S|/(|S|+1) (y_j − ȳ_S)(y_j − ȳ_S)ᵀ ⪰ 0). A partial subset's score is then a lower bound for all
its completions, which makes a depth-first branch and bound exact: a branch is cut as soon as a
lower bound of its completions' scores exceeds the best complete score found so far (or equals
it, once one is found). Besides the partial score, the bound looks ahead: a completion adds the
`need` rows still missing from the candidates left, each candidate q lying reach_q =
max_{i chosen} ‖y_i − y_q‖² from some chosen row, so the completion's squared diameter is at least
the need-th smallest reach_q, and its top eigenvalue at least half of that (a pair's scatter)
and at least its trace / (k − 1), the trace Σ_{pairs} d² / k being at least that of the pairs so
far plus the `need` smallest sums Σ_{i chosen} ‖y_i − y_q‖² of the candidates left.

Subsets are visited in lexicographic order of the candidates, so among exact ties the first
subset in `itertools.combinations` order wins — ByzFL's tie rule (it keeps the first strict
minimum). `bound` starts the search with the score of a good guess (the caller's) without its
subset: a branch equal to it is still explored, so the tie rule is not changed by the guess.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, fastmath=False)
def _top_eigenvalue(gram, chosen, t):  # pragma: no cover - compiled
    """Largest eigenvalue of the scatter of rows chosen[:t]: that of their centred t × t Gram
    P G_S P (P = I − 11ᵀ/t), whose nonzero eigenvalues are the scatter matrix's."""
    sub = np.empty((t, t))
    for a in range(t):
        for b in range(t):
            sub[a, b] = gram[chosen[a], chosen[b]]
    row = np.zeros(t)
    for a in range(t):
        for b in range(t):
            row[a] += sub[a, b]
    total = row.sum() / (t * t)
    for a in range(t):
        for b in range(t):
            sub[a, b] = sub[a, b] - row[a] / t - row[b] / t + total
    return max(np.linalg.eigvalsh(sub)[t - 1], 0.0)


@njit(cache=True, fastmath=False)
def min_subset(gram, dists, candidates, k, bound, spectral):  # pragma: no cover - compiled
    """(best subset as candidate values, its score): the k-subset of `candidates` with the
    smallest diameter (`spectral` False; `dists` are squared distances) or the smallest top
    eigenvalue of its scatter (`spectral` True). Returns an empty subset if none scores ≤ bound.

    For smea every node is first checked against two cheap lower bounds of its top eigenvalue —
    half its squared diameter (the scatter of a pair) and trace/(t − 1) (the scatter has rank
    ≤ t − 1; its trace is Σ_{i<j} d_ij² / t) — and only then pays a t × t eigenvalue problem.
    """
    m = candidates.shape[0]
    best = bound
    found = False
    best_set = np.empty(0, np.int64)
    chosen = np.empty(k, np.int64)
    pos = np.empty(k, np.int64)
    diam = np.zeros(k + 1)
    pairs = np.zeros(k + 1)
    score = np.zeros(k + 1)
    # reach[t, q]: max distance from candidate q to chosen[:t] (the look-ahead bound below)
    reach = np.zeros((k + 1, m))
    ahead = np.empty(m)
    # links[t, q]: Σ of squared distances from candidate q to chosen[:t] (smea's trace bound)
    links = np.zeros((k + 1, m))
    linked = np.empty(m)
    t = 0
    p = 0
    while True:
        if t == k or p > m - (k - t):
            if t == k and (score[k] < best or (not found and score[k] <= best)):
                best = score[k]
                found = True
                best_set = chosen.copy()
            t -= 1
            if t < 0:
                break
            p = pos[t] + 1
            continue
        c = candidates[p]
        nd = diam[t]
        ps = pairs[t]
        for s in range(t):
            dcs = dists[chosen[s], c]
            nd = max(nd, dcs)
            ps += dcs
        if spectral:
            lower = 0.5 * nd
            if t >= 1:
                lower = max(lower, ps / ((t + 1) * t))
        else:
            lower = nd
        if lower > best or (found and lower >= best):
            p += 1
            continue
        need = k - t - 1
        if need > 0:
            # Every completion adds `need` of the candidates after p, and each of them is at
            # least reach away from a chosen row: the need-th smallest reach bounds the score.
            for q in range(p + 1, m):
                dq = dists[c, candidates[q]]
                reach[t + 1, q] = max(reach[t, q], dq)
                ahead[q - p - 1] = reach[t + 1, q]
                links[t + 1, q] = links[t, q] + dq
                linked[q - p - 1] = links[t + 1, q]
            far_ahead = np.sort(ahead[: m - p - 1])[need - 1]
            if spectral:
                # trace = Σ_{pairs in S} d² / k ≥ (pairs so far + the need smallest links) / k,
                # and the scatter has rank ≤ k − 1
                least = np.sort(linked[: m - p - 1])[:need].sum()
                far_ahead = max(0.5 * far_ahead, (ps + least) / (k * (k - 1)))
            if far_ahead > best or (found and far_ahead >= best):
                p += 1
                continue
        chosen[t] = c
        if spectral and t >= 2:
            lower = max(lower, _top_eigenvalue(gram, chosen, t + 1))
            if lower > best or (found and lower >= best):
                p += 1
                continue
        pos[t] = p
        diam[t + 1] = nd
        pairs[t + 1] = ps
        score[t + 1] = lower
        t += 1
        p += 1
    return best_set, best


@njit(cache=True, fastmath=False)
def subset_score(gram, dists, subset, spectral):  # pragma: no cover - compiled
    """The score `min_subset` minimises, of one subset (for the caller's starting bound)."""
    k = subset.shape[0]
    if spectral:
        if k < 2:
            return 0.0
        return _top_eigenvalue(gram, subset, k)
    worst = 0.0
    for a in range(k):
        for b in range(a + 1, k):
            worst = max(worst, dists[subset[a], subset[b]])
    return worst
