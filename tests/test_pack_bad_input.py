"""The packers on bad input and a hostile system (issue 13): one `error:` line and exit 2, or a
deterministic, trainable result; nothing half-written left behind; no process left running.

References are independent of the packer: TensorFlow's own decoder and cross-entropy op, Pillow,
protobuf's wire format written out by hand, the kernel's process table.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import signal
import socket
import subprocess
import struct
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from dualenc.data.images import (
    PARALLEL_DECODE_MIN,
    canonical_image_bytes,
    decode_image,
    pillow_reason,
    tensorflow_problems,
)
from dualenc.data.records import serialize_example
from tests.support.images import write_image
from tests.support.packed import read_records
from tests.support.packer_process import pack_in_fresh_process
from tfrecords_tools import writer
from tfrecords_tools.__main__ import main

REPO = Path(__file__).resolve().parents[1]
CHILD_ENV = {**os.environ, "PYTHONPATH": str(REPO)}
GOOD_IMAGES = 9  # more than writer.IMAGES_PER_TASK, so `--workers 2` really starts a thread pool
PROCESS_WAIT_S = 60


def _one_error_line(capsys) -> str:
    """The one line besides progress bars (redrawn with carriage returns) that stderr holds."""
    lines = [line for line in capsys.readouterr().err.split("\n") if line and "\r" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def _folder(root: Path, rows: list[tuple[str, str]], suffix: str = ".csv") -> Path:
    """A caption table of (image, caption) rows at ``root/captions{suffix}``; images under root/images."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    table = root / f"captions{suffix}"
    if suffix == ".csv":
        table.write_text("image,caption\n" + "".join(f"{image},{caption}\n" for image, caption in rows))
    else:
        table.write_text("".join(json.dumps({"image": image, "caption": caption}) + "\n" for image, caption in rows))
    return table


def _pack_folder(root: Path, table: Path, out: Path, *extra: str) -> int:
    return main(["folder", "--captions", str(table), "--images", str(root / "images"), "--out", str(out),
                 "--workers", "1", *extra])


def _good_images(root: Path, count: int = GOOD_IMAGES) -> list[tuple[str, str]]:
    rows = []
    for index in range(count):
        write_image(root / "images" / f"good{index}.png", "png", seed=index)
        rows.append((f"good{index}.png", f"picture {index}"))
    return rows


# 1, 20: what Pillow accepts but TensorFlow refuses is skipped, and the reason says why.

def _pillow_yes_tensorflow_no() -> bytes:
    """A JPEG whose end marker is destroyed and one entropy-coded byte changed: Pillow pads the
    data and decodes it in full, TensorFlow's libjpeg runs past the end and refuses it."""
    pixels = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    original = buffer.getvalue()
    for offset in range(len(original) // 2, len(original) - 2):
        damaged = bytearray(original)
        damaged[offset] ^= 0x5A
        damaged[-2] = 0x91
        with Image.open(io.BytesIO(bytes(damaged))) as image:
            try:
                image.load()
            except OSError:
                continue
        try:
            tf.io.decode_jpeg(bytes(damaged), channels=3, dct_method="INTEGER_ACCURATE")
        except tf.errors.InvalidArgumentError:
            return bytes(damaged)
    raise AssertionError("no damaged JPEG that Pillow decodes and TensorFlow refuses")


def test_an_image_tensorflow_cannot_decode_is_skipped_with_tensorflows_reason(tmp_path):
    rows = _good_images(tmp_path, 2)
    (tmp_path / "images" / "damaged.jpg").write_bytes(_pillow_yes_tensorflow_no())
    table = _folder(tmp_path, [("damaged.jpg", "a damaged photo"), *rows])
    assert _pack_folder(tmp_path, table, tmp_path / "out") == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    [skip] = manifest["skipped"]
    assert skip["path"].endswith("damaged.jpg")
    assert skip["reason"].startswith("corrupt JPEG: TensorFlow's decoder refuses it (jpeg::Uncompress failed")
    assert "Graph execution" not in skip["reason"] and "{{" not in skip["reason"]
    records = read_records(tmp_path / "out", "train")
    assert [record["image_id"].decode() for record in records] == ["good0.png", "good1.png"]
    for record in records:  # as training decodes them
        assert decode_image(tf.constant(record["image"]), (16, 8)).shape == (16, 8, 3)


def test_tensorflow_problems_in_parallel_name_the_same_images_as_one_by_one():
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), "red").save(buffer, "PNG")
    good, damaged = buffer.getvalue(), _pillow_yes_tensorflow_no()
    images = [good] * PARALLEL_DECODE_MIN
    images[7], images[100] = damaged, b"GIF89a cut"
    problems = tensorflow_problems(images)  # many: the parallel tf.data map
    assert [position for position, problem in enumerate(problems) if problem] == [7, 100]
    assert problems[7] == tensorflow_problems([damaged])[0]  # few: one by one
    assert problems[100].startswith("corrupt GIF: TensorFlow's decoder refuses it (")


