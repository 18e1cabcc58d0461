"""Multi-worker training: TF_CONFIG checks, the local launcher, and two real workers on 127.0.0.1.

The slow tests start worker processes with `python -m dualenc.launch` (or by hand, to kill one): a step
on a fixed global batch against one process and a NumPy float64 reference; workers that never
come up or disagree on the config; a demo run killed mid-epoch and resumed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from dualenc.distribute import launch
from dualenc.distribute.cluster import Cluster, parse_tf_config, resolve_placement, training_cluster
from dualenc.core.errors import DualEncError
from tests.support.training import REPO_ROOT, csv_rows, subprocess_env, train_command

STEP_SCRIPT = REPO_ROOT / "tests" / "support" / "multiworker_step.py"
WORKER_TIMEOUT_S = 400
EPOCHS = 2
EPOCH_LINE = re.compile(rf"\[worker 0\] epoch (\d+)/{EPOCHS} \|")


def _tf_config(workers: list[str], task: dict | None = None, chief: list[str] | None = None) -> str:
    cluster = {"worker": workers} if chief is None else {"chief": chief, "worker": workers}
    return json.dumps({"cluster": cluster, **({} if task is None else {"task": task})})


# --- TF_CONFIG --------------------------------------------------------------------------------


def test_tf_config_orders_the_chief_first():
    workers = ["b:1", "c:1"]
    assert parse_tf_config(_tf_config(workers, {"type": "worker", "index": 1})) == Cluster(
        addresses=("b:1", "c:1"), rank=1, task_type="worker", task_index=1
    )
    with_chief = parse_tf_config(_tf_config(workers, {"type": "worker", "index": 0}, chief=["a:1"]))
    assert with_chief.addresses == ("a:1", "b:1", "c:1") and with_chief.rank == 1 and not with_chief.is_chief
    assert parse_tf_config(_tf_config(workers, {"type": "chief", "index": 0}, chief=["a:1"])).is_chief


@pytest.mark.parametrize(
    "text, expected",
    [
        ("{not json", "TF_CONFIG is not valid JSON"),
        ('["a:1"]', "must be a JSON object"),
        (_tf_config(["a:1", "b:1"]), "names no task"),
        (_tf_config(["a:1", "b:1"], {"type": "worker", "index": 2}), "task index 2 is outside the cluster"),
        (_tf_config(["a:1", "b:1"], {"type": "worker", "index": -1}), "task index -1 is outside the cluster"),
        (_tf_config(["a:1"], {"type": "ps", "index": 0}), "task type 'ps'"),
        (json.dumps({"cluster": {"ps": ["p:1"], "worker": ["a:1"]}, "task": {"type": "worker", "index": 0}}), "job(s) ps"),
        (_tf_config(["a:1", "a:1"], {"type": "worker", "index": 0}), "lists an address twice"),
        (json.dumps({"cluster": {"worker": "a:1"}, "task": {"type": "worker", "index": 0}}), "list of \"host:port\""),
    ],
)
def test_bad_tf_config_is_one_line_naming_the_problem(text, expected):
    with pytest.raises(DualEncError) as raised:
        parse_tf_config(text)
    assert expected in str(raised.value) and "\n" not in str(raised.value)


def test_auto_placement_is_multi_worker_only_with_several_workers():
    two = {"TF_CONFIG": _tf_config(["a:1", "b:1"], {"type": "worker", "index": 0})}
    one = {"TF_CONFIG": _tf_config(["a:1"], {"type": "worker", "index": 0})}
    assert resolve_placement("auto", two) == "multi-worker"
    assert resolve_placement("auto", one) == resolve_placement("auto", {}) == "single"
    assert resolve_placement("mirrored", two) == "mirrored"
    assert training_cluster("auto", "runs/x", "data", {}) is None
    assert training_cluster("auto", "runs/x", "data", two).num_workers == 2


@pytest.mark.parametrize(
    "environ, flags, expected",
    [
        ({"TF_CONFIG": "{oops"}, ["--out", "o", "--data", "d"], "error: TF_CONFIG is not valid JSON"),
        ({"TF_CONFIG": _tf_config(["a:1", "b:1"])}, ["--out", "o", "--data", "d"], "error: TF_CONFIG names no task"),
        ({"TF_CONFIG": _tf_config(["a:1", "b:1"], {"type": "worker", "index": 5})}, ["--out", "o", "--data", "d"],
         "error: TF_CONFIG task index 5 is outside the cluster"),
        ({}, ["--out", "o", "--data", "d"], "error: --placement multi-worker needs TF_CONFIG"),
        ({"TF_CONFIG": _tf_config(["a:1", "b:1"], {"type": "worker", "index": 0})}, ["--data", "d"],
         "error: --placement multi-worker needs --out DIR"),
        ({"TF_CONFIG": _tf_config(["a:1", "b:1"], {"type": "worker", "index": 1})}, ["--out", "o"],
         "error: --placement multi-worker needs --data DIR"),
    ],
)
def test_train_cli_refuses_bad_cluster_input_before_tensorflow(environ, flags, expected, tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "TF_CONFIG"} | environ
    env["PYTHONPATH"] = str(REPO_ROOT)
    code = (
        "import sys, train\n"
        "status = train.main(sys.argv[1:])\n"
        "print('tensorflow imported:', 'tensorflow' in sys.modules)\n"
        "sys.exit(status)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, "--placement", "multi-worker", *flags],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and done.stderr.startswith(expected)
    assert "tensorflow imported: False" in done.stdout
    assert list(tmp_path.iterdir()) == []


# --- the launcher -------------------------------------------------------------------------------


def test_launcher_gives_each_worker_its_task_and_prefixes_its_output(capsys):
    show = "import json, os; config = json.loads(os.environ['TF_CONFIG']); print(config['task']['index'], len(config['cluster']['worker']))"
    assert launch.main(["--workers", "3", "--", sys.executable, "-c", show]) == 0
    lines = sorted(capsys.readouterr().out.splitlines())
    assert lines == ["[worker 0] 0 3", "[worker 1] 1 3", "[worker 2] 2 3"]


def test_launcher_stops_the_others_and_exits_non_zero_when_a_worker_fails(capsys):
    # Worker 1 fails at once; worker 0 would wait an hour for it, as a real worker would.
    fail_or_wait = (
        "import json, os, sys, time; index = json.loads(os.environ['TF_CONFIG'])['task']['index']\n"
        "print('up', flush=True)\n"
        "sys.exit(3) if index == 1 else time.sleep(3600)"
    )
    started = time.monotonic()
    assert launch.main(["--workers", "2", "--", sys.executable, "-c", fail_or_wait]) == 3
    assert time.monotonic() - started < 60
    out = capsys.readouterr().out
    assert "[worker 1] up" in out and "worker 1 exited with status 3; stopped the others" in out


def test_launcher_refuses_a_bad_request_with_one_line(capsys):
    assert launch.main(["--workers", "0", "--", "train.py"]) == 2
    assert launch.main(["--workers", "2"]) == 2
    assert launch.main(["--workers", "1", "--", "/nonexistent/program"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and all(line.startswith("error: ") for line in errors)


def test_free_ports_are_distinct_and_configs_name_them_all():
    ports = launch.free_ports(3)
    assert len(set(ports)) == 3
    configs = [parse_tf_config(text) for text in launch.tf_configs(ports)]
    assert [config.rank for config in configs] == [0, 1, 2]
    assert configs[2].addresses == tuple(f"127.0.0.1:{port}" for port in ports)


def test_placement_multi_worker_needs_tf_config_and_auto_without_it_is_single(monkeypatch):
    from dualenc.distribute.placement import make_placement

    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(DualEncError, match="placement 'multi-worker' needs TF_CONFIG"):
        make_placement("multi-worker")
    assert make_placement("auto").kind == "single"


# --- the rendezvous before TensorFlow --------------------------------------------------------------


def _check_in_all(fingerprints: list[str | None], timeout_s: float = 30.0) -> list[str]:
    """Run `check_in` for each worker whose fingerprint is not None, in threads; each one's error or "ok"."""
    import threading

    from dualenc.distribute.rendezvous import check_in

    clusters = [parse_tf_config(text) for text in launch.tf_configs(launch.free_ports(len(fingerprints)))]
    outcomes = ["absent"] * len(fingerprints)

    def run(rank: int) -> None:
        try:
            check_in(clusters[rank], fingerprints[rank], timeout_s)
            outcomes[rank] = "ok"
        except DualEncError as error:
            outcomes[rank] = str(error)

    threads = [threading.Thread(target=run, args=(rank,)) for rank, mine in enumerate(fingerprints) if mine is not None]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=4 * timeout_s)
    return [_named(outcome, clusters[0].addresses) for outcome in outcomes]


