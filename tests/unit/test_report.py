"""Tests of fairu.broker.report: coverage.png and report.html."""

import asyncio
import base64
import re
import struct
from html.parser import HTMLParser

import numpy as np
import pytest

from fairu.broker.report import (
    COVERAGE_PNG,
    FIGURE_DPI,
    FIGURE_SIZE_INCHES,
    MAX_PLOTTED_EXPERIMENTS_PER_SET,
    MAX_PLOTTED_SETS,
    REPORT_HTML,
    format_number,
    render_report_html,
    sample_for_plot,
    write_report,
)
from fairu.broker.scoring import pooled_scores

from ..prediction_data import random_predictions

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_predictions(num_sets, experiments, seed=0):
    return random_predictions(np.random.default_rng(seed), num_sets, experiments)


def png_size(data):
    """Return (width, height) from the IHDR chunk, which follows the signature."""
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


class TagCollector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags = []
        self.text = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)

    def handle_data(self, data):
        self.text.append(data)


def parse_html(page):
    collector = TagCollector()
    collector.feed(page)
    collector.close()
    return collector


def test_write_report_files(tmp_path):
    predictions, mu_true = make_predictions(4, 100)
    scores = pooled_scores(predictions, mu_true)

    names = write_report(tmp_path / "report", predictions, mu_true, scores)

    assert names == [COVERAGE_PNG, REPORT_HTML]
    png = (tmp_path / "report" / COVERAGE_PNG).read_bytes()
    assert png_size(png) == (
        int(FIGURE_SIZE_INCHES[0] * FIGURE_DPI),
        int(FIGURE_SIZE_INCHES[1] * FIGURE_DPI),
    )
    page = (tmp_path / "report" / REPORT_HTML).read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert sorted(path.name for path in (tmp_path / "report").iterdir()) == [
        COVERAGE_PNG,
        REPORT_HTML,
    ]


def test_html_contains_scores_and_plot(tmp_path):
    predictions, mu_true = make_predictions(3, 50)
    scores = pooled_scores(predictions, mu_true)

    write_report(tmp_path, predictions, mu_true, scores)

    page = (tmp_path / REPORT_HTML).read_text(encoding="utf-8")
    text = " ".join(parse_html(page).text)
    for name, value in scores.items():
        if not name.startswith("set_"):
            assert name in text
        assert format_number(value) in text, name
    assert "set 2" in text
    embedded = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert embedded is not None
    assert base64.b64decode(embedded.group(1)) == (tmp_path / COVERAGE_PNG).read_bytes()


def test_html_escapes_all_text():
    scores = {"quantiles_score": 1.5, "<b>odd</b>": 2.0}
    details = {"submission <id>": '<script>alert("x")</script>', "site": "a & b"}

    page = render_report_html(
        scores, None, title="<img src=x onerror=alert(1)>", details=details
    )

    parsed = parse_html(page)
    assert "script" not in parsed.tags
    assert "b" not in parsed.tags
    assert parsed.tags.count("img") == 0
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "submission &lt;id&gt;" in page
    assert "a &amp; b" in page
    assert "&lt;b&gt;odd&lt;/b&gt;" in page


def test_html_without_per_set_figures():
    predictions, mu_true = make_predictions(40, 5)
    scores = pooled_scores(predictions, mu_true)

    page = render_report_html(scores, None)

    assert "Per-set figures are computed while at most 32 sets are scored." in page
    assert "set_0." not in page


def test_html_per_set_table_rows():
    predictions, mu_true = make_predictions(5, 20)
    scores = pooled_scores(predictions, mu_true)

    page = render_report_html(scores, None)

    rows = re.findall(r"<tr><td>set (\d+)</td>", page)
    assert rows == ["0", "1", "2", "3", "4"]
    assert format_number(scores["set_3.rmse"]) in page


def test_sample_is_capped_and_ordered():
    predictions, _ = make_predictions(MAX_PLOTTED_SETS + 5, 1000)

    sample = sample_for_plot(predictions)

    assert [set_number for set_number, _ in sample] == list(range(MAX_PLOTTED_SETS))
    for set_number, positions in sample:
        assert len(positions) == MAX_PLOTTED_EXPERIMENTS_PER_SET
        assert len(np.unique(positions)) == len(positions)
        assert np.all(predictions.set[positions] == set_number)
        assert np.all(np.diff(predictions.mu_hat[positions]) >= 0)
    experiments = np.sort(predictions.experiment[sample[0][1]])
    assert experiments[0] == 0
    assert experiments[-1] == 999


def test_sample_of_small_set_takes_all():
    predictions, _ = make_predictions(2, 3)
    shuffled = predictions.take(np.array([5, 0, 3, 1, 4, 2]))

    sample = sample_for_plot(shuffled)

    assert [len(positions) for _, positions in sample] == [3, 3]


def test_report_one_experiment(tmp_path):
    predictions, mu_true = make_predictions(1, 1)
    scores = pooled_scores(predictions, mu_true)

    write_report(tmp_path, predictions, mu_true, scores)

    assert png_size((tmp_path / COVERAGE_PNG).read_bytes())[0] > 0


@pytest.mark.parametrize("num_sets", [1, 40])
async def test_report_in_thread(tmp_path, num_sets):
    predictions, mu_true = make_predictions(num_sets, 30)
    scores = pooled_scores(predictions, mu_true)

    names = await asyncio.gather(
        asyncio.to_thread(write_report, tmp_path / "a", predictions, mu_true, scores),
        asyncio.to_thread(write_report, tmp_path / "b", predictions, mu_true, scores),
    )

    assert names == [[COVERAGE_PNG, REPORT_HTML]] * 2
    first = (tmp_path / "a" / COVERAGE_PNG).read_bytes()
    second = (tmp_path / "b" / COVERAGE_PNG).read_bytes()
    assert first == second


def test_format_number():
    assert format_number(1000000.0) == "1000000"
    assert format_number(0.68271234567891) == "0.6827123457"
    assert format_number(-1.5e-12) == "-1.5e-12"
