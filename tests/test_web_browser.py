"""The web app in a real browser (Debian's chromium + chromedriver, headless) at a phone and a desktop viewport.

One owner's day, in order: first-run setup, a wrong password refused, enrolling a person from fixture photos (a
photo without a face says why it was rejected), the daemon on a folder camera granting that person while the
dashboard shows it live, an unknown visitor labelled from the access log and then let in, "not <person>" on a grant
removing the matched photo, a request without the CSRF token refused, a remote unlock. Screenshots of every page go to test-artifacts/screenshots/ (README)
and are checked for real content (pixel variance and the page's text in the DOM).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("starlette", reason="the web app's extra is not installed (pip install '.[web]')")
selenium = pytest.importorskip("selenium", reason="selenium is not installed (pip install '.[dev]')")

from edgeface.testing import MosquittoBroker, mosquitto_path, wait_until  # noqa: E402
from webutil import ServerThread  # noqa: E402

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; .ci/run does)",
                allow_module_level=True)
if mosquitto_path() is None:
    pytest.skip("needs a mosquitto binary (apt-get install mosquitto)", allow_module_level=True)

pytestmark = [pytest.mark.broker, pytest.mark.slow]

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCREENSHOTS = REPO / "test-artifacts" / "screenshots"
FACES = Path(__file__).resolve().parent / "fixtures" / "faces"
PASSWORD = "front door owner 42"
SECRET = "a-test-unlock-secret-of-some-length"
PHONE, DESKTOP = (390, 844), (1280, 900)


def make_driver(user_data: str) -> webdriver.Chrome:
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                f"--user-data-dir={user_data}", "--force-device-scale-factor=1"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    return driver


def set_viewport(driver: webdriver.Chrome, size: tuple[int, int]) -> None:
    """The layout viewport exactly (window size includes no chrome in headless=new, but be exact anyway)."""
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": size[0], "height": size[1], "deviceScaleFactor": 1, "mobile": size[0] < 600})


def screenshot(driver: webdriver.Chrome, name: str, must_show: str) -> Path:
    """Save the page and check it is a real page: its text is in the DOM and the image is not one flat colour."""
    assert must_show in driver.find_element(By.TAG_NAME, "body").text, (name, must_show)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    driver.save_screenshot(str(path))
    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    assert img is not None and img.shape[0] > 100 and img.shape[1] > 100, name
    assert float(img.std()) > 10.0, f"{name}: the screenshot is nearly blank (std {img.std():.1f})"
    # more than a header: a good share of the rows below it differ from the background
    busy_rows = np.mean(img[80:].std(axis=1) > 5.0)
    assert busy_rows > 0.05, f"{name}: hardly anything below the header ({busy_rows:.0%} of rows)"
    return path


def camera_folder(tmp: Path, photo: Path) -> Path:
    folder = tmp / f"camera-{photo.stem}"
    folder.mkdir(exist_ok=True)
    shutil.copyfile(photo, folder / photo.name)
    return folder


@pytest.fixture
def door(tmp_path, monkeypatch):
    """A broker, the config, the web app (in-thread uvicorn, its own models) and a way to run the daemon."""
    from edgeface.config import parse_config

    monkeypatch.setenv("EDGEFACE_UNLOCK_SECRET", SECRET)
    broker = MosquittoBroker().start()
    cfg = parse_config({
        "state_dir": str(tmp_path / "state"),
        "camera": {"source": str(FACES), "max_fps": 100},
        "policy": {"min_frames": 3, "window_frames": 5, "window_s": 10.0, "cooldown_s": 3.0, "unknown_interval_s": 1.0},
        "door": {"door_id": "front", "pulse_s": 0.2, "pin_factory": "mock"},
        "mqtt": {"host": "127.0.0.1", "port": broker.port, "keepalive_s": 5, "remote_unlock": True},
    })
    from edgeface.web.app import create_app

    server = ServerThread(create_app(cfg))
    yield cfg, server
    server.close()
    broker.close()


def run_daemon(cfg, analyzer, folder: Path, *, frames: int = 6, keep_open: bool = False):
    """The real daemon on a folder camera (the photo `frames` times), MQTT to the test broker, mock relay pin."""
    from gpiozero.pins.mock import MockFactory

    from edgeface.daemon.app import Daemon
    from edgeface.frames import FolderSource

    daemon = Daemon(cfg, analyzer=analyzer, source=FolderSource(folder, repeat=frames), pin_factory=MockFactory())
    daemon.start()
    assert daemon.mqtt.wait_connected(10)
    daemon.run()
    assert wait_until(lambda: len(daemon.outbox) == 0, timeout=10), "events not delivered"
    if keep_open:
        return daemon
    daemon.close()
    return None


def test_the_owners_day_in_a_phone_browser(door, analyzer, tmp_path):
    cfg, server = door
    url = server.url
    nonface = tmp_path / "upload" / "wall.jpg"
    nonface.parent.mkdir()
    gradient = np.tile(np.linspace(40, 220, 640, dtype=np.uint8), (480, 1))
    cv2.imwrite(str(nonface), cv2.merge([gradient, gradient[::-1], np.full_like(gradient, 128)]))
    photos = [FACES / "barack_obama" / f"barack_obama_0{i}.jpg" for i in (1, 2, 3)]

    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    driver = make_driver(profile)
    wait = WebDriverWait(driver, 30)
    daemon = None
    try:
        set_viewport(driver, PHONE)
        # first run: there is no default password, the owner sets one
        driver.get(url + "/")
        assert driver.current_url.endswith("/setup")
        screenshot(driver, "phone-setup", "Set up the admin account")
        driver.find_element(By.ID, "username").send_keys("owner")
        driver.find_element(By.ID, "password").send_keys(PASSWORD)
        driver.find_element(By.ID, "password2").send_keys(PASSWORD)
        driver.find_element(By.ID, "create").click()
        wait.until(lambda d: "Dashboard" in d.title)

        # log out, a wrong password is refused, the right one works
        driver.find_element(By.CSS_SELECTOR, "nav form button").click()
        wait.until(lambda d: d.current_url.endswith("/login"))
        driver.find_element(By.ID, "username").send_keys("owner")
        driver.find_element(By.ID, "password").send_keys("not the password")
        driver.find_element(By.ID, "login").click()
        wait.until(lambda d: d.find_elements(By.ID, "error"))
        assert "wrong user name or password" in driver.find_element(By.ID, "error").text
        screenshot(driver, "phone-login-refused", "wrong user name or password")
        driver.find_element(By.ID, "username").clear()
        driver.find_element(By.ID, "username").send_keys("owner")
        driver.find_element(By.ID, "password").send_keys(PASSWORD)
        driver.find_element(By.ID, "login").click()
        wait.until(lambda d: "Dashboard" in d.title)

        # enroll from several photos at once; the one without a face says why
        driver.get(url + "/people")
        screenshot(driver, "phone-people-empty", "Add a person")
        driver.find_element(By.ID, "name").send_keys("alice")
        driver.find_element(By.ID, "photos").send_keys("\n".join(str(p) for p in [*photos, nonface]))
        assert driver.find_element(By.ID, "camera").get_attribute("capture") == "user"
        driver.find_element(By.ID, "enroll").click()
        wait.until(lambda d: d.find_elements(By.ID, "photo-results"))
        results = driver.find_element(By.ID, "photo-results").text
        assert "wall.jpg: rejected: no face found" in results
        assert driver.find_element(By.ID, "enroll-summary").text == "3 photos added."
        screenshot(driver, "phone-enrolled", "rejected: no face found")
        driver.get(url + "/people")
        assert "alice" in driver.find_element(By.ID, "people").text
        screenshot(driver, "phone-people", "3 photos")

        # the daemon grants alice; the dashboard shows it without a reload
        driver.get(url + "/live")  # someone watches: the daemon writes the live picture from its next frame
        dashboard(driver, url, wait)
        driver.execute_script("window.__not_reloaded = true;")
        run_daemon(cfg, analyzer, camera_folder(tmp_path, FACES / "barack_obama" / "barack_obama_04.jpg"))
        wait.until(lambda d: "granted alice" in d.find_element(By.ID, "decisions").text)
        assert driver.execute_script("return window.__not_reloaded === true;")
        screenshot(driver, "phone-dashboard-live", "granted alice")
        driver.get(url + "/live")
        wait.until(lambda d: d.execute_script("var i = document.getElementById('live'); "
                                              "return i.complete && i.naturalWidth > 0;"))
        screenshot(driver, "phone-live", "Live view")

        # an unknown visitor, labelled from the log as a new person, is let in next time
        stranger = camera_folder(tmp_path, FACES / "kit_harington" / "kit_harington_02.jpg")
        dashboard(driver, url, wait)
        run_daemon(cfg, analyzer, stranger)
        wait.until(lambda d: "unknown unknown visitor" in d.find_element(By.ID, "decisions").text)
        driver.get(url + "/log?result=unknown")
        entry = driver.find_element(By.CSS_SELECTOR, "ul.log li.unknown")
        assert entry.find_element(By.CSS_SELECTOR, "img.chip").get_attribute("naturalWidth") not in (None, "0")
        screenshot(driver, "phone-log-unknown", "unknown visitor")
        entry.find_element(By.NAME, "new_name").send_keys("kit")
        entry.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        wait.until(lambda d: d.find_elements(By.ID, "message"))
        assert "enrolled for kit" in driver.find_element(By.ID, "message").text
        dashboard(driver, url, wait)
        daemon = run_daemon(cfg, analyzer, stranger, keep_open=True)
        wait.until(lambda d: "granted kit" in d.find_element(By.ID, "decisions").text)

        # "not kit" on that grant removes the photo that matched
        driver.get(url + "/log?person=kit&result=granted")
        driver.find_element(By.CSS_SELECTOR, "ul.log li.granted button.not").click()
        wait.until(lambda d: d.find_elements(By.ID, "message"))
        assert "removed the kit photo" in driver.find_element(By.ID, "message").text
        screenshot(driver, "phone-log-corrected", "removed the kit photo")
        assert "corrected: not kit" in driver.find_element(By.ID, "log").text
        assert "Not kit" not in [b.text for b in driver.find_elements(By.CSS_SELECTOR, "ul.log button.not")]
        driver.get(url + "/log?result=unknown")
        assert "labelled: kit" in driver.find_element(By.ID, "log").text
        driver.get(url + "/people")
        assert "kit\n0 photos" in driver.find_element(By.ID, "people").text

        # remote unlock: password again, the daemon accepts the signed command and records it
        driver.get(url + "/unlock")
        driver.find_element(By.ID, "unlock-password").send_keys(PASSWORD)
        driver.find_element(By.ID, "unlock").click()
        wait.until(lambda d: d.find_elements(By.ID, "unlock-result"))
        assert "Unlock command sent" in driver.find_element(By.ID, "unlock-result").text
        screenshot(driver, "phone-unlock", "Unlock command sent")
        assert wait_until(lambda: any(r["result"] == "accepted" for r in daemon.audit.rows("remote_unlock")),
                          timeout=10), "the daemon did not accept the web app's unlock"
        web_rows = [r for r in daemon.audit.rows("web")]
        assert {"admin_created", "login_failed", "login", "enroll", "label", "not_person", "remote_unlock"} <= \
            {r["result"] for r in web_rows}

        # a state change from this logged-in browser without the CSRF token is refused
        status = driver.execute_async_script(
            "var done = arguments[arguments.length - 1];"
            "fetch('/people', {method: 'POST', credentials: 'same-origin', body: new URLSearchParams({name: 'mallory'})})"
            ".then(function (r) { done(r.status); }, function (e) { done(String(e)); });")
        assert status == 403
        driver.get(url + "/people")
        assert "mallory" not in driver.find_element(By.ID, "people").text

        driver.get(url + "/settings")
        screenshot(driver, "phone-settings", "config OK")
        assert SECRET not in driver.page_source

        # the same pages on a desktop
        set_viewport(driver, DESKTOP)
        for path, name, text in (("/", "dashboard", "granted kit"), ("/people", "people", "alice"),
                                 ("/live", "live", "Live view"),
                                 ("/log", "log", "unknown visitor"), ("/unlock", "unlock", "Unlock the door"),
                                 ("/settings", "settings", "Effective config"),
                                 (f"/people/{_person_id(driver, url, 'alice')}", "person", "Delete alice")):
            driver.get(url + path)
            screenshot(driver, f"desktop-{name}", text)
    finally:
        if daemon is not None:
            daemon.close()
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def dashboard(driver: webdriver.Chrome, url: str, wait: WebDriverWait) -> None:
    """Open the dashboard and wait until its event stream is connected (news from then on is shown)."""
    driver.get(url + "/")
    wait.until(lambda d: d.find_element(By.ID, "live-status").text == "(live)")


def _person_id(driver: webdriver.Chrome, url: str, name: str) -> str:
    driver.get(url + "/people")
    for a in driver.find_elements(By.CSS_SELECTOR, "ul.people a"):
        if name in a.text:
            return a.get_attribute("href").rsplit("/", 1)[1]
    raise AssertionError(f"{name} is not listed")
