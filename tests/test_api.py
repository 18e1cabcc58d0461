"""The public Python API: the README's example runs as written, the one-line command of the
issue works in a fresh process, and a user's mistakes are one-line `DualEncError`s."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dualenc
import search
from dualenc.core.errors import DualEncError
from tests.support.colour_run import COLOURS, make_colour_run, solid_image

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def colour_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("api")
    make_colour_run(root)
    photos = root / "home" / "photos"
    photos.mkdir(parents=True)
    for word in ("red", "green", "blue"):
        Image.fromarray(solid_image(COLOURS[word], seed=len(word))).save(photos / f"{word}.png")
    Image.fromarray(solid_image(COLOURS["red"], seed=99)).save(root / "query.jpg", quality=95)
    Image.fromarray(solid_image(COLOURS["blue"], seed=98)).save(root / "a.webp", lossless=True)
    return root


def readme_example() -> str:
    """The first code block of the README's "Python API" section."""
    section = (REPO / "README.md").read_text().split("## Python API\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"((?:\n    .*|\n)+)", section[section.index("\n    "):]).group(1)
    return "\n".join(line[4:] for line in block.splitlines())


def test_readme_example_runs_and_answers_like_the_cli(colour_root, monkeypatch, capsys):
    monkeypatch.chdir(colour_root)
    monkeypatch.setenv("HOME", str(colour_root / "home"))
    names: dict = {}
    exec(compile(readme_example(), "README.md (Python API)", "exec"), names)
    run = names["run"]
    top = run.search("a woman in a red coat", k=3)
    assert [row["rank"] for row in top] == [1, 2, 3] and all(row["image_id"].startswith("red/") for row in top)
    assert search.main(["a woman in a red coat", "-k", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == top
    photos = names["photos"]
    assert photos.search((colour_root / "query.jpg").read_bytes(), k=1)[0]["image_id"] == "red.png"
    # A file's path (what search.py --image passes) gives what its bytes give.
    assert photos.search(colour_root / "query.jpg", k=3) == photos.search((colour_root / "query.jpg").read_bytes(), k=3)
    assert run.encode_text(["a red car", "two dogs"]).shape == (2, 3)
    embeddings = run.encode_images([(colour_root / "a.webp").read_bytes()])
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    report = run.evaluate()
    assert report["split"] == "test" and report["text_to_image"]["R@1"] == 100.0


def test_the_one_line_command_in_a_fresh_process(colour_root):
    command = "import dualenc; r = dualenc.load('runs/latest'); print(r.search('a woman in a red coat', k=3))"
    done = subprocess.run([sys.executable, "-c", command], cwd=colour_root, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(colour_root / "home")})
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("'rank'") == 3 and "'image_id': 'red/" in done.stdout


def test_import_dualenc_does_not_load_tensorflow():
    done = subprocess.run([sys.executable, "-c", "import sys, dualenc; dualenc.__version__; print('tensorflow' in sys.modules)"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.stdout.strip() == "False", done.stderr


@pytest.mark.parametrize("call, words", [
    (lambda run: run.encode_images([b"not an image"]), "image 0: not an image"),
    (lambda run: run.encode_images(["red.png"]), "image 0 must be the bytes of an image file, got str"),
    (lambda run: run.encode_text([b"red"]), "text 0 is a bytes, not a string"),
    (lambda run: run.search("red", k=0), "k must be a whole number of at least 1"),
    (lambda run: run.search("   "), "the query is empty"),
    (lambda run: run.search(b"\x89PNG\r\n\x1a\n broken"), "the query image: truncated or corrupt PNG"),
    (lambda run: run.search(Path("no/such.png")), "query image no/such.png: file not found"),
    (lambda run: run.index(folder="photos", data="data"), "name one gallery"),
])
def test_mistakes_are_one_line(colour_root, monkeypatch, call, words):
    monkeypatch.chdir(colour_root)
    with pytest.raises(DualEncError, match=re.escape(words)) as raised:
        call(dualenc.load("runs/latest"))
    assert "\n" not in str(raised.value)


def test_load_names_what_is_missing(tmp_path):
    with pytest.raises(DualEncError, match="does not exist; run `python train.py` first"):
        dualenc.load(tmp_path / "nothing")
    with pytest.raises(DualEncError, match="unknown --ann 'fast'"):
        dualenc.load(tmp_path, ann="fast")


def test_canonical_image_bytes_is_public():
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((4, 4), np.uint16) + 65535).save(buffer, "PNG")
    assert Image.open(io.BytesIO(dualenc.canonical_image_bytes(buffer.getvalue()))).mode == "L"
