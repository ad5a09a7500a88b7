"""--jobs N: the students of a sweep trained side by side in N processes, with the results of a
sweep trained one after another."""
import csv

import pytest

from kdcache import train_student
from kdcache.errors import KDCacheError


def test_two_jobs_train_a_sweep_to_the_same_students_as_one_process(fp32_cache, tmp_path, capfd):
    sweep = dict(cache=fp32_cache, dataset="digits", students=["cnn_tiny", "resnet8"], epochs=1, batch_size=128)
    parallel = train_student(out=str(tmp_path / "jobs"), jobs=2, **sweep)
    said = capfd.readouterr().out  # the jobs' lines too: they write to the same stdout
    assert said.count("teacher targets:") == 1 and said.count("epoch 1/1: loss") == 2
    serial = train_student(out=str(tmp_path / "one"), **sweep)
    assert [(r["student"], r["kind"]) for r in parallel] == [("cnn_tiny", "kd"), ("resnet8", "kd")]
    for a, b in zip(parallel, serial):  # same seed, same order, same data: each job trains the same student
        assert a["top1"] == pytest.approx(b["top1"], abs=0.3)  # a job may run on fewer threads: last-bit sums
        assert a["step_losses"] == pytest.approx(b["step_losses"], rel=1e-3)
    with open(tmp_path / "jobs" / "summary.csv") as f:
        assert [row["student"] for row in csv.DictReader(f)] == ["cnn_tiny", "resnet8"]
    assert (tmp_path / "jobs" / "resnet8" / "model.pt").exists()


def test_a_failing_job_stops_the_sweep_with_its_message(fp32_cache, tmp_path):
    with pytest.raises(KDCacheError, match="helpers.students:explodes.*simulated failure"):
        train_student(cache=fp32_cache, dataset="digits", students=["cnn_tiny", "helpers.students:explodes"],
                      epochs=1, jobs=2, out=str(tmp_path / "bad"))


def test_jobs_under_torchrun_are_refused(monkeypatch, fp32_cache):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(KDCacheError, match="--jobs"):
        train_student(cache=fp32_cache, dataset="digits", students=["cnn_tiny"], jobs=2)
