"""Drive app.py from headless Chromium (Selenium + the system's chromedriver): start the server, upload, run, read.

Chromium runs with a fresh profile and no background networking, so the page is tested offline as a user sees it.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.helpers import ROOT

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,1500")


def browser_paths() -> tuple[str, str] | None:
    """(chromium binary, chromedriver) found on PATH or in /usr/bin, or None."""
    browser = next((p for p in (shutil.which(n) for n in CHROMIUM_NAMES) if p), None)
    driver = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").is_file()
                                              else None)
    return (browser, driver) if browser and driver else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_app(config: Path, log_path: Path, timeout: float = 900.0) -> tuple[subprocess.Popen, str]:
    """Start ``python app.py --config config`` on a free port; wait until the page answers. Returns (process, url)."""
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "app.py", "--config", str(config), "--port", str(port)], cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"app.py exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return proc, url
        except OSError:
            time.sleep(1.0)
    proc.kill()
    raise RuntimeError(f"app.py did not answer within {timeout} s:\n{log_path.read_text()[-3000:]}")


def chromium(profile: Path, downloads: Path):
    """Headless Chromium with a fresh profile that saves downloads to ``downloads`` without asking."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    return webdriver.Chrome(service=Service(driver), options=options)


class Page:
    """The app page in a browser: the few actions and readings a user has."""

    def __init__(self, driver, url: str, timeout: float = 900.0):
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver = driver
        self.wait = WebDriverWait(driver, timeout, poll_frequency=0.5)
        driver.get(url)
        self.wait.until(lambda d: d.find_elements("css selector", "#run"))

    def css(self, selector: str):
        return self.driver.find_element("css selector", selector)

    def status(self) -> str:
        return self.css("#status").text.strip()

    def upload(self, path: Path) -> str:
        """Upload through the file input; returns the status line the page shows once the upload is handled."""
        before = self.status()
        self.css("#upload input[type=file]").send_keys(str(path))
        self.wait.until(lambda d: self.status() not in ("", before) and path.name in self.status())
        return self.status()

    def set_number(self, elem_id: str, value: int) -> None:
        box = self.css(f"#{elem_id} input[type=number]")
        box.clear()
        box.send_keys(str(value))
        box.send_keys("\t")

    def run(self) -> str:
        """Click Run and wait for the status line of the finished run."""
        before = self.status()
        self.css("#run").click()
        self.wait.until(lambda d: self.status() != before and self.status().startswith(("Done", "Error",
                                                                                          "Cancelled")))
        return self.status()

    def wait_images(self, selector: str, count: int, most: bool = False) -> None:
        """Wait until at least (``most``: at most) ``count`` images under ``selector`` have finished loading (decoded,
        non-empty)."""
        script = ("return Array.from(document.querySelectorAll(arguments[0] + ' img'))"
                  ".filter(img => img.complete && img.naturalWidth > 0).length;")
        self.wait.until(lambda d: (d.execute_script(script, selector) <= count) if most else
                        (d.execute_script(script, selector) >= count))

    def download(self, folder: Path) -> Path:
        """Click the download button; wait for the file to land in ``folder`` (Chromium's download directory)."""
        known = set(folder.iterdir())
        self.css("#download").click()
        self.wait.until(lambda d: [p for p in folder.iterdir() if p not in known and p.suffix == ".png"])
        return next(p for p in folder.iterdir() if p not in known and p.suffix == ".png")
