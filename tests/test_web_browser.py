"""The web platform in a real browser (Debian's headless Chromium via chromedriver): a staff
member's morning — log in, run yesterday's clearing, read the report, download the
records as CSV, look at the dashboard (a screenshot that must not be blank)."""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from reader_sim.link import InMemoryLink
from reader_sim.platform_client import HttpTransport, PlatformClient
from reader_sim.pos import Outcome
from reader_sim.pos_file import open_pos
from reader_sim.uploader import Uploader
from tests.helpers import Clock, new_card, new_driver_card
from tests.wallet_fixtures import cli_token

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
page_timeout_s = 20


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[object]:
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.fail("chromium and chromium-driver are required (make test installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,900",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(flag)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options.add_experimental_option(
        "prefs",
        {
            "download.default_directory": str(downloads),
            "download.prompt_for_download": False,
        },
    )
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(page_timeout_s)
    driver.downloads = downloads  # type: ignore[attr-defined]
    yield driver
    driver.quit()


def _seed_a_day_of_rides(base: str, env: dict, tmp_path: Path, day: datetime) -> None:
    transport = HttpTransport(base)
    admin = PlatformClient(transport, cli_token(env, "--role", "admin"))
    admin.call(
        "POST", "/api/v1/operators", {"code": "BUS1", "name": "城北公交", "fee_rate_bp": 100}
    )
    for path, body in [
        ("fleets", {"code": "F1", "name": "一车队"}),
        ("routes", {"code": "12", "name": "12路", "fare_fen": 200}),
        ("routes", {"code": "35", "name": "35路", "fare_fen": 100}),
        ("vehicles", {"code": "V1", "plate": "A-1", "fleet": "F1", "route": "12"}),
    ]:
        admin.call("POST", f"/api/v1/operators/BUS1/{path}", body)
    device = admin.call(
        "POST",
        "/api/v1/operators/BUS1/pos-devices",
        {"terminal_id": "000012000001", "vehicle": "V1"},
    )
    perso = Path(env["WALLET_INSTANCE_DIR"]) / "personalization"
    config = json.loads((perso / device["psam_file"]).read_text())
    config["record_store"] = str(tmp_path / "pos.sqlite")
    config["repeat_tap_window_s"] = 0
    (tmp_path / "pos.json").write_text(json.dumps(config))
    clock = Clock(day.replace(hour=6))
    pos = open_pos(tmp_path / "pos.json", clock=clock)
    pos.present(InMemoryLink(new_driver_card(operator="BUS1")))
    cards = [new_card(i, balance_fen=5000, seed=i) for i in range(1, 6)]
    for hour in range(6, 20):
        clock.now = day.replace(hour=hour, minute=5)
        for card in cards[: 1 + hour % 5]:
            clock.advance(minutes=2)
            assert pos.present(InMemoryLink(card)).outcome is Outcome.PAID
    Uploader(pos.store, PlatformClient(transport, device["token"]), pos.terminal_id).upload_all()
    pos.store.close()
    transport.close()


def _png_is_not_blank(png: bytes) -> bool:
    """Decode the PNG's pixel rows (zlib) and require many distinct byte values."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    offset, idat = 8, b""
    while offset < len(png):
        length, kind = struct.unpack(">I4s", png[offset : offset + 8])
        if kind == b"IDAT":
            idat += png[offset + 8 : offset + 8 + length]
        offset += 12 + length
    return len(set(zlib.decompress(idat))) > 64


def _replaced(element):  # type: ignore[no-untyped-def]
    """A wait condition: ``element``'s page has been replaced (a form answered). Selenium's
    ``staleness_of`` also fails outright when chromium, asked about the element while the
    next page comes in, answers "does not belong to the document" (seen in CI)."""
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException

    def gone(_driver) -> bool:  # type: ignore[no-untyped-def]
        try:
            element.is_enabled()
        except StaleElementReferenceException:
            return True
        except WebDriverException as error:
            if "does not belong to the document" in str(error):
                return True
            raise
        return False

    return gone


def test_log_in_run_clearing_read_the_report_download_csv(  # type: ignore[no-untyped-def]
    sqlite_service, browser, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    base, env = sqlite_service
    today = datetime.now().replace(microsecond=0)
    _seed_a_day_of_rides(base, env, tmp_path, today)
    wait = WebDriverWait(browser, page_timeout_s)

    browser.get(f"{base}/clearing?lang=en")
    wait.until(ready.presence_of_element_located((By.ID, "token")))
    browser.find_element(By.ID, "token").send_keys("not-a-token")
    first_try = browser.find_element(By.ID, "login")
    first_try.click()
    wait.until(_replaced(first_try))
    assert (
        "Unknown or revoked token"
        in wait.until(ready.presence_of_element_located((By.ID, "login-error"))).text
    )
    browser.find_element(By.ID, "token").send_keys(cli_token(env, "--role", "admin"))
    login_button = browser.find_element(By.ID, "login")
    login_button.click()
    wait.until(_replaced(login_button))
    wait.until(ready.presence_of_element_located((By.ID, "run-clearing")))

    day = browser.find_element(By.ID, "day")
    browser.execute_script("arguments[0].value = arguments[1]", day, today.date().isoformat())
    run_button = browser.find_element(By.ID, "run-clearing")
    run_button.click()
    wait.until(_replaced(run_button))  # the POST answered: a new page loads
    wait.until(ready.presence_of_element_located((By.ID, "paid-records")))
    rides = sum(1 + hour % 5 for hour in range(6, 20))  # as seeded: 44
    assert browser.find_element(By.ID, "paid-records").text == str(rides)
    assert "Settlement statement" in browser.page_source
    assert "<svg" in browser.page_source  # the revenue-by-route chart

    browser.get(f"{base}/records?from={today.date()}&to={today.date()}")
    wait.until(ready.presence_of_element_located((By.ID, "download-csv"))).click()
    csv_file = browser.downloads / "BUS1-records.csv"
    WebDriverWait(browser, page_timeout_s).until(lambda _: csv_file.exists())
    assert len(csv_file.read_text().splitlines()) == 1 + rides

    browser.get(f"{base}/?lang=zh")
    wait.until(ready.presence_of_element_located((By.ID, "rides")))
    assert browser.find_element(By.ID, "rides").text == str(rides)
    assert "分时段乘车次数" in browser.page_source
    screenshot = browser.get_screenshot_as_png()
    (tmp_path / "dashboard.png").write_bytes(screenshot)
    assert _png_is_not_blank(screenshot)
