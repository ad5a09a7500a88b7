"""Faults and hostile input: signals, concurrent writers, damaged stores and data that does not fit.
Each ends in one line on stderr and exit status 2 (1 for verify finding damage), a state the next
run resumes from, and nothing corrupt."""
import json
import os
import signal
import time

import numpy as np
import pytest

from kdcache import store as stores
from kdcache.store.records import rows_written
from helpers.pausing import alive, descendants, start, wait_for
from helpers.cli import run

SIGNALS = {"SIGINT": (signal.SIGINT, 130, "kdcache: interrupted"), "SIGTERM": (signal.SIGTERM, 143, "kdcache: terminated")}


def stop(proc, name):
    """Send signal `name` to `proc`; assert it ends with its exit status and one line saying so."""
    sig, status, says = SIGNALS[name]
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    lines = err.strip().splitlines()
    assert proc.returncode == status and lines and lines[-1].startswith(says) and "Traceback" not in err, err


def same_arrays(a, b, split):
    with stores.open_store(a) as x, stores.open_store(b) as y:
        names = x.array_names(split)
        assert names == y.array_names(split)
        for name in names:
            np.testing.assert_array_equal(np.asarray(x.read(f"{split}/{name}")), np.asarray(y.read(f"{split}/{name}")))


def _gone(pids, timeout=60.0) -> set:
    """The processes of `pids` still alive after waiting up to `timeout` seconds for them to end."""
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return {p for p in pids if alive(p)}


# --- --jobs: job processes start loader workers, and none outlives the sweep --------------------

def test_a_sweep_stopped_by_sigterm_ends_its_jobs_and_their_workers(tmp_path):
    """Jobs start DataLoader workers (a daemonic job could not), and SIGTERM to the sweep ends them all."""
    ready = tmp_path / "ready"
    ready.mkdir()
    proc = start(["train-student", "--student", "cnn_tiny", "--student", "cnn_small", "--dataset",
                  "helpers.pausing:digits", "--epochs", "50", "--jobs", "2", "--num-workers", "1",
                  "--out", tmp_path / "o"], ready)
    wait_for(ready, proc, count=5)  # the parent, both jobs and loader workers have read samples
    below = descendants(proc.pid)
    assert len(below) >= 4  # two jobs and their workers
    stop(proc, "SIGTERM")
    assert _gone(below) == set()


def test_a_job_killed_outright_stops_the_sweep_with_one_line_instead_of_a_hang(tmp_path):
    from kdcache import train_student
    from kdcache.errors import KDCacheError

    with pytest.raises(KDCacheError, match=r"a job process ended \(exit code -9\).*--resume"):
        train_student(students=["cnn_tiny", "helpers.killed_student:net"], dataset="digits", epochs=1, jobs=2,
                      out=str(tmp_path))


# --- a signal mid-way: a state the next run resumes from, no lock left, the same result ----------

SMALL_BLOCKS = "dtype: float32\nchunk_bytes: 2560\n"  # 64-row blocks of float32 logits: the test split is 6


@pytest.fixture(scope="module")
def small_store(teacher_ckpt, tmp_path_factory):
    from kdcache import dump_teacher

    return dump_teacher(teacher=teacher_ckpt, dataset="digits", splits=["test"], dtype="float32", chunk_bytes=2560,
                        out=str(tmp_path_factory.mktemp("s") / "s.zarr"))


@pytest.mark.parametrize("name", sorted(SIGNALS))
def test_a_dump_stopped_by_a_signal_resumes_to_the_store_of_an_uninterrupted_dump(name, teacher_ckpt, tmp_path, capsys):
    (tmp_path / "small.yaml").write_text(SMALL_BLOCKS)
    argv = ["dump-teacher", "--teacher", teacher_ckpt, "--dataset", "helpers.pausing:test_digits", "--split", "test",
            "--batch-size", "32", "--config", tmp_path / "small.yaml"]
    code, out, err = run(capsys, *argv, "--out", tmp_path / "whole.zarr")
    assert code == 0, err
    ready, store = tmp_path / "ready", tmp_path / "c.zarr"
    ready.mkdir()
    proc = start([*argv, "--out", store], ready, pause_at=200)  # stopped at about row 180 of 360
    wait_for(ready / "paused", proc)
    stop(proc, name)
    assert not os.path.exists(f"{store}.lock") and not store.exists()
    with stores.open_store(f"{store}.partial") as s:
        assert rows_written(s, "test") >= 128  # the whole blocks before the signal are on record
    code, out, err = run(capsys, *argv, "--out", store, "--resume")
    assert code == 0, err
    same_arrays(store, tmp_path / "whole.zarr", "test")