def _named(message: str, addresses: tuple[str, ...]) -> str:
    for rank, address in enumerate(addresses):
        message = message.replace(address, f"<{rank}>")
    return message


def test_rendezvous_lets_workers_with_one_config_start():
    assert _check_in_all(["same", "same", "same"]) == ["ok", "ok", "ok"]


def test_rendezvous_refuses_a_different_config_on_every_worker():
    outcomes = _check_in_all(["same", "same", "other"], timeout_s=2.0)
    assert outcomes[0].startswith("worker 2 (<2>) started with a different command or config than the chief (<0>)")
    assert outcomes[1] == outcomes[2] == outcomes[0]


def test_rendezvous_names_a_worker_that_never_comes():
    outcomes = _check_in_all(["same", None, "same"], timeout_s=1.0)
    assert outcomes[0] == "worker 1 (<1>) never came up within 1 s; start every worker named in TF_CONFIG"
    assert outcomes[2] == outcomes[0] and outcomes[1] == "absent"


def test_rendezvous_names_a_chief_that_never_comes():
    outcomes = _check_in_all([None, "same"], timeout_s=1.0)
    assert outcomes[1] == "worker 1 found no chief listening at <0> within 1 s; start worker 0 of TF_CONFIG too"


# --- sharding and fingerprints --------------------------------------------------------------------


