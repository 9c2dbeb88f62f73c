"""The page in a real browser: headless Chromium (Debian's) driven by Selenium.

Set WEB_SCREENSHOTS=<folder> to also save the page at desktop and phone
width, light and dark, for a person to look at.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from urllib.parse import quote

import pytest
from conftest import LONG_TIMEOUT, SHORT_TIMEOUT, make_file, wait_until
from webfixtures import face_factory  # noqa: F401 - a fixture used by name

from integrity import sha256_file

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="headless Chromium is not installed (Debian: chromium chromium-driver)")
NAMES = ["holiday photos été.bin", "lecture video.mp4", "notes 2026.txt", "report | final: v2.pdf"]


@pytest.fixture
def browser(tmp_path: Path):
    """A headless Chromium that saves downloads under tmp_path/downloads."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1280,900"):
        options.add_argument(argument)
    options.add_experimental_option("prefs", {"download.default_directory": str(tmp_path / "downloads"),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(LONG_TIMEOUT)
    yield driver
    driver.quit()


@pytest.fixture
def page(server_factory, face_factory, tmp_path: Path):
    """(face, {name: source path}) for a main server sharing four files."""
    engine = server_factory()
    sources = {}
    for index, name in enumerate(NAMES):
        sources[name] = make_file(tmp_path / "in" / name, 1000 * (index + 1) ** 3, seed=index)
        engine.add_file(sources[name])
    return face_factory(engine), sources


def shown_names(driver) -> list[str]:
    """The names of the rows on show, in order (read in one script: the rows are re-rendered live)."""
    return driver.execute_script("return [...document.querySelectorAll('#rows tr')].map(r => r.dataset.name)")


class TestPage:
    def test_search_filters_the_rows(self, browser, page):
        """Typing in the search box leaves only the matching rows (any case)."""
        face, _ = page
        browser.get(face.url)
        wait_until(lambda: len(shown_names(browser)) == len(NAMES), SHORT_TIMEOUT, "every row")
        browser.find_element("id", "search").send_keys("ÉTÉ")
        assert ["holiday photos été.bin"] == wait_until(
            lambda: shown_names(browser) if len(shown_names(browser)) == 1 else None, SHORT_TIMEOUT, "one row")

    def test_sorting_by_size_puts_the_largest_first(self, browser, page):
        """A click on Size sorts the rows largest first."""
        face, _ = page
        browser.get(face.url)
        wait_until(lambda: len(shown_names(browser)) == len(NAMES), SHORT_TIMEOUT, "every row")
        browser.find_element("css selector", "th[data-sort=size] button").click()
        assert list(reversed(NAMES)) == shown_names(browser)

    def test_status_shows_role_and_epoch(self, browser, page):
        """The header shows the active badge and the epoch from the status API."""
        face, _ = page
        browser.get(face.url)
        role = wait_until(lambda: browser.find_element("id", "role").text.strip().lower() == "active", SHORT_TIMEOUT,
                          "the role badge")
        assert (True, "epoch 1") == (role, browser.find_element("id", "epoch").text)

    def test_download_link_gives_the_file(self, browser, page, tmp_path):
        """Following a row's download link saves the byte-exact file."""
        face, sources = page
        name = "notes 2026.txt"
        browser.get(face.url)
        wait_until(lambda: len(shown_names(browser)) == len(NAMES), SHORT_TIMEOUT, "every row")
        row = browser.find_element("css selector", f'#rows tr[data-name="{name}"] td.name a')
        assert True == row.get_attribute("href").endswith(quote(name))
        row.click()
        saved = tmp_path / "downloads" / name
        wait_until(lambda: saved.exists() and saved.stat().st_size == sources[name].stat().st_size,
                   LONG_TIMEOUT, "the download")
        assert sha256_file(sources[name]) == sha256_file(saved)

    def test_screenshots(self, browser, page, tmp_path, caplog):
        """The page fills at desktop and phone width, light and dark; the pictures are kept in
        WEB_SCREENSHOTS=<folder> for a person to look at (in tmp otherwise)."""
        face, _ = page
        caplog.set_level(logging.INFO)
        face.engine.add_file(make_file(tmp_path / "in" / "welcome.txt", 2000))  # a line for the log panel
        folder = Path(os.environ.get("WEB_SCREENSHOTS") or tmp_path / "screenshots")
        folder.mkdir(parents=True, exist_ok=True)
        saved = []
        for scheme in ("light", "dark"):
            browser.execute_cdp_cmd("Emulation.setEmulatedMedia",
                                    {"features": [{"name": "prefers-color-scheme", "value": scheme}]})
            for label, (width, height) in {"desktop": (1280, 900), "phone": (390, 844)}.items():
                browser.set_window_size(width, height)
                browser.get(face.url)
                wait_until(lambda: len(shown_names(browser)) == len(NAMES) + 1 and
                           browser.find_element("id", "log-lines").text, SHORT_TIMEOUT, "the page filled")
                path = folder / f"page-{label}-{scheme}.png"
                browser.save_screenshot(str(path))
                saved.append(path.exists())
        assert [True] * 4 == saved
