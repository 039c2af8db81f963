"""The leaderboard page in a real browser: headless Chromium (Debian ``chromium`` + ``chromium-driver``) through
selenium, loading the page from ``file://`` with no network. Checks the rows, sorting by a header click,
the charts, and saves a screenshot under the test's tmp dir.

Without Chromium, chromedriver or selenium the test skips on a developer machine but FAILS under CI
(``CI=true``), where ``.ci/run`` installs them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from metabench.leaderboard import make_leaderboard
from tests.test_leaderboard import write_fixture


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
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--window-size=1500,1400"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver_path), options=options)


def _column(table, index: int) -> list[str]:
    return [row.find_elements("css selector", "td")[index].text for row in
            table.find_elements("css selector", "tbody tr")]


def test_page_renders_and_sorts(tmp_path: Path) -> None:
    write_fixture(tmp_path / "records")
    result = make_leaderboard(tmp_path / "records", tmp_path / "out")
    html = result.paths[2]
    driver = _driver()
    try:
        driver.set_page_load_timeout(20)
        driver.get(html.as_uri())
        assert driver.title == "metabench leaderboard"
        table = driver.find_element("id", "t-omniglot-5w1s--transductive-1-query-class")
        # 3 ranked rows + 3 paper-only rows, best first; bold rows are the best and the tied one.
        unknown = "(paper; split unknown, queries unknown)"
        paper_only = [f"metasgd {unknown}", f"mamlpp {unknown}",
                      "maml (paper; maml split, 1 query/class)"]
        assert _column(table, 0) == ["maml", "fomaml", "reptile", *paper_only]
        bold = [row.find_element("css selector", "td").value_of_css_property("font-weight")
                for row in table.find_elements("css selector", "tbody tr")]
        assert bold[:3] == ["700", "700", "400"]
        assert len(driver.find_element("id", "o-omniglot-5w1s--transductive-1-query-class")
                   .find_elements("css selector", "tbody tr")) == 1  # the other digest, apart

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
        table.find_elements("css selector", "thead th")[8].click()
        assert _column(table, 8) == ["89.7 ± 1.1", "97.68 ± 0.04", "98.3 ± 0.5", "98.7 ± 0.4", "99.47", "99.53 ± 0.26"]

        # Charts drawn: one bar chart per benchmark table, bars with whiskers, and the curve chart.
        assert len(driver.find_elements("css selector", "svg.bars")) == 3
        assert len(driver.find_elements("css selector", "svg.curves polyline")) == 2
        assert driver.find_elements("css selector", "svg.bars rect")[0].size["width"] > 10
        shot = tmp_path / "leaderboard.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    finally:
        driver.quit()
