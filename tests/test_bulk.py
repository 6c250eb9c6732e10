"""Bulk captioning: JSONL records, resume after a kill, shards and torchrun ranks merged, bad files, bounds."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from PIL import Image

from captioner.bulk.inputs import MAX_PATH_BYTES, Shard, collect_inputs, read_file_list
from captioner.bulk.jsonl import RECORD_START, JsonlFile, StandardOutput
from captioner.bulk.captioning import caption_files, caption_records
from captioner.bulk.merge import default_parts, merge
from captioner.cli import main
from captioner.models.encoder import Encoder
from captioner.errors import ConfigError, DataError, OutputError
from captioner.runtime import stage_threads
from conftest import ROOT

PHOTOS = 40
BATCH = ["--batch-size", "4"]  # the same batches everywhere, so every run decodes the very same rows together


def record_line(file: str, text: str = "a dog runs") -> bytes:
    return json.dumps({"file": file, "captions": [{"text": text, "log_prob": -1.0, "score": -0.5}]}).encode() + b"\n"


# ---------------------------------------------------------------------------------------- no model needed
def test_shards_partition_the_input_list_and_compose_with_ranks():
    files = [f"{i}.jpg" for i in range(10)]
    shards = [Shard.parse(f"{i}/3").of(files) for i in range(3)]
    assert shards[1] == ["1.jpg", "4.jpg", "7.jpg"]
    assert sorted(sum(shards, []), key=files.index) == files
    shard = Shard.parse("1/3")
    assert [shard.split(rank, 2).of(files) for rank in range(2)] == [shard.of(files)[0::2], shard.of(files)[1::2]]


@pytest.mark.parametrize("text", ["3/3", "-1/3", "1", "a/b", "0/0", "1/2/3", "0/2000000"])
def test_bad_shard_is_one_clear_error(text):
    with pytest.raises(ConfigError, match=r"--shard must be I/N with 0 <= I < N"):
        Shard.parse(text)


def test_file_list_skips_blank_lines_and_bounds_its_lines(tmp_path, monkeypatch):
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"a.jpg\r\n\n  \nsub dir/b c.jpg\n\xffd.jpg")
    assert read_file_list(str(listing)) == ["a.jpg", "sub dir/b c.jpg", os.fsdecode(b"\xffd.jpg")]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"x.jpg\ny.jpg\nx.jpg\n")))
    assert collect_inputs([], "-") == ["x.jpg", "y.jpg"]  # each file once, first place kept
    listing.write_bytes(b"a.jpg\n" + b"b" * MAX_PATH_BYTES + b"\r\n")
    assert read_file_list(str(listing)) == ["a.jpg", "b" * MAX_PATH_BYTES]
    listing.write_bytes(b"a.jpg\n" + b"b" * (MAX_PATH_BYTES + 1) + b"\n")
    with pytest.raises(ConfigError, match=r"line 2 is longer than 4096 bytes"):
        read_file_list(str(listing))
    listing.write_bytes(b"a.jpg\nb\0.jpg\n")
    with pytest.raises(ConfigError, match="line 2 holds a NUL byte"):
        read_file_list(str(listing))
    with pytest.raises(ConfigError, match=f"--files-from {tmp_path}/missing.txt: file list not found"):
        read_file_list(str(tmp_path / "missing.txt"))


@contextmanager
def within(seconds: int) -> Iterator[None]:
    """Fail instead of blocking: SIGALRM interrupts a blocked open or read (an AssertionError, which no code
    under test catches as it might an OSError)."""
    def fail(*_):
        raise AssertionError(f"blocked for {seconds} s")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_file_list_and_parts_must_be_regular_files_refused_before_reading(tmp_path, monkeypatch):
    """A device (/dev/zero) never ends, a folder is no list: refused unread. A named pipe without a writer would
    block forever: it reads as empty. A pipe with a writer (``--files-from <(find ...)``) is read."""
    fifo, server = tmp_path / "fifo", socket.socket(socket.AF_UNIX)
    os.mkfifo(fifo)
    server.bind(str(tmp_path / "socket"))
    hint = "; give a file, a pipe or -"
    with within(10), server:
        for source, kind in (("/dev/null", "a device"), (tmp_path, "a folder"), (tmp_path / "socket", "a socket or device")):
            with pytest.raises(ConfigError) as error:
                read_file_list(str(source))
            assert str(error.value) == f"--files-from {source}: file list is not a regular file ({kind}){hint}"
        assert read_file_list(str(fifo)) == []
        reader, writer = os.pipe()
        os.write(writer, b"a.jpg\nb.jpg\n")
        os.close(writer)
        assert read_file_list(f"/dev/fd/{reader}") == ["a.jpg", "b.jpg"]
        os.close(reader)
        with pytest.raises(ConfigError, match=f"^{fifo}: part is not a regular file \\(a pipe\\)$"):
            merge(["a.jpg"], [fifo], tmp_path / "all.jsonl")
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"\xef\xbb\xbfa.jpg\nb.jpg\n")  # a UTF-8 BOM, as Windows editors write
    assert read_file_list(str(listing)) == ["a.jpg", "b.jpg"]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\xef\xbb\xbfx.jpg\n")))
    assert read_file_list("-") == ["x.jpg"]


def test_torn_last_line_is_cut_off_and_nothing_else_changes(tmp_path):
    out = tmp_path / "captions.jsonl"
    good = record_line("a.jpg") + json.dumps({"file": "b.jpg", "error": "b.jpg: empty file"}).encode() + b"\n"
    for torn in (record_line("c.jpg")[:-1], record_line("c.jpg")[:30], RECORD_START[:3]):
        out.write_bytes(good + torn)
        writer = JsonlFile(out)
        assert writer.done == {"a.jpg": False, "b.jpg": True}
        writer.write([json.loads(record_line("c.jpg"))])
        writer.close()
        assert out.read_bytes() == good + record_line("c.jpg")


@pytest.mark.parametrize("content", [b"\xff\xd8\xff\xe0 a jpeg without a newline", b"photo.jpg\ta caption\n",
                                     record_line("a.jpg") + b'{"file": 3}\n' + record_line("b.jpg"),
                                     record_line("a.jpg") + b'{"file": "x"}\n'])
def test_a_file_that_is_not_ours_is_refused_untouched(tmp_path, content):
    out = tmp_path / "out.jsonl"
    out.write_bytes(content)
    with pytest.raises(OutputError, match="not a captioner JSONL file"):
        JsonlFile(out)
    assert out.read_bytes() == content


@pytest.mark.parametrize("content", [b'{"file": ', b"{", record_line("a.jpg")[:-1]])
def test_one_unfinished_line_alone_is_not_a_torn_record_of_ours(tmp_path, content):
    """A torn line is cut only after a complete record: alone, it may be anyone's, and holds nothing of ours."""
    out = tmp_path / "out.jsonl"
    out.write_bytes(content)
    with pytest.raises(OutputError) as error:
        JsonlFile(out)
    assert str(error.value) == (f"{out}: not a captioner JSONL file (its only line is an unfinished record: delete "
                                "the file if a run was killed writing it); refusing to change it, choose another file")
    assert out.read_bytes() == content


