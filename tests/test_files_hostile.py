"""dualenc.core.files against careless and unlucky use: writers racing for the same target, a
process killed mid-write or between the two renames of a directory swap, and the leftovers it
leaves beside the target."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

from dualenc.core import files
from dualenc.core.runs import RunPaths, point_latest

REPOSITORY = Path(__file__).resolve().parents[1]


def race(worker, threads: int = 2) -> list[BaseException]:
    """Run `worker(number)` in `threads` threads at once; the exceptions they raised."""
    errors: list[BaseException] = []
    start = threading.Barrier(threads)

    def run(number: int) -> None:
        start.wait()
        try:
            worker(number)
        except BaseException as error:  # noqa: BLE001 - collected for the assertion
            errors.append(error)

    pool = [threading.Thread(target=run, args=(number,)) for number in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return errors


def run_child(script: str) -> subprocess.CompletedProcess:
    """Run `script` in a fresh Python process that imports this repository's dualenc."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=REPOSITORY, capture_output=True,
                          text=True, timeout=60)


def dead_pid() -> int:
    """The id of a process that has ended."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_two_writers_of_one_file_never_publish_each_others_half_written_copy(tmp_path):
    target = tmp_path / "manifest.json"
    contents = [bytes([ord("a") + number]) * 200_000 for number in range(2)]
    published: list[bytes] = []

    def write(number: int) -> None:
        for _ in range(150):
            files.write_bytes_atomic(target, contents[number])
            published.append(target.read_bytes())

    assert race(write) == []
    assert all(content in contents for content in published)
    assert [path.name for path in tmp_path.iterdir()] == ["manifest.json"]


def test_two_runs_pointing_latest_at_once_both_succeed(tmp_path):
    runs_root = tmp_path / "runs"
    runs = [RunPaths(runs_root / name) for name in ("a", "b")]
    for run in runs:
        run.root.mkdir(parents=True)

    def point(number: int) -> None:
        for _ in range(200):
            point_latest(runs_root, runs[number])

    assert race(point) == []
    assert os.readlink(runs_root / "latest") in ("a", "b")
    assert sorted(os.listdir(runs_root)) == ["a", "b", "latest"]


def test_a_killed_writers_directory_is_removed_by_the_next_write_a_live_ones_kept(tmp_path):
    target = tmp_path / "index"
    killed = run_child(f"""
        import os, signal
        from dualenc.core.files import atomic_directory
        with atomic_directory({str(target)!r}) as building:
            (building / "embeddings.npy").write_bytes(b"half")
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    assert killed.returncode == -9, killed.stderr
    assert len(list(tmp_path.iterdir())) == 1  # the killed writer's hidden directory
    live = files.owned_temporary(tmp_path, "index", directory=True)  # this process's: alive
    with files.atomic_directory(target) as building:
        (building / "embeddings.npy").write_bytes(b"whole")
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(["index", live.name])
    assert (target / "embeddings.npy").read_bytes() == b"whole"


def test_leftover_files_of_ended_processes_go_with_the_next_write(tmp_path):
    target = tmp_path / "ann-hnsw.faiss"
    dead = tmp_path / f".ann-hnsw.faiss.{dead_pid()}-{files.HOST_TAG}-k1ll3d.tmp"
    dead.write_bytes(b"half an index")
    other_host = tmp_path / f".ann-hnsw.faiss.{dead_pid()}-00000000-k1ll3d.tmp"  # cannot tell: kept
    other_host.write_bytes(b"")
    unrelated = tmp_path / f".ann-ivf.faiss.{dead_pid()}-{files.HOST_TAG}-k1ll3d.tmp"  # another target's
    unrelated.write_bytes(b"")
    files.write_bytes_atomic(target, b"index")
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([target.name, other_host.name, unrelated.name])


def test_a_writer_killed_between_the_two_renames_leaves_the_old_directory_restored(tmp_path):
    """Where the file system cannot exchange two directories in one rename, the swap takes two;
    a kill between them must not leave the encoder missing for good."""
    target = tmp_path / "vision_encoder"
    target.mkdir()
    (target / "saved_model.pb").write_bytes(b"old model")
    killed = run_child(f"""
        import os
        from dualenc.core import files
        files.exchange = lambda first, second: False  # a file system without RENAME_EXCHANGE
        real_replace = os.replace
        def replace_then_die(source, target):
            real_replace(source, target)
            os._exit(9)  # killed after moving the old directory aside
        os.replace = replace_then_die
        with files.atomic_directory({str(target)!r}) as building:
            (building / "saved_model.pb").write_bytes(b"new model")
    """)
    assert killed.returncode == 9, killed.stderr
    assert not target.exists()
    files.recover_directory(target)  # what the next open (load_encoder, open_index) or write runs first
    assert (target / "saved_model.pb").read_bytes() == b"old model"
    assert [path.name for path in tmp_path.iterdir()] == ["vision_encoder"]


def test_the_next_write_restores_first_and_then_replaces(tmp_path, monkeypatch):
    target = tmp_path / "vision_encoder"
    retired = tmp_path / f".vision_encoder.{dead_pid()}-{files.HOST_TAG}-gone.old" / "vision_encoder"
    retired.mkdir(parents=True)
    (retired / "saved_model.pb").write_bytes(b"old model")
    restored = []
    monkeypatch.setattr(files, "exchange", lambda building, path: restored.append((path / "saved_model.pb").read_bytes())
                        or False)
    with files.atomic_directory(target) as building:
        (building / "saved_model.pb").write_bytes(b"new model")
    assert restored == [b"old model"]  # put back before the swap
    assert (target / "saved_model.pb").read_bytes() == b"new model"
    assert [path.name for path in tmp_path.iterdir()] == ["vision_encoder"]


def test_an_existing_directory_is_replaced_in_one_exchange(tmp_path, monkeypatch):
    """No moment without the directory: the swap is one rename where the file system allows it."""
    target = tmp_path / "index"
    target.mkdir()
    (target / "meta.json").write_text("old")
    renames = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda source, destination: renames.append(destination) or
                        real_replace(source, destination))
    with files.atomic_directory(target) as building:
        (building / "meta.json").write_text("new")
    assert (target / "meta.json").read_text() == "new"
    assert renames == [] and [path.name for path in tmp_path.iterdir()] == ["index"]


def test_a_finished_file_is_as_readable_as_any_other(tmp_path):
    """Unique temporary files are created exclusively, but not private: the result keeps their mode."""
    umask = os.umask(0o022)
    os.umask(umask)
    files.write_text_atomic(tmp_path / "config.json", "{}")
    assert (tmp_path / "config.json").stat().st_mode & 0o777 == 0o666 & ~umask