def _damaged_jpegs() -> list[bytes]:
    """Cut-short, byte-flipped and shortened copies of a baseline, a progressive and a greyscale
    JPEG (seeded, so the same ones every run)."""
    rng = np.random.default_rng(0)
    sources = []
    for options, shape in (({"quality": 90}, (48, 64, 3)), ({"progressive": True}, (40, 56, 3)), ({}, (37, 53))):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(buffer, "JPEG", **options)
        sources.append(buffer.getvalue())
    damaged = []
    for source in sources:
        size = len(source)
        damaged += [source[:cut] for cut in rng.integers(2, size, 40)]
        for _ in range(60):
            flipped = bytearray(source)
            flipped[rng.integers(2, size)] ^= int(rng.integers(1, 256))
            damaged.append(bytes(flipped))
        for _ in range(20):
            start = int(rng.integers(2, size - 40))
            damaged.append(source[:start] + source[start + int(rng.integers(1, 40)):])
    return damaged


def _damaged_pngs() -> list[bytes]:
    """Copies of an RGB and a grey PNG with one IDAT chunk's data flipped, cut or extended and its
    CRC recomputed, so only decoding the pixels can tell them from good ones."""
    rng = np.random.default_rng(1)
    damaged = []
    for shape in ((40, 30, 3), (24, 36)):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(buffer, "PNG")
        data = buffer.getvalue()
        length = struct.unpack_from(">I", data, 33)[0]  # signature (8) and IHDR (25): the first IDAT
        assert data[37:41] == b"IDAT"
        pixels = data[41:41 + length]
        for _ in range(60):
            at = int(rng.integers(0, length))
            changed = [pixels[:at] + bytes([pixels[at] ^ int(rng.integers(1, 256))]) + pixels[at + 1:],
                       pixels[:at], pixels + bytes(rng.integers(0, 256, 8, dtype=np.uint8))][int(rng.integers(3))]
            chunk = b"IDAT" + changed
            damaged.append(data[:33] + struct.pack(">I", len(changed)) + chunk
                           + struct.pack(">I", zlib.crc32(chunk)) + data[45 + length:])
    return damaged


@pytest.mark.parametrize("damaged", [_damaged_jpegs, _damaged_pngs], ids=["jpeg", "png"])
def test_tensorflow_refuses_every_damaged_image_pillow_refuses(damaged):
    # Why the packer may leave a JPEG or PNG kept as is to TensorFlow's check alone (check_pixels=False).
    damaged = damaged()
    refused_by_pillow = [data for data in damaged if pillow_reason(data) is not None]
    assert len(refused_by_pillow) > len(damaged) // 4  # the damage is real
    assert all(tensorflow_problems(refused_by_pillow))