@pytest.mark.slow
def test_one_writer_at_a_time_and_a_killed_one_holds_nothing(tmp_path):
    out = tmp_path / "captions.jsonl"
    hold = "import sys, time; from pathlib import Path; from captioner.bulk.jsonl import JsonlFile; " \
           "writer = JsonlFile(Path(sys.argv[1])); print('holding', flush=True); time.sleep(600)"
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "holding\n"
        with pytest.raises(OutputError, match="another captioner is writing to it"):
            JsonlFile(out)
    finally:
        holder.kill()
        holder.wait()
    JsonlFile(out).close()  # the kernel released the lock with the killed process


@pytest.mark.slow
def test_the_lock_survives_other_descriptors_of_the_file_and_ends_with_its_process(tmp_path):
    """Closing another descriptor of --out (the image loader opening it as an input did) keeps the lock, and a
    forked child (a loader worker) still alive when the holder is killed does not keep it."""
    out = tmp_path / "captions.jsonl"
    hold = ("import os, sys, time; from pathlib import Path; from captioner.bulk.jsonl import JsonlFile; "
            "writer = JsonlFile(Path(sys.argv[1])); open(sys.argv[1], 'rb').close(); child = os.fork(); "
            "print(child or 'forked', flush=True); time.sleep(600)")  # the child prints once its fork hook ran
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    child = 0
    try:
        lines = {holder.stdout.readline().strip() for _ in range(2)}
        assert "forked" in lines, lines
        child = int((lines - {"forked"}).pop())
        with pytest.raises(OutputError, match="another captioner is writing to it"):
            JsonlFile(out)
        holder.kill()
        holder.wait()
        os.kill(child, 0)  # the child outlives its parent
        JsonlFile(out).close()
    finally:
        holder.kill()
        holder.wait()
        if child:
            os.kill(child, signal.SIGKILL)


