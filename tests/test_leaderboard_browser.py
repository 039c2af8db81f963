"""The leaderboard page in a real browser, as a reader sees it: headless Chromium (Debian ``chromium`` +
``chromium-driver``) through selenium, a 1400 px wide window, the page loaded from ``file://`` with no network.
Checks that the page opens on the reproductions summary, that no table is wider than the window (every verdict in
view without scrolling), that every chart's labels and lines lie inside their SVG boxes (bounding boxes from the
DOM), the rows, and sorting by a header click; for the fixture page and for the committed
``results/leaderboard.html``. Saves a screenshot under the test's tmp dir.

Without Chromium, chromedriver or selenium the test skips on a developer machine but FAILS under CI
(``CI=true``), where ``.ci/run`` installs them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from metabench.report.make import make_leaderboard
from metabench.run.records import write_record
from tests.helpers import make_record, score_pattern, write_fixture

REPO = Path(__file__).resolve().parents[1]
WIDTH = 1400  # the window a new reader opens the page in


def _need(what: str) -> None:
    message = f"{what} not found: apt-get install chromium chromium-driver; pip install selenium"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def _driver():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _need("selenium")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not browser or not driver_path:
        _need("chromium / chromedriver")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", f"--window-size={WIDTH},1000"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver_path), options=options)


@pytest.fixture(scope="module")
def driver():
    browser = _driver()
    browser.set_page_load_timeout(20)
    yield browser
    browser.quit()


def _column(table, index: int) -> list[str]:
    return [row.find_elements("css selector", "td")[index].text for row in
            table.find_elements("css selector", "tbody tr")]


def _fixture_page(root: Path) -> Path:
    """The test fixture plus the shapes that broke the page before: a curve to 18,095 s, a long preset name."""
    write_fixture(root / "records")
    curve = [[2500.0, 700.0, 0.845], [30000.0, 9000.0, 0.965], [60000.0, 18095.0, 0.968]]
    write_record(make_record("r-long", "maml", score_pattern(0.955, 40, 0.01, 5), preset="a-rather-long-preset-name-x",
                             curve=curve), root / "records")
    return make_leaderboard(root / "records", root / "out").paths[2]


# What a reader would see cut or scrolled: the page wider than the window, a table past its right edge, an SVG
# element outside its SVG, a curve outside its plot box. Returns one line per offence.
_LAYOUT_PROBLEMS = """
const tol = 0.5, out = [], W = document.documentElement.clientWidth;
document.querySelectorAll('details').forEach(function(d){ d.open = true; });
if (document.documentElement.scrollWidth > W) out.push('page scrolls: ' + document.documentElement.scrollWidth);
const outside = function(r, b){
  return r.left < b.left - tol || r.right > b.right + tol || r.top < b.top - tol || r.bottom > b.bottom + tol;
};
document.querySelectorAll('table').forEach(function(t){
  const r = t.getBoundingClientRect();
  if (r.right > W + tol) out.push('table ' + t.id + ' ends at ' + r.right + ' > ' + W);
});
document.querySelectorAll('svg').forEach(function(svg, i){
  const box = svg.getBoundingClientRect();
  if (box.right > W + tol) out.push('svg ' + i + ' ends at ' + box.right);
  svg.querySelectorAll('text, rect, line, path, polyline').forEach(function(el){
    if (el.closest('clipPath')) return;
    if (outside(el.getBoundingClientRect(), box)) out.push('svg ' + i + ' ' + el.tagName + ' ' + el.textContent);
  });
  const plot = svg.querySelector('rect.plot');
  if (plot) svg.querySelectorAll('polyline').forEach(function(line){
    if (outside(line.getBoundingClientRect(), plot.getBoundingClientRect())) out.push('svg ' + i + ' curve');
  });
});
return out;
"""


def _check_reader_view(driver, page: Path, shot: Path) -> None:
    driver.get(page.as_uri())
    assert driver.title == "metabench leaderboard"
    assert driver.execute_script("return window.innerWidth") == WIDTH
    # The page opens on the summary: the first table, its first cell row in the first screenful.
    first = driver.find_element("css selector", "table")
    assert first.get_attribute("id") == "summary"
    row = first.find_element("css selector", "tr.cell")
    assert row.rect["y"] + row.rect["height"] < driver.execute_script("return window.innerHeight")
    assert first.find_elements("css selector", "thead th")[-1].text == "verdict / state"
    assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    problems = driver.execute_script(_LAYOUT_PROBLEMS)
    assert problems == []
    # Every verdict column in view: the compared columns come first, the details below.
    for table in driver.find_elements("css selector", "table.lb:not([id$='-details'])"):
        heads = [th.text for th in table.find_elements("css selector", "thead th")]
        assert heads[-2:] == ["verdict", "vs best"], heads
        assert table.find_elements("css selector", "thead th")[-2].rect["x"] < WIDTH


def test_fixture_page_as_a_reader_sees_it(driver, tmp_path: Path) -> None:
    page = _fixture_page(tmp_path)
    _check_reader_view(driver, page, tmp_path / "leaderboard.png")
    assert len(driver.find_elements("css selector", "svg.bars")) == 4  # one per table: 3 ranked, 1 not comparable
    assert len(driver.find_elements("css selector", "svg.curves polyline")) == 3


def test_committed_page_as_a_reader_sees_it(driver, tmp_path: Path) -> None:
    page = REPO / "results" / "leaderboard.html"
    _check_reader_view(driver, page, tmp_path / "committed.png")
    summary = driver.find_element("id", "summary")
    flagship = [r.text for r in summary.find_elements("css selector", "tr.cell")
                if r.text.startswith("Table 1, “MAML” omniglot-5w1s conv4")]
    assert flagship and flagship[0].endswith("reproduced")


def test_page_sorts(driver, tmp_path: Path) -> None:
    write_fixture(tmp_path / "records")
    driver.get(make_leaderboard(tmp_path / "records", tmp_path / "out").paths[2].as_uri())
    table = driver.find_element("id", "t-omniglot-5w1s--transductive-1-query-class")
    # 3 ranked rows + 3 paper-only rows, best first; bold rows are the best and the tied one.
    unknown = "(paper; split unknown, queries unknown)"
    paper_only = [f"metasgd {unknown}", f"mamlpp {unknown}", "maml (paper; maml split, 1 query/class)"]
    assert _column(table, 0) == ["maml", "fomaml", "reptile", *paper_only]
    bold = [row.find_element("css selector", "td").value_of_css_property("font-weight")
            for row in table.find_elements("css selector", "tbody tr")]
    assert bold[:3] == ["700", "700", "400"]
    assert len(driver.find_element("id", "o-omniglot-5w1s--transductive-1-query-class")
               .find_elements("css selector", "tbody tr")) == 1  # the other digest, apart
    # The details table (collapsed until clicked) has the same rows, with the digest.
    details = driver.find_element("id", "t-omniglot-5w1s--transductive-1-query-class-details")
    assert not details.is_displayed()
    details.find_element("xpath", "./ancestor::details/summary").click()
    assert details.is_displayed() and _column(details, 5)[:3] == ["a" * 12] * 3

    # Click "ours ... %": ascending (missing values last), then again: descending.
    header = table.find_elements("css selector", "thead th")[3]
    assert header.text.startswith("ours accuracy")
    header.click()
    assert header.get_attribute("aria-sort") == "ascending"
    assert _column(table, 0) == ["reptile", "fomaml", "maml", *paper_only]
    header.click()
    assert _column(table, 0) == ["maml", "fomaml", "reptile", *paper_only]
    # A text column sorts alphabetically.
    table.find_elements("css selector", "thead th")[0].click()
    assert _column(table, 0) == ["fomaml", "maml", "maml (paper; maml split, 1 query/class)",
                                 f"mamlpp {unknown}", f"metasgd {unknown}", "reptile"]
    # Paper column (numbers): ascending by published mean.
    table.find_elements("css selector", "thead th")[5].click()
    assert _column(table, 5) == ["89.7 ± 1.1", "97.68 ± 0.04", "98.3 ± 0.5", "98.7 ± 0.4", "99.47", "99.53 ± 0.26"]
    # Bars with whiskers are drawn.
    assert driver.find_elements("css selector", "svg.bars rect")[0].size["width"] > 10
