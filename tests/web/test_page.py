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
from minitorrent.web.face import paired_access
from minitorrent.wire.identity import load_or_create
from minitorrent.wire.tls import ServerTls

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
    options.accept_insecure_certs = True  # the face's certificate is self-signed: its identity is pinned, not a CA's
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1280,900"):
        options.add_argument(argument)
    options.add_experimental_option("prefs", {"download.default_directory": str(tmp_path / "downloads"),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(LONG_TIMEOUT)
    yield driver
    driver.quit()


def share_files(engine, folder: Path) -> dict[str, Path]:
    """Share the NAMES files (of growing sizes) from ``engine``; {name: source path}."""
    sources = {}
    for index, name in enumerate(NAMES):
        sources[name] = make_file(folder / name, 1000 * (index + 1) ** 3, seed=index)
        engine.add_file(sources[name])
    return sources


@pytest.fixture
def page(server_factory, face_factory, tmp_path: Path):
    """(face, {name: source path}) for a main server sharing four files over HTTPS (its default)."""
    engine = server_factory()
    sources = share_files(engine, tmp_path / "in")
    return face_factory(engine, tls=ServerTls(engine.identity)), sources


@pytest.fixture
def paired_page(server_factory, face_factory, tmp_path: Path):
    """(face, {name: source path}) as ``page``, with ``server.access: paired``."""
    engine = server_factory({"server": {"access": "paired"}})
    sources = share_files(engine, tmp_path / "in")
    return face_factory(engine, tls=ServerTls(engine.identity), authorize=paired_access(engine.tokens)), sources


def screenshot_folder(tmp_path: Path) -> Path:
    """WEB_SCREENSHOTS if set (for a person to look at), else a folder in tmp_path."""
    folder = Path(os.environ.get("WEB_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


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
        folder = screenshot_folder(tmp_path)
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


def token_box_shown(driver) -> bool:
    return driver.find_element("id", "token-box").is_displayed()


class TestPairedPage:
    def test_page_asks_for_a_token(self, browser, paired_page, tmp_path):
        """Without a token the page loads, shows the token box and no rows (screenshot kept as for TestPage)."""
        face, _ = paired_page
        browser.get(face.url)
        wait_until(lambda: token_box_shown(browser), SHORT_TIMEOUT, "the token box")
        browser.save_screenshot(str(screenshot_folder(tmp_path) / "page-paired-asks-for-token.png"))
        assert [] == shown_names(browser)

    def test_a_pasted_token_opens_the_page_and_is_kept(self, browser, paired_page, tmp_path):
        """The operator's token pasted in the box fills the rows; after a reload the kept token still works,
        and a download link carries it and gives the byte-exact file."""
        face, sources = paired_page
        browser.get(face.url)
        wait_until(lambda: token_box_shown(browser), SHORT_TIMEOUT, "the token box")
        browser.find_element("id", "token-input").send_keys(face.engine.operator_token())
        browser.find_element("css selector", "#token-form button").click()
        wait_until(lambda: len(shown_names(browser)) == len(NAMES), SHORT_TIMEOUT, "every row")
        browser.refresh()
        wait_until(lambda: len(shown_names(browser)) == len(NAMES), SHORT_TIMEOUT, "every row after a reload")
        name = "notes 2026.txt"
        link = browser.find_element("css selector", f'#rows tr[data-name="{name}"] td.name a')
        href = link.get_attribute("href")
        link.click()
        saved = tmp_path / "downloads" / name
        wait_until(lambda: saved.exists() and saved.stat().st_size == sources[name].stat().st_size,
                   LONG_TIMEOUT, "the download")
        assert (True, False, sha256_file(sources[name])) == ("token=" in href, token_box_shown(browser),
                                                            sha256_file(saved))

    def test_a_revoked_token_brings_the_box_back(self, browser, paired_page, tmp_path):
        """A paired client's token works until it is revoked; then the page asks again, saying it was refused."""
        face, _ = paired_page
        identity = load_or_create(tmp_path / "cli").id
        face.engine.access.pair(identity)
        browser.get(face.url + "?token=" + face.engine.tokens.token_for(identity))
        wait_until(lambda: len(shown_names(browser)) == len(NAMES), SHORT_TIMEOUT, "every row")
        address_bar = browser.current_url
        face.engine.revoke_client(identity)
        wait_until(lambda: token_box_shown(browser), SHORT_TIMEOUT, "the token box after the revocation")
        assert (False, True) == ("token=" in address_bar, "refused" in browser.find_element("id", "token-error").text)