def test_merge_follows_the_inputs_and_refuses_gaps_twins_and_strangers(tmp_path):
    parts = [tmp_path / "p0.jsonl", tmp_path / "p1.jsonl"]
    parts[0].write_bytes(record_line("c.jpg") + record_line("a.jpg"))
    parts[1].write_bytes(record_line("b.jpg"))
    out = tmp_path / "all.jsonl"
    assert merge(["a.jpg", "b.jpg", "c.jpg"], parts, out) == 0
    assert out.read_bytes() == record_line("a.jpg") + record_line("b.jpg") + record_line("c.jpg")
    with pytest.raises(DataError, match=r"1 input files have no record \(e.g. d.jpg\)"):
        merge(["a.jpg", "b.jpg", "c.jpg", "d.jpg"], parts, tmp_path / "other.jsonl")
    with pytest.raises(DataError, match=r"1 records are of files not among the inputs \(e.g. c.jpg\)"):
        merge(["a.jpg", "b.jpg"], parts, tmp_path / "other.jsonl")
    parts[1].write_bytes(record_line("b.jpg") + record_line("a.jpg", "another caption"))
    with pytest.raises(DataError, match=r"1 files have more than one record \(e.g. a.jpg\)"):
        merge(["a.jpg", "b.jpg", "c.jpg"], parts, tmp_path / "other.jsonl")
    assert not (tmp_path / "other.jsonl").exists()
    parts[1].write_bytes(record_line("b.jpg") + record_line("d.jpg")[:20])
    with pytest.raises(DataError, match="last line is torn"):
        merge(["a.jpg", "b.jpg", "c.jpg"], parts, out)
    parts[1].write_bytes(record_line("b.jpg"))
    out.write_bytes(record_line("z.jpg"))  # an existing file whose records the merge would lose
    with pytest.raises(OutputError, match=r"holds 1 records the merge would not \(e.g. z.jpg\)"):
        merge(["a.jpg", "b.jpg", "c.jpg"], parts, out)
    assert out.read_bytes() == record_line("z.jpg")
    out.unlink()
    link = tmp_path / "link.jsonl"
    link.symlink_to(parts[1])  # caption runs leave out the file they write, so no part has a record of one
    assert merge(["a.jpg", str(parts[0]), "b.jpg", str(link), "c.jpg"], parts, out) == 0
    assert out.read_bytes() == record_line("a.jpg") + record_line("b.jpg") + record_line("c.jpg")


