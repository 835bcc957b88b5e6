"""The detailed results of a pooled evaluation: a coverage plot and an HTML report.

`write_report` writes two files into a folder. coverage.png shows, for a capped
sample of experiments of the first sets, each interval [p16, p84] against the true
mu of its set. report.html is self-contained: the score table, the per-set table and
the plot embedded as a data URL, with every text HTML-escaped.

Rendering takes a few hundred milliseconds of CPU and blocks, so code on an event
loop calls `await asyncio.to_thread(write_report, ...)`. The plot is drawn on a
matplotlib Figure with the Agg canvas directly, so pyplot's global state is never
touched and the function can run in several threads at once.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fairu.files import write_atomic

from .predictions import Predictions
from .scoring import MAX_SETS_WITH_PER_SET_SCORES, PER_SET_FIGURES

logger = logging.getLogger(__name__)

COVERAGE_PNG = "coverage.png"
REPORT_HTML = "report.html"

# The plot shows at most this many sets and, evenly spread over the experiment
# indices, at most this many experiments of each.
MAX_PLOTTED_SETS = 16
MAX_PLOTTED_EXPERIMENTS_PER_SET = 40
# 10 x 4.5 inches at 100 dpi: a 1000 x 450 pixel PNG.
FIGURE_SIZE_INCHES = (10.0, 4.5)
FIGURE_DPI = 100

# The order of the global figures in the score table; other names follow sorted.
GLOBAL_SCORES = (
    "quantiles_score",
    "interval",
    "coverage",
    "penalty",
    "rmse",
    "mae",
    "experiments",
)
_PER_SET_NAME = re.compile(r"^set_(\d+)\.([a-z_]+)$")

_STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.75em; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f0f0f0; text-align: left; }
img { max-width: 100%; height: auto; }
"""