def test_sharding_by_file_needs_a_file_per_worker():
    from dualenc.distribute.multiworker import SHARD_BY_DATA, SHARD_BY_FILE, shard_mode

    assert shard_mode(4, 2) == shard_mode(2, 2) == SHARD_BY_FILE
    assert shard_mode(1, 2) == SHARD_BY_DATA


# --- two workers on 127.0.0.1 ---------------------------------------------------------------------


def _worker_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    # A private temporary directory shows whether the non-chief worker removed its scratch files.
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return subprocess_env(tmp_path / "cache", TMPDIR=str(tmp_path / "tmp"), **extra)


def _start(command: list[str], tf_config: str, env: dict[str, str], log: Path, errors: Path | None = None) -> subprocess.Popen:
    """`command` as one worker, its output in `log` (stderr in `errors` when given), in `log`'s folder."""
    with open(log, "w") as stream, open(errors or os.devnull, "w") as error_stream:
        return subprocess.Popen(command, env={**env, "TF_CONFIG": tf_config}, stdout=stream,
                                stderr=error_stream if errors else subprocess.STDOUT, cwd=log.parent)


@dataclasses.dataclass
class Refusals:
    """`train.py` runs refused before training, started together: a chief whose worker 1 never comes
    (`lonely`), and a chief (`chief`) with a worker 1 given other flags (`other`)."""

    lonely: subprocess.Popen
    lonely_ports: list[int]
    lonely_dir: Path
    chief: subprocess.Popen
    other: subprocess.Popen
    configs: list[str]
    pair_dir: Path


LONELY_TIMEOUT_S = 2
# The refused pair's chief names worker 1 only when it gives up waiting for a valid one, so this
# timeout is the pair's length: long enough for two processes started together to check in.
PAIR_TIMEOUT_S = 40


@pytest.fixture(scope="module")
def refusals(demo_data, tmp_path_factory) -> Iterator[Refusals]:
    """`Refusals`, started in the background at the first test that asks: the runs mostly wait
    out their timeouts, and the other slow tests of this module run meanwhile (the refused
    pair's test comes last)."""
    lonely_dir, pair_dir = tmp_path_factory.mktemp("lonely"), tmp_path_factory.mktemp("pair")

    def flags(out: Path) -> list[str]:
        return ["--data", str(demo_data), "--out", str(out / "run"), "--placement", "multi-worker", "--quiet"]

    lonely_ports = launch.free_ports(2)
    lonely = _start(train_command(*flags(lonely_dir)), launch.tf_configs(lonely_ports)[0],
                    _worker_env(lonely_dir, DUALENC_WORKER_TIMEOUT_S=str(LONELY_TIMEOUT_S)), lonely_dir / "chief.log",
                    errors=lonely_dir / "chief.err")
    configs = launch.tf_configs(launch.free_ports(2))
    env = _worker_env(pair_dir, DUALENC_WORKER_TIMEOUT_S=str(PAIR_TIMEOUT_S))
    chief = _start(train_command(*flags(pair_dir), "--epochs", "2"), configs[0], env, pair_dir / "chief.log")
    other = _start(train_command(*flags(pair_dir), "--epochs", "3"), configs[1], env, pair_dir / "other.log")
    try:
        yield Refusals(lonely, lonely_ports, lonely_dir, chief, other, configs, pair_dir)
    finally:
        launch.stop([lonely, chief, other])