def test_a_cut_jpeg_is_left_to_tensorflow_and_keeps_pillows_reason():
    cut = _damaged_jpegs()[0]
    assert canonical_image_bytes(cut, check_pixels=False) == cut  # its header is intact
    assert pillow_reason(cut).startswith("truncated or corrupt JPEG (image file is truncated")


# 2: the train split's labels are 0..n-1, as the CMPC classifier is sized (manifest "ids").

def _coco(root: Path, image_ids: list[int]) -> Path:
    images = [{"id": image_id, "file_name": f"{image_id}.jpg"} for image_id in image_ids]
    annotations = [{"image_id": image_id, "caption": f"photo {image_id}"} for image_id in image_ids]
    for index, image_id in enumerate(image_ids):
        write_image(root / "images" / f"{image_id}.jpg", "jpeg", seed=index)
    path = root / "captions.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


def _pack_coco(root: Path, annotations: Path, *extra: str) -> int:
    return main(["coco", "--annotations", str(annotations), "--images", str(root / "images"),
                 "--out", str(root / "out"), "--workers", "1", *extra])


def test_coco_holdout_keeps_train_labels_within_the_classifier(tmp_path):
    annotations = _coco(tmp_path, [11, 12, 13, 14, 15, 16, 17, 18])
    assert _pack_coco(tmp_path, annotations, "--holdout-images", "3") == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    num_classes = manifest["splits"]["train"]["ids"]  # what training sizes the classifier to
    labels = [record["label"] for record in read_records(tmp_path / "out", "train")]
    assert sorted(labels) == list(range(num_classes)) == list(range(5))
    # TensorFlow's op under the CMPC loss accepts them (it refuses a label >= num_classes).
    tf.nn.sparse_softmax_cross_entropy_with_logits(labels, tf.zeros((len(labels), num_classes)))
    valid = [record["label"] for record in read_records(tmp_path / "out", "valid")]
    assert sorted(valid) == [5, 6, 7]


def test_a_gap_in_the_train_labels_is_warned_about(tmp_path, capsys):
    rows = _good_images(tmp_path, 3)
    (tmp_path / "images" / "broken.png").write_bytes(b"not an image")
    table = _folder(tmp_path, [rows[0], ("broken.png", "a broken file"), *rows[1:]])
    assert _pack_folder(tmp_path, table, tmp_path / "out") == 0  # labels 0, 1 (skipped), 2, 3
    assert ("warning: the 3 identities of split 'train' have labels up to 3, not 0..2"
            in capsys.readouterr().err)


# 6: two COCO images with one id.

def test_a_repeated_coco_image_id_is_refused_naming_it(tmp_path, capsys):
    annotations = _coco(tmp_path, [11, 12, 11])
    assert _pack_coco(tmp_path, annotations) == 2
    error = _one_error_line(capsys)
    assert "images[2] repeats id 11 of images[0]" in error
    assert not (tmp_path / "out").exists()


# 3: a CSV quote left open.

@pytest.mark.parametrize("text", [
    'image,caption\na.png,x\nb.png,"a cat\nc.png,a dog\nd.png,a bird\n',  # open to the end
    'image,caption\na.png,x\nb.png,"a cat\nc.png,a dog\nd.png,"a bird"\n',  # closed by a later quote
    'image,caption\na.png,x\nb.png,"a cat\nc.png,a dog\nd.png,a bird"\n',  # closed at a row's end
])
def test_an_unterminated_csv_quote_is_refused_naming_its_line(tmp_path, capsys, text):
    (tmp_path / "images").mkdir()
    (tmp_path / "captions.csv").write_text(text)
    assert _pack_folder(tmp_path, tmp_path / "captions.csv", tmp_path / "out") == 2
    error = _one_error_line(capsys)
    assert "captions.csv line 3:" in error and "quote" in error
    assert not (tmp_path / "out").exists()


# 4: a caption beyond Python's CSV field limit packs, as it does from JSON Lines.

