"""docs/pictures.py: the README's two pictures redrawn by one command, here from the tiny colour run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from PIL import Image

from tests.support.colour_run import COLOURS, encode_png, make_colour_run, solid_image
from tests.support.training import REPO_ROOT


def test_one_command_draws_the_result_grid_and_the_search_page(tmp_path):
    run_dir = make_colour_run(tmp_path / "colour")
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    for number, (word, rgb) in enumerate(COLOURS.items()):
        for copy in range(2):
            (gallery / f"{word}-{copy}.png").write_bytes(encode_png(solid_image(rgb, seed=10 * number + copy)))
    out = tmp_path / "pictures"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "docs" / "pictures.py"), str(run_dir), "--gallery", str(gallery),
         "--query", "red", "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    with Image.open(out / "demo-search.png") as grid:
        assert grid.format == "PNG" and grid.size[0] > 100
    if shutil.which("chromedriver") is None or not (shutil.which("chromium") or shutil.which("chromium-browser")):
        # Without a browser the grid is still drawn, and the page is refused in one line.
        assert completed.returncode == 2
        assert completed.stderr.strip().splitlines() == [
            "error: the search-page screenshot needs chromium and chromedriver; install them with `make browser`"]
        return
    assert completed.returncode == 0, completed.stderr[-3000:]
    with Image.open(out / "search-page.png") as page:
        assert page.format == "PNG" and page.size[0] == 1200 and page.size[1] > 600
    assert completed.stdout.strip() == f"wrote {out / 'demo-search.png'} and {out / 'search-page.png'}"