@pytest.mark.parametrize("name", sorted(SIGNALS))
def test_a_convert_stopped_by_a_signal_resumes_and_a_second_convert_to_its_dst_is_refused(name, small_store, tmp_path,
                                                                                       capsys):
    argv = ["convert", small_store, tmp_path / "c.zarr", "--dtype", "float16"]
    code, out, err = run(capsys, "convert", small_store, tmp_path / "whole.zarr", "--dtype", "float16")
    assert code == 0, err
    ready = tmp_path / "ready"
    ready.mkdir()
    proc = start(argv, ready, pause_at=4, module="helpers.pausing")  # in DST's second 128-row block
    wait_for(ready / "paused", proc)
    code, out, err = run(capsys, *argv)
    assert code == 2 and "another convert" in err and len(err.strip().splitlines()) == 1, err
    stop(proc, name)
    assert not os.path.exists(tmp_path / "c.zarr.lock") and not (tmp_path / "c.zarr").exists()
    with stores.open_store(tmp_path / "c.zarr.partial") as s:
        assert rows_written(s, "test") >= 128
    code, out, err = run(capsys, *argv, "--resume")
    assert code == 0, err
    same_arrays(tmp_path / "c.zarr", tmp_path / "whole.zarr", "test")


def _metrics(folder):
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in open(folder / "metrics.jsonl")]


@pytest.mark.parametrize("name", sorted(SIGNALS))
def test_a_training_stopped_by_a_signal_resumes_and_a_second_training_into_its_out_is_refused(name, tmp_path, capsys):
    argv = ["train-student", "--student", "cnn_tiny", "--dataset", "helpers.pausing:few_digits", "--epochs", "2",
            "--batch-size", "64"]
    code, out, err = run(capsys, *argv, "--out", tmp_path / "whole")
    assert code == 0, err
    ready, run_out = tmp_path / "ready", tmp_path / "o"
    ready.mkdir()
    proc = start([*argv, "--out", run_out], ready, pause_at=256 + 100)  # in epoch 2 of 256 samples
    wait_for(ready / "paused", proc)
    code, out, err = run(capsys, *argv, "--out", run_out)
    assert code == 2 and "another training" in err and len(err.strip().splitlines()) == 1, err
    stop(proc, name)
    assert not os.path.exists(f"{run_out}.lock") and (run_out / "cnn_tiny" / "last.pt").exists()
    code, out, err = run(capsys, *argv, "--out", run_out, "--resume")
    assert code == 0, err
    resumed, whole = _metrics(run_out / "cnn_tiny"), _metrics(tmp_path / "whole" / "cnn_tiny")
    assert len(resumed) == len(whole) == 2
    for a, b in zip(resumed, whole):  # float32 sums in another process: equal to well above its resolution
        assert a == pytest.approx(b, rel=1e-5)


# --- damaged store files: one line for every command that reads them ---------------------------

def _truncate(path, keep=0.5):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])


def _future(path):
    s = stores.open_store(path, read_only=False)
    s.update_attrs({"schema_version": stores.SCHEMA_VERSION + 1})
    s.close()


def _commands(store, tmp_path):
    yield ["inspect", store]
    yield ["verify", store]
    yield ["train-student", "--cache", store, "--student", "cnn_tiny", "--epochs", "1", "--out", tmp_path / "o"]
    yield ["convert", store, tmp_path / "converted.zarr", "--dtype", "float16"]


@pytest.mark.parametrize("metadata", ["train/zarr.json", "train/logits/zarr.json", "test/labels/zarr.json"])
@pytest.mark.parametrize("keep", [0.5, 0.0])
def test_a_truncated_zarr_json_below_the_root_is_one_line_for_every_command(metadata, keep, fp32_cache, tmp_path,
                                                                              capsys):
    import shutil

    store = tmp_path / "c.zarr"
    shutil.copytree(fp32_cache, store)
    _truncate(store / metadata, keep)
    for argv in _commands(store, tmp_path):
        code, out, err = run(capsys, *argv)
        assert code == 2 and err.strip().splitlines() == [err.strip()] and metadata in err, (argv[0], err)
        assert "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["c.zarr"]  # nothing trained, nothing converted


@pytest.mark.parametrize("damage", ["truncated h5", "future zarr", "future h5"])
def test_a_truncated_hdf5_file_or_a_newer_schema_is_one_line_for_every_command(damage, fp32_cache, tmp_path, capsys):
    from kdcache.convert import convert_store

    store = tmp_path / ("c.h5" if damage.endswith("h5") else "c.zarr")
    convert_store(fp32_cache, str(store))
    (_truncate if damage.startswith("truncated") else _future)(store)
    for argv in _commands(store, tmp_path):
        code, out, err = run(capsys, *argv)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (argv[0], err)
    assert sorted(os.listdir(tmp_path)) == [store.name]


