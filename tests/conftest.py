"""Fixtures that several test modules share: resources built once per session.

Builders a test calls with its own arguments are plain functions in `tests.support`; TensorFlow
is imported inside the fixtures, so collecting a test module that needs neither stays fast.

`make test` runs the suite on two pytest-xdist workers with ``--dist loadfile``: each module is
one unit of work, run whole on one worker, so its module fixtures are built once. The modules
sharing `frozen_vision_run` (`SHARED_RUN_MODULES`) form one unit, so that it is trained once.
Every fixture writes under its own temporary directory (one tree per worker).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.training import TrainedRun

# Identities in the packed demo the training tests use: about 80 training pairs.
DEMO_IDENTITIES = 12
# The modules that use `frozen_vision_run`, scheduled as one unit of work.
SHARED_RUN_MODULES = ("tests/test_train.py", "tests/test_service.py")
# The units of work over about two minutes on 2 cores (by --durations), longest first: fed to
# the workers first, so that no long unit is left for one worker to run alone at the end.
LONGEST_UNITS = (
    "tests/test_multiworker.py",
    "frozen_vision_run",
    "tests/test_bench.py",
    "tests/test_keras_hub.py",
    "tests/test_training_state.py",
    "tests/test_demo_learning.py",
)


def work_unit(nodeid: str) -> str:
    """The unit of work that `nodeid` belongs to: its module, or the modules sharing a trained run."""
    module = nodeid.split("::")[0]
    return "frozen_vision_run" if module in SHARED_RUN_MODULES else module


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """``--dist loadfile`` with `work_unit` for a file. (xdist's ``loadgroup`` would do, but its
    grouping edits a node id field that pytest 9 no longer reads.)"""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class WorkUnitScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return WorkUnitScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On an xdist worker, order the units of work as the workers are fed them (with
    ``--no-loadscope-reorder``): `LONGEST_UNITS`, then the others holding slow tests, then the
    fast ones, which even out the finish."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return
    slow_units = {work_unit(item.nodeid) for item in items if item.get_closest_marker("slow")}

    def rank(item: pytest.Item) -> tuple[int, int]:
        unit = work_unit(item.nodeid)
        if unit in LONGEST_UNITS:
            return 0, LONGEST_UNITS.index(unit)
        return (1 if unit in slow_units else 2), 0

    items.sort(key=rank)


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``$DUALENC_CACHE`` for the session: a new directory per worker, never ~/.cache/dualenc, so
    that feature caches are shared neither between parallel workers nor with earlier sessions."""
    with pytest.MonkeyPatch.context() as patch:
        cache = tmp_path_factory.mktemp("dualenc-cache")
        patch.setenv("DUALENC_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The packed synthetic demo with `DEMO_IDENTITIES` identities; tests that damage it copy it first."""
    from tfrecords_tools.demo_cache import packed_demo

    return packed_demo(cache_dir=tmp_path_factory.mktemp("demo-cache"), identities=DEMO_IDENTITIES)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(preprocessor_dir, encoder_dir)`` of a tiny TF-Hub-format BERT (see `tests.support.tiny_bert`)."""
    from tests.support.tiny_bert import make_tiny_bert

    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def keras_hub_presets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{"clip", "siglip", "bert": dir}: tiny random-weight presets saved by keras-hub (`tests.support.keras_hub_presets`)."""
    from tests.support.keras_hub_presets import make_bert_preset, make_clip_preset, make_siglip_preset

    root = tmp_path_factory.mktemp("keras_hub_presets")
    return {
        "clip": make_clip_preset(root / "clip"),
        "siglip": make_siglip_preset(root / "siglip"),
        "bert": make_bert_preset(root / "bert"),
    }


@pytest.fixture(scope="session")
def frozen_vision_run(tmp_path_factory: pytest.TempPathFactory, demo_data: Path) -> TrainedRun:
    """`train.main` on `demo_data`: the small CNN frozen (features cached), the BiLSTM trained
    for two epochs. test_train inspects it; test_service serves it (adding indexes, changing nothing else)."""
    from tests.support.training import frozen_vision_flags, train_in_process

    base = tmp_path_factory.mktemp("frozen_vision_run")
    return train_in_process(base / "work", base / "cache", frozen_vision_flags(base, demo_data))