@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_caption_longer_than_the_csv_field_limit_packs(tmp_path, suffix):
    long_caption = "word " * 40_000  # 200,000 characters; Python's csv stops at 131,072
    rows = _good_images(tmp_path, 1)
    table = _folder(tmp_path, [(rows[0][0], long_caption)], suffix)
    assert _pack_folder(tmp_path, table, tmp_path / "out") == 0
    [record] = read_records(tmp_path / "out", "train")
    assert record["caption"].decode() == long_caption.strip()


def test_a_csv_saved_with_a_byte_order_mark_packs(tmp_path):
    rows = _good_images(tmp_path, 1)
    table = _folder(tmp_path, rows)
    table.write_bytes(b"\xef\xbb\xbf" + table.read_bytes())  # as Excel saves "CSV UTF-8"
    assert _pack_folder(tmp_path, table, tmp_path / "out") == 0
    assert [record["caption"] for record in read_records(tmp_path / "out", "train")] == [b"picture 0"]


# 5: a label TFRecord cannot store is refused while reading the table, before any image.

@pytest.mark.parametrize("suffix, label", [(".jsonl", 2**63), (".csv", 2**63), (".jsonl", -1)])
def test_a_label_outside_int64_is_refused_before_any_image_is_read(tmp_path, capsys, suffix, label):
    (tmp_path / "images").mkdir()
    table = tmp_path / f"captions{suffix}"
    if suffix == ".csv":
        table.write_text(f"image,caption,label\na.png,x,1\nb.png,y,{label}\n")
    else:
        table.write_text(json.dumps({"image": "a.png", "caption": "x", "label": 1}) + "\n"
                         + json.dumps({"image": "b.png", "caption": "y", "label": label}) + "\n")
    assert _pack_folder(tmp_path, table, tmp_path / "out") == 2
    error = _one_error_line(capsys)
    line = 3 if suffix == ".csv" else 2  # a CSV's header is line 1
    assert f"{table.name} line {line}: field 'label' {label} is outside 0..2**63-1" in error
    assert not (tmp_path / "out").exists()  # nothing written, no .partial


# 7: records are byte-identical in every process.

def _varint(value: int) -> bytes:
    value %= 2**64  # a negative int64 is written as its 64-bit two's complement
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def test_an_example_is_serialised_with_its_features_in_key_order():
    """protobuf's wire format by hand: Example.features (1) → Features.feature (1, a map of
    key (1) → Feature (2)); Feature.bytes_list (1) / int64_list (3) → value (1, int64 packed)."""
    values = {"caption": _field(1, _field(1, b"a red coat")), "image": _field(1, _field(1, b"\x89PNG")),
              "image_id": _field(1, _field(1, b"x/1.png")), "label": _field(3, _field(1, _varint(300)))}
    entries = b"".join(_field(1, _field(1, key.encode()) + _field(2, value)) for key, value in sorted(values.items()))
    serialized = serialize_example("a  red coat", b"\x89PNG", "x/1.png", 300)
    assert serialized == _field(1, entries)
    # protobuf's own parser reads the same Example as its own builder makes.
    expected = tf.train.Example(features=tf.train.Features(feature={
        "caption": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"a red coat"])),
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"\x89PNG"])),
        "image_id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"x/1.png"])),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[300])),
    }))
    assert tf.train.Example.FromString(serialized) == expected


@pytest.mark.parametrize("image_length, label", [(0, 0), (127, -1), (128, 2**63 - 1), (16384, -2**63), (300_000, 12345)])
def test_examples_of_every_varint_width_match_the_reference_and_protobuf(image_length, label):
    """Lengths and labels whose varints take 1 to 10 bytes, so each nested length is right."""
    rng = np.random.default_rng(image_length)
    image = rng.integers(0, 256, image_length, dtype=np.uint8).tobytes()
    caption, image_id = "word " * int(rng.integers(0, 60)), "dir/" * int(rng.integers(1, 50)) + "x.jpg"
    values = {"caption": _field(1, _field(1, caption.strip().encode())), "image": _field(1, _field(1, image)),
              "image_id": _field(1, _field(1, image_id.encode())), "label": _field(3, _field(1, _varint(label)))}
    entries = b"".join(_field(1, _field(1, key.encode()) + _field(2, value)) for key, value in sorted(values.items()))
    serialized = serialize_example(caption, image, image_id, label)
    assert serialized == _field(1, entries)
    parsed = tf.train.Example.FromString(serialized).features.feature
    assert parsed["image"].bytes_list.value == [image] and parsed["label"].int64_list.value == [label]