def test_default_parts_are_found_when_out_holds_glob_characters(tmp_path):
    names = ["caps[v2].rank-0.jsonl", "caps[v2].rank-1.jsonl", "capsv.rank-2.jsonl", "caps[v2].rank-x.jsonl"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    assert default_parts(tmp_path / "caps[v2].jsonl") == [tmp_path / names[0], tmp_path / names[1]]


def test_tab_output_prints_any_file_name_as_its_bytes(monkeypatch):
    """A name that is not UTF-8 prints as its bytes, even on a strict UTF-8 stdout (PYTHONIOENCODING=utf-8:strict)."""
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    monkeypatch.setattr(sys, "stdout", stdout)
    name = os.fsdecode(b"caf\xe9.jpg")  # Latin-1
    for json_lines in (False, True):
        StandardOutput(json_lines).write([json.loads(record_line(name))])
    assert stdout.buffer.getvalue() == b"caf\xe9.jpg\ta dog runs\n" + record_line(name)


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "red.png"
    Image.new("RGB", (32, 32), "red").save(path)
    return path


@pytest.mark.parametrize("args, message", [
    (["--shard", "2/2"], "--shard must be I/N with 0 <= I < N"),
    (["--num-workers", "65"], "--num-workers must be between 0 and 64, not 65"),
    (["--num-workers", "-1"], "--num-workers must be between 0 and 64, not -1"),
    (["--files-from", "/nonexistent/list.txt"], "--files-from /nonexistent/list.txt: file list not found"),
    (["--out", "/proc/version"], "--out /proc: cannot write there"),
])
def test_outside_values_are_checked_before_any_work(image, capsys, args, message):
    assert main(["caption", str(image), *args]) == 2
    assert message in capsys.readouterr().err


def test_out_that_is_a_folder_or_another_file_is_refused(image, tmp_path, capsys):
    assert main(["caption", str(image), "--out", str(tmp_path)]) == 2
    assert f"--out {tmp_path}: not a regular file" in capsys.readouterr().err
    assert main(["caption", str(image), "--out", str(image)]) == 2
    assert "not a captioner JSONL file (line 1 is not a record)" in capsys.readouterr().err
    assert Image.open(image).size == (32, 32)


def test_torchrun_without_out_is_refused(image, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["caption", str(image)]) == 2
    assert "under torchrun, give --out FILE" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- the bundled model
@pytest.fixture(scope="module")
def photos(shared_data, tmp_path_factory) -> Path:
    """A list file of Flickr8k photos."""
    names = sorted((shared_data / "flickr8k" / "images").glob("*.jpg"))[:PHOTOS]
    listing = tmp_path_factory.mktemp("photos") / "list.txt"
    listing.write_text("".join(f"{name}\n" for name in names))
    return listing


@pytest.fixture(scope="module")
def reference(photos, tmp_path_factory) -> bytes:
    """One uninterrupted, unsharded run in this process, images loaded in the main process."""
    out = tmp_path_factory.mktemp("reference") / "captions.jsonl"
    assert main(["caption", "--files-from", str(photos), "--out", str(out), "--num-workers", "0", "-q", *BATCH]) == 0
    return out.read_bytes()


def run_captioner(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "captioner", *args], cwd=ROOT, capture_output=True, input=stdin,
                          timeout=600)


@pytest.mark.slow
def test_records_hold_captions_and_labels_in_input_order(photos, reference):
    records = [json.loads(line) for line in reference.splitlines()]
    assert [r["file"] for r in records] == photos.read_text().splitlines()
    for record in records:
        assert set(record) == {"file", "captions", "labels"} and record["captions"][0]["text"]
        assert record["captions"][0]["log_prob"] <= 0 and len(record["labels"]) == 5
        assert all(0 <= label["probability"] <= 1 for label in record["labels"])


