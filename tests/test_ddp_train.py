"""train-student under torchrun: one student trained with DDP over 2 gloo processes on the CPU
matches the 1-process run with the same global batch and seed; metrics and checkpoint written once."""
import json
import os

import pytest

from helpers.torchrun import kdcache
from kdcache import train_student

def metrics(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def runs(fp32_cache, tmp_path_factory):
    """The same sweep (a BN-free student and cnn_tiny), 2 epochs, trained by 2 DDP processes and by 1."""
    out = tmp_path_factory.mktemp("ddp")
    args = ["train-student", "--cache", fp32_cache, "--dataset", "digits", "--student", "helpers.students:no_bn",
            "--student", "cnn_tiny", "--epochs", "2", "--batch-size", "64", "--seed", "3"]
    done = kdcache([*args, "--out", str(out / "two")], nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    train_student(cache=fp32_cache, dataset="digits", students=["helpers.students:no_bn", "cnn_tiny"], epochs=2,
                  batch_size=64, seed=3, out=str(out / "one"))
    return out / "two", out / "one", done.stdout


def test_ddp_without_batchnorm_follows_the_single_process_run(runs):
    two, one, _ = runs
    a, b = metrics(two / "helpers.students.no_bn"), metrics(one / "helpers.students.no_bn")
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):  # the global batch's mean gradient either way: equal up to float summation order
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4)
        assert abs(x["top1"] - y["top1"]) <= 0.3  # at most one of 360 test images flips


def test_ddp_with_batchnorm_matches_within_its_stated_tolerance(runs):
    two, one, _ = runs
    a, b = metrics(two / "cnn_tiny"), metrics(one / "cnn_tiny")
    # BatchNorm normalises each rank's half batch with its own statistics: the runs drift apart a
    # little; the README states this tolerance (train loss within 5%, top-1 within 5 points)
    assert a[-1]["loss"] == pytest.approx(b[-1]["loss"], rel=0.05)
    assert abs(a[-1]["top1"] - b[-1]["top1"]) <= 5.0


def test_metrics_and_checkpoint_are_written_once(runs):
    two, _, stdout = runs
    assert stdout.count("student ") == 1  # the summary table: rank 0 alone prints it
    assert len(metrics(two / "cnn_tiny")) == 2  # one line per epoch, not one per rank
    assert os.path.exists(two / "cnn_tiny" / "model.pt") and not os.path.exists(two / "cnn_tiny" / "last.pt")
    config = json.load(open(two / "cnn_tiny" / "config.json"))
    assert config["world_size"] == 2