def test_two_clean_processes_pack_byte_identical_shards_without_tensorflow_chatter(tmp_path):
    table = _folder(tmp_path, _good_images(tmp_path, 3))
    assert _pack_folder(tmp_path, table, tmp_path / "here") == 0
    completed = subprocess.run(
        [sys.executable, "-m", "tfrecords_tools", "folder", "--captions", str(table), "--images",
         str(tmp_path / "images"), "--out", str(tmp_path / "there"), "--workers", "1"],
        cwd=REPO, env=CHILD_ENV, capture_output=True, text=True, timeout=PROCESS_WAIT_S * 2)
    assert completed.returncode == 0, completed.stderr
    for chatter in ("absl", "cuda", "oneDNN", "cpu_feature_guard"):
        assert chatter not in completed.stderr
    checksums = [json.loads((tmp_path / out / "manifest.json").read_text())["splits"]["train"]["sha256"]
                 for out in ("here", "there")]
    assert checksums[0] == checksums[1]


# 11: a full disk.

class _FullDiskRecordWriter(tf.io.TFRecordWriter):
    """Writes one record, then fails as TensorFlow's writer does on ENOSPC."""

    def write(self, record):
        if getattr(self, "written", False):
            raise tf.errors.ResourceExhaustedError(None, None, "")
        super().write(record)
        self.written = True


def _full_journal(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["record writer", "journal"])
def test_a_full_disk_gives_one_line_and_leaves_no_partial_shard(tmp_path, capsys, monkeypatch, where):
    table = _folder(tmp_path, _good_images(tmp_path, 3))
    with monkeypatch.context() as patch:
        if where == "record writer":
            patch.setattr(tf.io, "TFRecordWriter", _FullDiskRecordWriter)
        else:
            patch.setattr(writer, "write_json_atomic", _full_journal)
        assert _pack_folder(tmp_path, table, tmp_path / "out", "--shard-size", "2") == 2
    assert "no space left on the disk of --out" in _one_error_line(capsys)
    assert not [path.name for path in (tmp_path / "out").iterdir() if path.name.endswith(".partial")]
    assert _pack_folder(tmp_path, table, tmp_path / "out", "--shard-size", "2") == 0  # space freed: resumes
    assert len(read_records(tmp_path / "out", "train")) == 3


# 14: a read-only --out.

@contextlib.contextmanager
def _read_only(directory: Path):
    """`directory` made unwritable: by its mode, or for root (whom modes do not stop) by the
    immutable attribute; skips the test where neither is possible."""
    directory.mkdir(exist_ok=True)
    immutable = os.geteuid() == 0
    if immutable:
        if subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode != 0:
            pytest.skip("root, and chattr +i is not available here to make a directory read-only")
    else:
        directory.chmod(0o555)
    try:
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(directory)], check=True)
        else:
            directory.chmod(0o755)


@pytest.mark.parametrize("command", ["folder", "stats", "make-demo"])
def test_a_read_only_out_gives_one_line(tmp_path, capsys, command):
    table = _folder(tmp_path, _good_images(tmp_path, 1))
    out = tmp_path / "out"
    if command == "stats":
        assert _pack_folder(tmp_path, table, out) == 0
        capsys.readouterr()
    with _read_only(out):
        if command == "folder":
            assert _pack_folder(tmp_path, table, out) == 2
        elif command == "stats":
            assert main(["stats", str(out)]) == 2
        else:
            assert main(["make-demo", "--out", str(out / "demo"), "--identities", "10"]) == 2
    assert f"cannot write to {'--out ' if command != 'folder' else ''}{out}" in _one_error_line(capsys)


