"""The statistics of the evals: AUROC (weighted, for bootstrap resamples given as counts),
cluster-bootstrap resampling and its 95 % percentile interval.

The probe (`dinox.eval.probe`) scores every source on the same resamples, so a lead of a
checkpoint over a baseline gets a paired interval; the retrieval eval (`dinox.eval.runner`)
uses the same resampling for the ratio of two hit counts over view draws.
"""
from __future__ import annotations

import math

import numpy as np

MIN_BOOTSTRAP_PATIENTS = 5         # fewer test patients: resample the samples instead


def auroc(scores: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray | float:
    """Area under the ROC curve of binary labels y (1 positive) by the Mann-Whitney
    statistic, ties counted half, with optional non-negative sample weights (B, n): one
    AUROC per row (a bootstrap resample given as counts). NaN where a row lacks a class."""
    scores = np.asarray(scores, np.float64)
    y = np.asarray(y).astype(bool)
    single = weights is None
    w = np.ones((1, len(scores))) if single else np.atleast_2d(np.asarray(weights, np.float64))
    order = np.argsort(scores, kind="mergesort")
    s, yy, w = scores[order], y[order], w[:, order]
    if len(s) == 0:
        return math.nan if single else np.full(w.shape[0], math.nan)
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    pos = np.add.reduceat(w * yy, starts, axis=1)
    neg = np.add.reduceat(w * ~yy, starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    num = (pos * (below + 0.5 * neg)).sum(1)
    den = pos.sum(1) * neg.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    return float(out[0]) if single else out


def macro_auroc(proba: np.ndarray, y: np.ndarray, classes, weights: np.ndarray | None = None):
    """Mean one-vs-rest AUROC over the classes (columns of proba, in `classes` order) that
    the test side holds with both positives and negatives. A resample (a row of `weights`)
    that lacks one of those classes scores NaN, as a binary resample with one class does:
    a mean over fewer classes is another quantity, and mixing it into the interval would
    blur the interval of this one."""
    present = [k for k, c in enumerate(classes) if math.isfinite(auroc(proba[:, k], y == c))]
    if not present:
        return math.nan if weights is None else np.full(np.atleast_2d(weights).shape[0], math.nan)
    per = np.stack([np.atleast_1d(auroc(proba[:, k], y == classes[k], weights)) for k in present])
    out = per.mean(axis=0)
    return float(out[0]) if weights is None else out


def bootstrap_weights(groups: np.ndarray, n_boot: int, seed: int) -> tuple[np.ndarray, str]:
    """(n_boot, n) resample counts per sample and the unit resampled: test patients (a
    patient's samples move together) or, with fewer than MIN_BOOTSTRAP_PATIENTS, samples."""
    rng = np.random.default_rng(seed)
    groups = np.asarray(groups)
    if groups.size == 0:
        raise ValueError("no test samples to resample")
    names, inverse = np.unique(groups, return_inverse=True)
    if len(names) >= MIN_BOOTSTRAP_PATIENTS:
        counts = rng.multinomial(len(names), np.full(len(names), 1.0 / len(names)), size=n_boot)
        return counts[:, inverse].astype(np.float64), "test patients"
    n = len(groups)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64), "test samples"


def percentile_interval(values: np.ndarray) -> list[float] | None:
    """The 95 % percentile interval of bootstrap values, the non-finite ones left out."""
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [round(float(lo), 4), round(float(hi), 4)]


def score_with_ci(score_fn, weights: np.ndarray) -> tuple[float, list[float] | None, np.ndarray]:
    """(point AUROC, 95 % percentile interval, the resamples' AUROCs) of score_fn(weights)."""
    point = float(score_fn(None))
    boots = np.asarray(score_fn(weights), np.float64)
    return point, percentile_interval(boots), boots