@pytest.mark.slow
def test_a_worker_that_never_comes_up_is_named_after_the_timeout(refusals):
    assert refusals.lonely.wait(timeout=WORKER_TIMEOUT_S) == 2, (refusals.lonely_dir / "chief.err").read_text()[-3000:]
    stderr = (refusals.lonely_dir / "chief.err").read_text()
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    port = refusals.lonely_ports[1]
    assert len(errors) == 1 and errors[0].startswith(f"error: worker 1 (127.0.0.1:{port}) never came up within {LONELY_TIMEOUT_S} s")
    assert "Traceback" not in stderr
    assert not (refusals.lonely_dir / "run").exists()


def _clip_loss_float64(captions: np.ndarray, images: np.ndarray, temperature: float) -> float:
    """Symmetric InfoNCE of the global batch in float64, written independently of dualenc.losses."""
    logits = captions @ images.T / temperature

    def cross_entropy(rows: np.ndarray) -> np.ndarray:
        shifted = rows - rows.max(axis=1, keepdims=True)
        log_probabilities = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        return -np.diag(log_probabilities)

    return float(np.mean((cross_entropy(logits) + cross_entropy(logits.T)) / 2))


@pytest.mark.slow
def test_first_step_on_two_workers_equals_one_process_on_the_global_batch(tmp_path):
    env = subprocess_env(tmp_path / "cache", DUALENC_WORKER_TIMEOUT_S="300")
    two = subprocess.Popen(
        [sys.executable, "-m", "dualenc.launch", "--workers", "2", "--", str(STEP_SCRIPT), str(tmp_path / "two.json")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    one = subprocess.run([sys.executable, str(STEP_SCRIPT), str(tmp_path / "one.json")], env=env,
                         capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
    two_output = two.communicate(timeout=WORKER_TIMEOUT_S)[0]
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two_output[-3000:]
    single, workers = (json.loads((tmp_path / name).read_text()) for name in ("one.json", "two.json"))
    assert (single["replicas"], workers["replicas"]) == (1, 2)
    reference = _clip_loss_float64(
        np.array(single["caption_embeddings"], np.float64), np.array(single["image_embeddings"], np.float64),
        single["temperature"],
    )
    assert workers["loss"] == pytest.approx(single["loss"], abs=1e-5)
    assert workers["loss"] == pytest.approx(reference, abs=1e-4)
    # The step itself: the same update, relative to each weight's size (float32 sums in another order).
    changes = [np.abs(np.array(after) - np.array(before)).max() for after, before in zip(workers["weights"], single["weights"])]
    scales = [max(1.0, np.abs(np.array(weight)).max()) for weight in single["weights"]]
    assert max(change / scale for change, scale in zip(changes, scales)) < 1e-4
    # Sharded by file, each worker reads a file of its own.
    assert [json.loads((tmp_path / f"two.json.files-seen-by-{rank}").read_text()) for rank in (0, 1)] == [[0], [1]]


FRESH_EXPORT_SCRIPT = """
import sys
import numpy as np
import tensorflow as tf
import tensorflow_text  # noqa: F401  text ops the tower may use

run_dir = sys.argv[1]
images = [open(path, "rb").read() for path in sys.argv[2:]]
vision = tf.saved_model.load(run_dir + "/vision_encoder")
text = tf.saved_model.load(run_dir + "/text_encoder")
image_out = vision.signatures["serving_default"](images=tf.constant(images))["embeddings"].numpy()
caption_out = text.signatures["serving_default"](captions=tf.constant(["a man in a red coat", "a blue bag"]))["embeddings"].numpy()
print("norms", np.round(np.linalg.norm(image_out, axis=1), 4).tolist(), np.round(np.linalg.norm(caption_out, axis=1), 4).tolist())
print("spread", float(np.ptp(image_out, axis=0).max()))
"""


@pytest.mark.slow
def test_killed_worker_resumes_on_restart_and_the_chief_writes_a_complete_run(demo_data, tmp_path):
    run_dir = tmp_path / "run"
    env = _worker_env(tmp_path, DUALENC_WORKER_TIMEOUT_S="300")
    command = train_command("--data", str(demo_data), "--out", str(run_dir), "--placement", "multi-worker",
                            "--epochs", str(EPOCHS), "--batch-size", "8")
    configs = launch.tf_configs(launch.free_ports(2))
    workers = [_start(command, config, env, tmp_path / f"first-{index}.log") for index, config in enumerate(configs)]
    first_epoch = run_dir / "backup" / "epoch-0001"
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    try:
        # Epoch 1 is backed up: the workers are in epoch 2 now.
        while not first_epoch.is_dir():
            assert all(worker.poll() is None for worker in workers), "a worker ended before the kill"
            assert time.monotonic() < deadline, "no epoch was backed up in time"
            time.sleep(0.05)
        workers[1].send_signal(signal.SIGKILL)
    finally:
        launch.stop(workers)
    assert sorted(path.name for path in (run_dir / "backup").iterdir() if not path.name.startswith(".")) == ["epoch-0001"]
    assert not (run_dir / "metrics.json").exists()
    assert len(list((tmp_path / "tmp").glob("dualenc-*-worker1"))) == 1  # the killed worker could not clean up

    resumed = subprocess.run([sys.executable, "-m", "dualenc.launch", "--workers", "2", "--", *command[1:]],
                             env=env, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-2000:]
    assert f"[worker 0] resuming into {run_dir}" in resumed.stdout
    assert "input sharded by data" in resumed.stdout  # the demo's training split is one shard
    # Only epoch 2 was trained again; the finished epoch 1 was not repeated.
    assert [int(epoch) for epoch in EPOCH_LINE.findall(resumed.stdout)] == [2]
    # Both workers validated the same model (BatchNorm statistics averaged): identical summaries.
    summaries = {index: re.findall(rf"\[worker {index}\] (epoch 2/{EPOCHS} \|.*)", resumed.stdout) for index in (0, 1)}
    assert len(summaries[0]) == 1 and summaries[0] == summaries[1]
    assert [row["epoch"] for row in csv_rows(run_dir / "training_log.csv")] == ["0", "1"]
    assert json.loads((run_dir / "metrics.json").read_text())["epochs_trained"] == EPOCHS
    expected = {"config.json", "metrics.json", "training_log.csv", "curves.png", "vocabulary.txt", "checkpoints",
                "logs", "vision_encoder", "text_encoder"}
    assert expected <= {path.name for path in run_dir.iterdir()}
    # The killed worker's scratch directory was replaced on restart, then removed at the end.
    assert list((tmp_path / "tmp").glob("dualenc-*")) == [], "the non-chief worker left scratch files behind"

    images = sorted(path for path in (demo_data.parent / "demo-raw" / "imgs").rglob("*") if path.is_file())[:3]
    fresh = subprocess.run([sys.executable, "-c", FRESH_EXPORT_SCRIPT, str(run_dir), *map(str, images)],
                           env={**env, "PYTHONPATH": ""}, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert f"norms {[1.0] * len(images)} [1.0, 1.0]" in fresh.stdout
    assert float(fresh.stdout.split("spread ")[1]) > 1e-3



@pytest.mark.slow
def test_workers_started_with_different_configs_are_refused_by_the_chief(refusals):
    assert refusals.chief.wait(timeout=WORKER_TIMEOUT_S) == 2 and refusals.other.wait(timeout=WORKER_TIMEOUT_S) == 2
    errors = [line for line in (refusals.pair_dir / "chief.log").read_text().splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"worker 1 ({json.loads(refusals.configs[1])['cluster']['worker'][1]})" in errors[0]
    assert "different command or config" in errors[0]
    assert not (refusals.pair_dir / "run").exists() or list((refusals.pair_dir / "run").iterdir()) == []