# --- data that does not fit: one line before any training step -----------------------------------

def _refused(capsys, tmp_path, *argv, says=""):
    before = sorted(os.listdir(tmp_path))
    code, out, err = run(capsys, *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1 and says in err and "Traceback" not in err, err
    assert sorted(os.listdir(tmp_path)) == before  # nothing written


def test_an_empty_or_one_sample_training_split_is_one_line(capsys, tmp_path):
    for name, says in (("empty", "is empty"), ("one_sample", "one sample")):
        _refused(capsys, tmp_path, "train-student", "--student", "cnn_tiny", "--dataset", f"helpers.odd_data:{name}",
                 "--epochs", "1", "--out", tmp_path / "o", says=says)


@pytest.mark.parametrize("name", ["label_out_of_range", "negative_label"])
def test_labels_outside_the_classes_are_one_line_for_training_and_dump(name, teacher_ckpt, capsys, tmp_path):
    _refused(capsys, tmp_path, "train-student", "--student", "cnn_tiny", "--dataset", f"helpers.odd_data:{name}",
             "--epochs", "1", "--out", tmp_path / "o", says="outside its 10 classes")
    _refused(capsys, tmp_path, "dump-teacher", "--teacher", teacher_ckpt, "--dataset", f"helpers.odd_data:{name}",
             "--out", tmp_path / "c.zarr", says="outside its 10 classes")


def test_images_of_another_size_are_one_line_for_training_and_dump(teacher_ckpt, capsys, tmp_path):
    code, out, err = run(capsys, "train-student", "--student", "cnn_tiny", "--dataset", "helpers.odd_data:mixed_sizes",
                         "--epochs", "1", "--batch-size", "256", "--out", tmp_path / "o")
    assert code == 2 and err.strip().splitlines() == [err.strip()] and "different shapes" in err, err
    code, out, err = run(capsys, "dump-teacher", "--teacher", teacher_ckpt, "--dataset", "helpers.odd_data:mixed_sizes",
                         "--out", tmp_path / "c.zarr")
    assert code == 2 and err.strip().splitlines() == [err.strip()] and "different shapes" in err, err


@pytest.fixture(scope="module")
def corrupt_folder(tmp_path_factory):
    """An imagefolder of 16x16 PNGs, two classes, with one truncated PNG in train/a."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    for split in ("train", "test"):
        for c, name in enumerate("ab"):
            os.makedirs(root / split / name)
            for i in range(4):
                pixels = np.random.default_rng(10 * c + i).integers(0, 256, (16, 16, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    data = (root / "train" / "a" / "2.png").read_bytes()
    (root / "train" / "a" / "2.png").write_bytes(data[: len(data) // 2])
    return root


@pytest.mark.parametrize("workers", ["0", "1"])
def test_a_corrupt_png_in_an_imagefolder_is_one_line_naming_it(workers, corrupt_folder, capsys, tmp_path):
    dataset = f"imagefolder:{corrupt_folder}"
    code, out, err = run(capsys, "train-student", "--student", "cnn_tiny", "--dataset", dataset, "--epochs", "1",
                         "--num-workers", workers, "--out", tmp_path / "o")
    assert code == 2 and err.strip().splitlines() == [err.strip()] and "train/a/2.png' cannot be read" in err, err
    code, out, err = run(capsys, "dump-teacher", "--teacher", "cnn_tiny", "--random-teacher", "--dataset", dataset,
                         "--num-workers", workers, "--out", tmp_path / "c.zarr")
    assert code == 2 and err.strip().splitlines() == [err.strip()] and "train/a/2.png' cannot be read" in err, err


def test_a_dataset_changed_after_its_dump_is_refused_before_training(teacher_ckpt, capsys, tmp_path, monkeypatch):
    dataset = "helpers.odd_data:changed_after_dump"
    code, out, err = run(capsys, "dump-teacher", "--teacher", teacher_ckpt, "--dataset", dataset, "--out",
                         tmp_path / "c.zarr")
    assert code == 0, err
    for change in ("pixel", "length"):
        monkeypatch.setenv("KDCACHE_TEST_CHANGED", change)
        _refused(capsys, tmp_path, "train-student", "--cache", tmp_path / "c.zarr", "--student", "cnn_tiny",
                 "--dataset", dataset, "--epochs", "1", "--out", tmp_path / "o", says="fingerprint")
