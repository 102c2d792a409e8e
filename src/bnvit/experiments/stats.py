"""Numbers from results: per-epoch curves by cell, mean ± std, Student-t intervals and tests (scipy), Holm."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from scipy.stats import nct as noncentral_t
from scipy.stats import t as student_t
from scipy.stats import ttest_1samp

from ..training.history import History

__all__ = [
    "CHANCE",
    "curve",
    "fmt",
    "holm",
    "mean_std",
    "power",
    "seeds_needed",
    "summarize",
    "t_interval",
    "t_test",
]

CHANCE = 0.1  # accuracy credited to a diverged run after it diverged (10 balanced classes)


def curve(result: Mapping[str, Any], epochs: int, column: str = "val_acc") -> list[float]:
    """A cell's per-epoch values, chance level after a divergence, NaN where never measured."""
    history = History.from_dict(result["history"])
    values = [math.nan if v is None else v for v in history.column(column)]
    if history.diverged:
        fill = CHANCE if column.endswith("acc") else math.nan
        values += [fill] * (epochs - len(values))
    return values[:epochs] + [math.nan] * (epochs - len(values))


def summarize(results: Iterable[Mapping[str, Any]], column: str = "val_acc") -> dict[tuple[str, int, float], dict]:
    """Group results by (model, depth, lr): per-epoch curves of `column` for every seed.

    Returns:
        `{(model, depth, lr): {"curves": [...], "results": [...]}}`, one curve and one result per
        seed, in the order of `results`.
    """
    groups: dict[tuple[str, int, float], dict] = defaultdict(lambda: {"curves": [], "results": []})
    results = list(results)
    epochs = max((r["settings"]["epochs"] for r in results), default=0)
    for result in results:
        c = result["cell"]
        group = groups[(c["model"], c["depth"], c["lr"])]
        group["curves"].append(curve(result, epochs, column))
        group["results"].append(result)
    return dict(groups)


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation of the non-NaN values (std `None` for fewer than two)."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def fmt(values: Sequence[float]) -> str:
    """Accuracies (fractions) as percent: `"91.3"` for one value, `"91.3 ± 0.5"` for several."""
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "–"
    return f"{100 * mean:.1f}" + ("" if std is None else f" ± {100 * std:.1f}")


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float] | None:
    """The two-sided Student-t confidence interval for the mean of `values` (`None` for fewer than two)."""
    values = [v for v in values if not math.isnan(v)]
    if len(values) < 2:
        return None
    mean, std = statistics.fmean(values), statistics.stdev(values)
    half = float(student_t.ppf(0.5 + level / 2.0, len(values) - 1)) * std / math.sqrt(len(values))
    return mean - half, mean + half


def t_test(values: Sequence[float], bound: float, alternative: str) -> float:
    """The p-value of the one-sided one-sample t-test of the mean of `values` against `bound`.

    `"greater"` tests H0: mean <= bound; `"less"` the reverse. Fewer than two values: p = 1; no
    spread: the mean decides (p = 0 on the alternative's side, else 1).

    Examples:
        >>> round(t_test([1.0, 2.0, 3.0], 0.0, "greater"), 4)  # t = 3.46 with 2 degrees of freedom
        0.0371
        >>> t_test([1.0, 2.0, 3.0], 0.0, "less") > 0.95
        True
    """
    if alternative not in ("greater", "less"):
        raise ValueError(f"alternative must be 'greater' or 'less', got {alternative!r}")
    values = [v for v in values if not math.isnan(v)]
    if len(values) < 2:
        return 1.0
    mean, std = statistics.fmean(values), statistics.stdev(values)
    sign = 1.0 if alternative == "greater" else -1.0
    if std == 0.0:
        return 0.0 if sign * (mean - bound) > 0 else 1.0
    return float(ttest_1samp(values, bound, alternative=alternative).pvalue)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (same order as given).

    Examples:
        >>> holm([0.01, 0.04, 0.03])
        [0.03, 0.06, 0.06]
    """
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = round(running, 15)  # no float noise in (m - k) * p
    return adjusted


def power(distance: float, std: float, n: int, alpha: float = 0.05) -> float:
    """The power (noncentral t) of a one-sided t-test at `alpha` on `n` values `distance` beyond the bound.

    Examples:
        >>> round(power(distance=1.0, std=1.0, n=8), 2)
        0.82
    """
    if n < 2:
        return 0.0
    critical = student_t.ppf(1.0 - alpha, n - 1)
    return float(noncentral_t.sf(critical, n - 1, distance * math.sqrt(n) / std))


def seeds_needed(
    mean: float, std: float, distance: float, alpha: float = 0.05, target: float = 0.8, limit: int = 10_000
) -> int | None:
    """The fewest values at which a one-sided t-test at `alpha` has power `target`, were the mean and std true.

    `distance` (> 0) is how far the mean lies on the side to be shown; `None` when no count up to
    `limit` would do.

    Examples:
        >>> seeds_needed(mean=1.0, std=1.0, distance=1.0)  # 80% power
        8
    """
    if not distance > 0 or math.isnan(std):
        return None
    if std == 0.0:
        return 2
    n = 2
    while n <= limit:
        if power(distance, std, n, alpha) >= target:
            return n
        n += 1 if n < 100 else max(1, n // 50)
    return None