def write_report(
    folder: Path,
    predictions: Predictions,
    mu_true: Sequence[float] | np.ndarray,
    scores: Mapping[str, float],
    *,
    title: str = "Evaluation report",
    details: Mapping[str, str] | None = None,
) -> list[str]:
    """Write coverage.png and report.html into `folder` and return their names.

    `scores` is the dict of `pooled_scores`. `details` are extra (label, text)
    rows shown above the scores, such as the evaluation and submission ids. The
    folder is created if missing, and each file is replaced atomically.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    logger.info("writing the report of %d experiments to %s", len(predictions), folder)

    png = render_coverage_png(predictions, mu_true)
    write_atomic(folder / COVERAGE_PNG, png)
    page = render_report_html(scores, png, title=title, details=details)
    write_atomic(folder / REPORT_HTML, page.encode("utf-8"))

    logger.info(
        "wrote %s (%d bytes) and %s to %s", COVERAGE_PNG, len(png), REPORT_HTML, folder
    )
    return [COVERAGE_PNG, REPORT_HTML]


# --- the coverage plot --------------------------------------------------------------


def sample_for_plot(
    predictions: Predictions,
    *,
    max_sets: int = MAX_PLOTTED_SETS,
    max_per_set: int = MAX_PLOTTED_EXPERIMENTS_PER_SET,
) -> list[tuple[int, np.ndarray]]:
    """Pick the records to plot: [(set, record positions)] for the lowest set numbers.

    Within a set the experiments are ordered by index, up to max_per_set of them
    are taken at evenly spaced ranks, and the result is ordered by mu_hat.
    """
    order = np.lexsort((predictions.experiment, predictions.set))
    ordered_sets = predictions.set[order]
    set_numbers, starts, counts = np.unique(
        ordered_sets, return_index=True, return_counts=True
    )
    sample = []
    for set_number, start, count in zip(
        set_numbers[:max_sets].tolist(),
        starts[:max_sets].tolist(),
        counts[:max_sets].tolist(),
    ):
        ranks = np.unique(np.linspace(0, count - 1, min(count, max_per_set)).round())
        positions = order[start + ranks.astype(np.int64)]
        positions = positions[np.argsort(predictions.mu_hat[positions], kind="stable")]
        sample.append((set_number, positions))
    return sample


def render_coverage_png(
    predictions: Predictions, mu_true: Sequence[float] | np.ndarray
) -> bytes:
    """Draw each sampled experiment's [p16, p84] against its set's true mu; return PNG.

    Intervals that contain the true mu are blue, the others orange; the dot is
    mu_hat and the black line the true mu of the set.
    """
    truth_by_set = np.asarray(mu_true, dtype=np.float64)
    figure = Figure(figsize=FIGURE_SIZE_INCHES, dpi=FIGURE_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()

    sample = sample_for_plot(predictions)
    shown = 0
    tick_positions = []
    tick_labels = []
    x_start = 0
    for set_number, positions in sample:
        x = np.arange(x_start, x_start + len(positions))
        low = predictions.p16[positions]
        high = predictions.p84[positions]
        truth = truth_by_set[set_number]
        covered = (low <= truth) & (truth <= high)
        axes.vlines(x[covered], low[covered], high[covered], colors="tab:blue", lw=1.5)
        axes.vlines(
            x[~covered], low[~covered], high[~covered], colors="tab:orange", lw=1.5
        )
        axes.plot(x, predictions.mu_hat[positions], ".", color="0.3", ms=3)
        axes.hlines(truth, x[0] - 0.5, x[-1] + 0.5, colors="black", lw=1)
        tick_positions.append(float(x.mean()))
        tick_labels.append(str(set_number))
        shown += len(positions)
        x_start += len(positions) + 3

    total_sets = len(np.unique(predictions.set)) if len(predictions) else 0
    axes.set_xticks(tick_positions, tick_labels, fontsize=7)
    axes.set_xlabel("set (experiments of each set ordered by mu_hat)")
    axes.set_ylabel("mu")
    axes.set_title(
        f"[p16, p84] of {shown} of {len(predictions)} experiments, "
        f"{len(sample)} of {total_sets} sets",
        fontsize=10,
    )
    axes.plot([], [], color="tab:blue", label="contains the true mu")
    axes.plot([], [], color="tab:orange", label="misses the true mu")
    axes.plot([], [], color="black", label="true mu of the set")
    axes.legend(loc="upper left", fontsize=7)

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=FIGURE_DPI, metadata={"Software": None})
    return buffer.getvalue()


# --- the HTML page ------------------------------------------------------------------


def render_report_html(
    scores: Mapping[str, float],
    png: bytes | None,
    *,
    title: str = "Evaluation report",
    details: Mapping[str, str] | None = None,
) -> str:
    """Return report.html: details, scores and per-set tables, and the embedded plot."""
    global_rows, per_set = _split_scores(scores)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f"<title>{_escape(title)}</title>",
        f"<style>{_STYLE}</style>",
        "</head>",
        "<body>",
        f"<h1>{_escape(title)}</h1>",
    ]
    if details:
        parts.append(_table(["", ""], [[label, text] for label, text in details.items()]))
    parts.append("<h2>Scores</h2>")
    parts.append(
        _table(["score", "value"], [[name, value] for name, value in global_rows])
    )

    parts.append("<h2>Per set</h2>")
    if per_set:
        rows = [
            [f"set {set_number}", *(figures.get(name) for name in PER_SET_FIGURES)]
            for set_number, figures in sorted(per_set.items())
        ]
        parts.append(_table(["set", *PER_SET_FIGURES], rows))
    else:
        parts.append(
            f"<p>Per-set figures are computed while at most "
            f"{MAX_SETS_WITH_PER_SET_SCORES} sets are scored.</p>"
        )

    if png is not None:
        data_url = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        parts.append("<h2>Coverage</h2>")
        parts.append(
            f'<img src="{data_url}" alt="intervals [p16, p84] of sampled '
            'experiments against the true mu of each set">'
        )
    parts.extend(["</body>", "</html>", ""])
    return "\n".join(parts)


def _split_scores(
    scores: Mapping[str, float],
) -> tuple[list[tuple[str, float]], dict[int, dict[str, float]]]:
    per_set: dict[int, dict[str, float]] = {}
    others = []
    for name, value in scores.items():
        match = _PER_SET_NAME.match(name)
        if match and match.group(2) in PER_SET_FIGURES:
            per_set.setdefault(int(match.group(1)), {})[match.group(2)] = value
        elif name not in GLOBAL_SCORES:
            others.append(name)
    rows = [(name, scores[name]) for name in GLOBAL_SCORES if name in scores]
    rows.extend((name, scores[name]) for name in sorted(others))
    return rows, per_set


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["<table>"]
    if any(header):
        cells = "".join(f"<th>{_escape(name)}</th>" for name in header)
        lines.append(f"<tr>{cells}</tr>")
    for row in rows:
        cells = "".join(_cell(value) for value in row)
        lines.append(f"<tr>{cells}</tr>")
    lines.append("</table>")
    return "\n".join(lines)


def _cell(value: object) -> str:
    if value is None:
        return "<td></td>"
    if isinstance(value, float | int) and not isinstance(value, bool):
        return f'<td class="number">{_escape(format_number(value))}</td>'
    return f"<td>{_escape(str(value))}</td>"


def format_number(value: float) -> str:
    """Format a score for the report: integers as such, others with 10 digits."""
    if isinstance(value, int) or (math.isfinite(value) and float(value).is_integer()):
        return str(int(value))
    return f"{value:.10g}"


def _escape(text: str) -> str:
    return html.escape(text, quote=True)