def test_batches_are_encoded_one_ahead_on_half_the_threads(tiny_model, synthetic, monkeypatch):
    """caption_records overlaps the next batch's encode with this one's decode, each stage on half the cores,
    and gives the records of the plain sequential loop, in order, restoring PyTorch's thread count after.

    Both stages are slowed down (0.1 s each) and timed: with the overlap an encode runs while a decode does; a
    sequential loop would leave every encode interval disjoint from every decode interval."""
    files = [str(p) for p in sorted((synthetic / "images").glob("*.png"))[:7]]
    config = tiny_model.generation_config
    expected = [captions[0].text for captions in tiny_model.generate(files, config, batch_size=2)]
    seen_threads, encoded, encodes, decodes = [], [], [], []
    encode_pixels, generate = tiny_model.encode_pixels, tiny_model.generate

    def timed(intervals: list, work):
        start = time.monotonic()
        time.sleep(0.1)
        result = work()
        intervals.append((start, time.monotonic()))
        return result

    def recording_encode(pixels, *args, **kwargs):
        encoded.append(threading.current_thread().name)
        return timed(encodes, lambda: encode_pixels(pixels, *args, **kwargs))

    def recording_generate(*args, **kwargs):
        seen_threads.append(torch.get_num_threads())
        return timed(decodes, lambda: generate(*args, **kwargs))

    monkeypatch.setattr(tiny_model, "encode_pixels", recording_encode)
    monkeypatch.setattr(tiny_model, "generate", recording_generate)
    before = torch.get_num_threads()
    batches = list(caption_records(tiny_model, files, config, batch_size=2, labels=False))
    assert [len(batch) for batch in batches] == [2, 2, 2, 1]
    assert [r["captions"][0]["text"] for batch in batches for r in batch] == expected
    assert [r["file"] for batch in batches for r in batch] == files
    assert all(name.startswith("encode") for name in encoded) and len(encoded) == len(encodes) == 4
    assert seen_threads == [stage_threads()] * 4 and torch.get_num_threads() == before
    overlaps = [(e, d) for e in encodes for d in decodes if e[0] < d[1] and d[0] < e[1]]
    assert len(overlaps) >= 2, (encodes, decodes)  # batches 2, 3 and 4 are each encoded during a decode


def test_out_among_the_inputs_is_not_captioned_under_any_name(tiny_model, image, tmp_path):
    """The file being written is never loaded as an image: by its name, another spelling, a symbolic or hard link."""
    out = tmp_path / "captions.jsonl"
    writer = JsonlFile(out)
    (tmp_path / "symbolic.jsonl").symlink_to(out)
    os.link(out, tmp_path / "hard.jpg")
    files = [str(out), str(image), str(tmp_path / "symbolic.jsonl"), str(tmp_path / "hard.jpg"),
             f"{tmp_path}/./captions.jsonl"]
    try:
        summary = caption_files(tiny_model, files, writer, tiny_model.generation_config, num_workers=0)
    finally:
        writer.close()
    assert [json.loads(line)["file"] for line in out.read_bytes().splitlines()] == [str(image)]
    assert (summary.files, summary.captioned, summary.failed) == (1, 1, 0)


def test_a_killed_loader_worker_is_one_line_and_the_rerun_resumes(tiny_model_dir, synthetic, tmp_path, monkeypatch,
                                                                   capsys):
    files = [str(p) for p in sorted((synthetic / "images").glob("test_*.png"))[:6]]
    out, main_pid = tmp_path / "captions.jsonl", os.getpid()
    pixels = Encoder.pixels

    def killed_at_the_fifth(self, path, *args, **kwargs):  # the worker processes inherit it (forked)
        if path == files[4] and os.getpid() != main_pid:
            os.kill(os.getpid(), signal.SIGKILL)
        return pixels(self, path, *args, **kwargs)

    command = ["caption", *files, "--out", str(out), "--model", str(tiny_model_dir), "--batch-size", "2", "-q"]
    monkeypatch.setattr(Encoder, "pixels", killed_at_the_fifth)
    assert main([*command, "--num-workers", "1"]) == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and re.fullmatch(r"error: an image loading process died \(worker \(pid.*\); the records "
                                             r"written so far are kept, rerun the same command to resume", errors[0])
    kept = out.read_bytes()
    assert not kept or kept.endswith(b"\n")  # whole records only
    monkeypatch.setattr(Encoder, "pixels", pixels)
    assert main([*command, "--num-workers", "0"]) == 0
    records = out.read_bytes()
    assert [json.loads(line)["file"] for line in records.splitlines()] == files
    assert records.startswith(kept) and len(kept.splitlines()) <= 4  # kept: the batches before the fifth file's


@pytest.mark.slow
def test_worker_processes_give_the_same_records(photos, reference, tmp_path):
    out = tmp_path / "captions.jsonl"
    assert main(["caption", "--files-from", str(photos), "--out", str(out), "--num-workers", "2", "-q", *BATCH]) == 0
    assert out.read_bytes() == reference