# 12, 18: a second packer into the same --out, and kill -9 of a packer reading with 2 threads.

def _descendants(pid: int) -> set[int]:
    """The processes below `pid` (Linux's /proc children lists)."""
    found, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            with contextlib.suppress(OSError):
                children = {int(child) for child in (task / "children").read_text().split()}
                todo.extend(children - found)
                found |= children
    return found


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists()
                    or not hasattr(os, "mkfifo"), reason="needs Linux's /proc children lists and named pipes")
def test_a_second_packer_is_told_the_holder_and_kill_9_leaves_no_process(tmp_path):
    rows = _good_images(tmp_path)
    os.mkfifo(tmp_path / "images" / "stuck.png")  # a reader thread opening it waits until it is killed
    table = _folder(tmp_path, [("stuck.png", "never read"), *rows])
    command = [sys.executable, "-m", "tfrecords_tools", "folder", "--captions", str(table),
               "--images", str(tmp_path / "images"), "--out", str(tmp_path / "out")]
    first = subprocess.Popen([*command, "--workers", "2"], cwd=REPO, env=CHILD_ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    helpers: set[int] = set()
    try:
        deadline = time.monotonic() + PROCESS_WAIT_S
        lock = tmp_path / "out" / ".lock"
        while time.monotonic() < deadline and not (lock.exists() and lock.read_text().startswith(f"{first.pid} ")):
            time.sleep(0.2)  # the first packer holds --out
        time.sleep(1.0)
        helpers = _descendants(first.pid)  # whatever processes it started (it packs in threads)

        second = subprocess.run([*command, "--workers", "1"], cwd=REPO, env=CHILD_ENV,
                                capture_output=True, text=True, timeout=PROCESS_WAIT_S)
        assert second.returncode == 2
        assert second.stderr == (f"error: {tmp_path / 'out'} is in use by another packer "
                                 f"(process {first.pid} on {socket.gethostname()}); "
                                 "wait for it to finish or choose another directory\n")

        first.send_signal(signal.SIGKILL)
        first.wait()
        deadline = time.monotonic() + 10
        while any(map(_running, helpers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in helpers if _running(pid)]
    finally:
        first.kill()
        for pid in helpers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    (tmp_path / "images" / "stuck.png").unlink()
    write_image(tmp_path / "images" / "stuck.png", "png", seed=99)
    assert main(["folder", "--captions", str(table), "--images", str(tmp_path / "images"),
                 "--out", str(tmp_path / "out"), "--workers", "1"]) == 0  # the dead packer's lock is gone


# Mistakes that need no TensorFlow are reported before it is imported.

@pytest.mark.parametrize("arguments, expected", [
    (["folder", "--captions", "{root}/captions.csv", "--images", "{root}", "--out", "{root}/out"], "line 2"),
    (["coco", "--annotations", "{root}/captions.csv", "--images", "{root}", "--out", "{root}/out"], "not valid JSON"),
    (["folder", "--captions", "{root}/good.csv", "--images", "{root}", "--out", "{root}/out", "--workers", "0"],
     "--workers must be at least 1"),
])
def test_mistakes_are_reported_before_tensorflow_is_imported(tmp_path, arguments, expected):
    (tmp_path / "captions.csv").write_text('image,caption\na.png,"open\n')
    (tmp_path / "good.csv").write_text("image,caption\na.png,fine\n")
    completed = pack_in_fresh_process([argument.format(root=tmp_path) for argument in arguments], PROCESS_WAIT_S)
    assert completed.stdout == "2 False\n", completed.stderr
    assert completed.stderr.startswith("error: ") and expected in completed.stderr
