"""Redraw the README's two pictures from a trained run: ``.venv/bin/python docs/pictures.py [RUN_DIR]``.

- ``docs/demo-search.png``: ``search.py QUERY --grid`` over the demo's attribute gallery (500
  people the demo never saw), the nine results ``make demo`` draws;
- ``docs/search-page.png``: the page ``search.py --serve`` serves, showing the same query's
  results, screenshotted in headless chromium through its chromedriver (Debian's packages,
  installed by ``make browser``).

Both go through ``search.py`` itself, in child processes, so the pictures show what a user
gets. RUN_DIR defaults to runs/latest (``make demo``'s run); ``make pictures`` runs this.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dualenc.core.errors import DualEncError
from dualenc.core.runs import cache_root
from dualenc.retrieval.attributes import GALLERY_DIR_NAME
from tfrecords_tools.demo import IMAGES_DIR

REPO_ROOT = Path(__file__).resolve().parents[1]
SEARCH = REPO_ROOT / "search.py"
DEFAULT_QUERY = "a woman in a red coat"
GRID_NAME = "demo-search.png"
PAGE_NAME = "search-page.png"
# The first start embeds the gallery (about 2,300 images for the demo) before it listens.
SERVER_START_SECONDS = 600
PAGE_SECONDS = 120
WINDOW = "1200,1000"
SERVING_LINE = re.compile(r"at (http://127\.0\.0\.1:\d+/) \(Ctrl-C to stop\)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="docs/pictures.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", nargs="?", type=Path, default=Path("runs/latest"), help="trained run (default runs/latest)")
    parser.add_argument("--gallery", type=Path,
                        help=f"folder of images to search (default: the demo's attribute gallery, CACHE/{GALLERY_DIR_NAME}/{IMAGES_DIR})")
    parser.add_argument("--query", default=DEFAULT_QUERY, help=f"what to search for (default {DEFAULT_QUERY!r})")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs", help="folder for the two PNGs (default docs/)")
    return parser.parse_args(argv)


def chromium_and_driver() -> tuple[str, str]:
    """Paths of Debian's chromium and chromedriver, or a `DualEncError` saying how to get them."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        raise DualEncError("the search-page screenshot needs chromium and chromedriver; install them with `make browser`")
    return browser, driver


def search_command(run_dir: Path, gallery: Path, *flags: str) -> list[str]:
    return [sys.executable, str(SEARCH), *flags, "--model", str(run_dir), "--gallery", str(gallery)]


def draw_grid(run_dir: Path, gallery: Path, query: str, path: Path) -> None:
    """``search.py QUERY --grid PATH``; its one-line error becomes ours."""
    completed = subprocess.run(search_command(run_dir, gallery, query, "--grid", str(path)),
                               capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        lines = completed.stderr.strip().splitlines() or ["(no output)"]
        raise DualEncError(f"search.py --grid failed: {lines[-1].removeprefix('error: ')}")


def wait_for_url(server: subprocess.Popen, log: Path) -> str:
    """The address ``search.py --serve`` prints once it listens."""
    deadline = time.monotonic() + SERVER_START_SECONDS
    while time.monotonic() < deadline:
        match = SERVING_LINE.search(log.read_text())
        if match:
            return match.group(1)
        if server.poll() is not None:
            lines = log.read_text().strip().splitlines() or ["(no output)"]
            raise DualEncError(f"search.py --serve stopped: {lines[-1].removeprefix('error: ')}")
        time.sleep(0.2)
    raise DualEncError(f"search.py --serve did not start within {SERVER_START_SECONDS} s; see {log}")


def screenshot_page(url: str, query: str, path: Path, profile: Path) -> None:
    """Search `query` on the page at `url` in headless chromium; save the page once every result image has loaded."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = chromium_and_driver()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={WINDOW}",
                     "--disable-gpu", "--no-first-run", "--hide-scrollbars", f"--user-data-dir={profile}"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    loaded = ("const images = [...document.querySelectorAll('#results img')];"
              "return images.length > 0 && images.every(i => i.complete && i.naturalWidth > 0);")
    try:
        driver.get(url)
        WebDriverWait(driver, PAGE_SECONDS).until(lambda page: "images" in page.find_element(By.ID, "gallery").text)
        field = driver.find_element(By.ID, "query")
        field.send_keys(query)
        field.submit()
        WebDriverWait(driver, PAGE_SECONDS).until(lambda page: "results for" in page.find_element(By.ID, "status").text)
        WebDriverWait(driver, PAGE_SECONDS).until(lambda page: page.execute_script(loaded))
        driver.save_screenshot(str(path))
    finally:
        driver.quit()


def draw_page(run_dir: Path, gallery: Path, query: str, path: Path) -> None:
    """Serve the run on a free port, screenshot its page with `query`'s results, stop the server."""
    chromium_and_driver()  # before the server spends minutes indexing
    with tempfile.TemporaryDirectory(prefix="dualenc-pictures-") as scratch:
        log = Path(scratch) / "server.log"
        with open(log, "w") as stream:
            server = subprocess.Popen(search_command(run_dir, gallery, "--serve", "--port", "0"),
                                      stdout=stream, stderr=subprocess.STDOUT)
        try:
            screenshot_page(wait_for_url(server, log), query, path, Path(scratch) / "profile")
        finally:
            server.terminate()
            server.wait(30)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    gallery = args.gallery or cache_root() / GALLERY_DIR_NAME / IMAGES_DIR
    try:
        if not gallery.is_dir():
            raise DualEncError(f"no gallery at {gallery}; run `make demo` first (it draws the attribute gallery) or pass --gallery DIR")
        args.out.mkdir(parents=True, exist_ok=True)
        draw_grid(args.run_dir, gallery, args.query, args.out / GRID_NAME)
        draw_page(args.run_dir, gallery, args.query, args.out / PAGE_NAME)
    except DualEncError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out / GRID_NAME} and {args.out / PAGE_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