@pytest.mark.slow
def test_shards_merged_equal_one_run(photos, reference, tmp_path):
    parts = [tmp_path / f"captions-{i}.jsonl" for i in range(3)]
    for i, part in enumerate(parts):
        assert main(["caption", "--files-from", str(photos), "--out", str(part), "--shard", f"{i}/3", "-q", *BATCH]) == 0
    assert [len(part.read_bytes().splitlines()) for part in parts] == [14, 13, 13]
    out = tmp_path / "captions.jsonl"
    assert main(["merge", "--files-from", str(photos), "--parts", *map(str, parts), "--out", str(out), "-q"]) == 0
    assert out.read_bytes() == reference
    assert main(["merge", "--files-from", str(photos), "--parts", *map(str, parts[:2]), "--out", str(out), "-q"]) == 2


@pytest.mark.slow
def test_resume_after_sigkill_gives_the_uninterrupted_output(photos, reference, tmp_path):
    out = tmp_path / "captions.jsonl"
    command = [sys.executable, "-m", "captioner", "caption", "--files-from", str(photos), "--out", str(out),
               "--num-workers", "2", "-q", *BATCH]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (out.exists() and out.read_bytes().count(b"\n") >= 4) and time.monotonic() < deadline:
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    written = out.read_bytes()
    complete = written.count(b"\n")
    assert 4 <= complete < PHOTOS, "killed mid-run"
    assert reference.startswith(written[:written.rindex(b"\n") + 1])
    if written.endswith(b"\n"):  # tear the next record as a kill mid-write would
        out.write_bytes(written + reference.splitlines(keepends=True)[complete][:25])
    assert main(["caption", "--files-from", str(photos), "--out", str(out), "-q", *BATCH]) == 0
    assert out.read_bytes() == reference
    assert main(["caption", "--files-from", str(photos), "--out", str(out), "-q", *BATCH]) == 0  # all done: a no-op
    assert out.read_bytes() == reference


@pytest.mark.slow
def test_two_torchrun_processes_equal_one(photos, reference, tmp_path):
    out = tmp_path / "captions.jsonl"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "captioner", "caption", "--files-from", str(photos), "--out", str(out), "-q", *BATCH],
                            cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert not out.exists()
    ranks = [tmp_path / f"captions.rank-{rank}.jsonl" for rank in range(2)]
    assert [len(part.read_bytes().splitlines()) for part in ranks] == [PHOTOS // 2] * 2
    assert main(["merge", "--files-from", str(photos), "--out", str(out), "-q"]) == 0  # parts found beside --out
    assert out.read_bytes() == reference


@pytest.mark.slow
def test_bad_files_are_reported_skipped_and_counted(photos, reference, tmp_path):
    corrupt, empty = tmp_path / "corrupt.jpg", tmp_path / "empty.png"
    corrupt.write_bytes(b"\xff\xd8 not really a jpeg")
    empty.write_bytes(b"")
    good = photos.read_text().splitlines()[:3]
    listing = [good[0], str(corrupt), good[1], str(tmp_path / "missing.jpg"), str(empty), good[2]]
    out = tmp_path / "captions.jsonl"
    result = run_captioner("caption", "--files-from", "-", "--out", str(out), "-q", *BATCH,
                           stdin="\n".join(listing).encode())
    assert result.returncode == 1
    errors = result.stderr.decode().strip().splitlines()
    assert errors[-1] == "error: 3 of 6 images could not be captioned"
    assert len(errors) == 4 and "Traceback" not in result.stderr.decode()
    for line, name in zip(errors, ("corrupt.jpg", "missing.jpg: file not found", "empty.png: empty file")):
        assert line.startswith("error: ") and name in line
    records = [json.loads(line) for line in out.read_bytes().splitlines()]
    assert [r["file"] for r in records] == listing
    assert [("error" in r) for r in records] == [False, True, False, True, True, False]
    assert [r for r in records if "error" not in r] == [json.loads(line) for line in reference.splitlines()[:3]]
    again = run_captioner("caption", "--files-from", "-", "--out", str(out), "-q", stdin="\n".join(listing).encode())
    assert again.returncode == 1 and again.stderr.decode().strip() == "error: 3 of 6 images could not be captioned"
