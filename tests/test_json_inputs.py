"""Hostile JSON (a 5,000-digit integer, 100,000 '[', NaN, a FIFO) gives one line at every reader."""

from __future__ import annotations

import json
import os
import threading

import pytest

from dualenc.core import jsonfiles
from dualenc.core.config import read_json
from dualenc.core.errors import DualEncError
from dualenc.data.manifest import read_manifest_file
from dualenc.distribute.cluster import parse_tf_config
from tfrecords_tools.__main__ import main

DEEP = "[" * 100_000 + "]" * 100_000
LONG_INTEGER = "1" * 5000
HOSTILE = {
    "deep": (DEEP, "nests arrays or objects 100000 deep"),
    "deep and unclosed": ("[" * 100_000, "nests arrays or objects 100000 deep"),
    "long integer": (f'{{"a": {LONG_INTEGER}}}', "an integer of 5000 digits"),
    "NaN": ('{"a": NaN}', "holds NaN"),
    "-Infinity": ("[-Infinity]", "holds -Infinity"),
    "overflowing float": ("[1e999]", "too large for a float"),
}


@pytest.mark.parametrize("text, expected", HOSTILE.values(), ids=HOSTILE)
def test_loads_refuses_hostile_json_in_one_line(text, expected):
    with pytest.raises(DualEncError, match=expected) as raised:
        jsonfiles.loads(text, "the source", hint="fix it")
    assert "\n" not in str(raised.value) and str(raised.value).startswith("the source ")
    assert str(raised.value).endswith("; fix it")


def test_nesting_ignores_brackets_inside_strings_and_escaped_quotes():
    text = json.dumps({"caption": "[[[{{ \"quoted [\" \\ [", "list": [[1], {"x": "]]]"}]})
    assert jsonfiles.nesting_depth(text) == 3
    assert jsonfiles.loads(json.dumps(["[" * 1000]), "s") == ["[" * 1000]


def test_nesting_is_counted_across_chunks(monkeypatch):
    monkeypatch.setattr(jsonfiles, "DEPTH_CHUNK_BYTES", 3)
    assert jsonfiles.nesting_depth('[["a\\"[[[[", {"b": [1]}], "]"]') == 4


def test_nonfinite_numbers_are_read_where_allowed():
    assert jsonfiles.loads('{"loss": NaN, "best": Infinity}', "metrics", allow_nonfinite=True)["best"] == float("inf")


def test_load_file_refuses_a_fifo_without_waiting_for_a_writer(tmp_path):
    fifo = tmp_path / "config.json"
    os.mkfifo(fifo)
    outcome = []

    def read() -> None:
        try:
            jsonfiles.load_file(fifo, "config file")
        except DualEncError as error:
            outcome.append(str(error))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=5)
    assert outcome == [f"config file {fifo} is not a regular file (a device, FIFO or socket); pass a JSON file"]


def test_load_file_refuses_a_file_over_its_cap_before_reading_it(tmp_path):
    path = tmp_path / "big.json"
    path.write_text("[" + "0," * 100 + "0]")
    with pytest.raises(DualEncError, match=r"big.json holds 203 bytes, more than the 100 a manifest may have"):
        jsonfiles.load_file(path, "manifest", max_bytes=100)


def test_config_manifest_and_tf_config_readers_refuse_hostile_json(tmp_path):
    path = tmp_path / "hostile.json"
    for text, expected in HOSTILE.values():
        path.write_text(text)
        with pytest.raises(DualEncError, match=expected):
            read_json(path, "--config")
        with pytest.raises(DualEncError, match=expected):
            read_manifest_file(path)
        with pytest.raises(DualEncError, match=expected):
            parse_tf_config(text)


@pytest.mark.parametrize("command", ["cuhk-pedes", "coco", "folder"])
@pytest.mark.parametrize("text, expected", [HOSTILE["deep"], HOSTILE["long integer"]], ids=["deep", "long integer"])
def test_packers_refuse_hostile_annotations_in_one_line(tmp_path, capsys, command, text, expected):
    annotations = tmp_path / ("captions.jsonl" if command == "folder" else "annotations.json")
    annotations.write_text(text + "\n")
    flag = "--captions" if command == "folder" else "--annotations"
    assert main([command, flag, str(annotations), "--images", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and err.count("\n") == 1


def test_beam_options_refuse_deeply_nested_json_values(monkeypatch):
    pytest.importorskip("apache_beam")
    from dualenc.beam.options import BEAM_SERVICES_ENV, pipeline_options

    with pytest.raises(DualEncError, match="Beam option --transform_name_mapping nests arrays or objects 100000 deep"):
        pipeline_options("DirectRunner", ["--transform_name_mapping=" + DEEP])
    monkeypatch.setenv(BEAM_SERVICES_ENV, DEEP)
    with pytest.raises(DualEncError, match=rf"\${BEAM_SERVICES_ENV} nests arrays or objects 100000 deep"):
        pipeline_options("DirectRunner", [])
