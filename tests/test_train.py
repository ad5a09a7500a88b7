"""train-student: the cache changes the cost of KD, not its result; runs record how they were made."""
import csv
import os
import json

import pytest
import torch
import torch.nn.functional as F

from kdcache import train_student
from kdcache.errors import KDCacheError
from kdcache.models import build_teacher
from kdcache.train import lr_factor, objective
from kdcache.config import TrainConfig
from helpers.interrupted import kill_in_epoch

FAST = dict(dataset="digits", epochs=1, batch_size=128)


def test_training_from_an_fp32_cache_matches_online_kd_step_for_step(teacher_ckpt, fp32_cache, tmp_path):
    cached = train_student(cache=fp32_cache, students=["cnn_tiny"], out=str(tmp_path / "a"), alpha=0.7,
                           alpha_schedule="linear", **FAST)
    online = train_student(teacher=teacher_ckpt, students=["cnn_tiny"], out=str(tmp_path / "b"), alpha=0.7,
                           alpha_schedule="linear", **FAST)
    a, b = cached[0]["step_losses"], online[0]["step_losses"]
    assert len(a) == len(b) == 12
    for step, (x, y) in enumerate(zip(a, b)):
        assert abs(x - y) <= 1e-5 * max(1.0, abs(y)), (step, x, y)
    assert cached[0]["kind"] == "kd" and online[0]["kind"] == "online_kd"


def test_kd_objective_matches_a_hand_computation():
    s = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    t = torch.tensor([[1.0, 1.5, -0.5], [3.0, -1.0, 0.0]])
    y = torch.tensor([0, 2])
    T, alpha = 2.0, 0.3
    ps, pt = F.softmax(s / T, 1), F.softmax(t / T, 1)
    kl = (pt * (pt.log() - ps.log())).sum(1).mean()
    ce = -F.log_softmax(s, 1)[torch.arange(2), y].mean()
    cfg = TrainConfig(students=["x"], temperature=T)
    parts = objective(s, y, {"logits": t}, alpha, cfg)
    torch.testing.assert_close(parts["loss"], (1 - alpha) * ce + alpha * T * T * kl)
    torch.testing.assert_close(parts["kd_loss"], T * T * kl)
    torch.testing.assert_close(parts["task_loss"], ce)


def test_lr_schedules_start_at_the_base_lr_and_decay():
    assert lr_factor("cos", 0) == 1 and lr_factor("cos", 1) == pytest.approx(0)
    assert [lr_factor("step", p) for p in (0, 0.6, 0.9)] == pytest.approx([1, 0.1, 0.01])


def test_a_sweep_with_baselines_writes_metrics_checkpoints_and_a_summary(fp32_cache, tmp_path):
    out = tmp_path / "sweep"
    rows = train_student(cache=fp32_cache, students=["cnn_tiny", "resnet8"], baseline=True, out=str(out),
                         alpha_schedule="cos", **FAST)
    assert [(r["student"], r["kind"]) for r in rows] == [("cnn_tiny", "kd"), ("resnet8", "kd"),
                                                          ("cnn_tiny", "baseline"), ("resnet8", "baseline")]
    with open(out / "summary.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4 and float(table[0]["teacher_top1"]) > 50
    assert (out / "summary.png").stat().st_size > 1000
    lines = [json.loads(l) for l in open(out / "cnn_tiny" / "metrics.jsonl")]
    assert lines[0]["epoch"] == 1 and {"top1", "top5", "agreement", "kd_loss", "alpha"} <= set(lines[0])
    assert "kd_loss" not in json.loads(open(out / "cnn_tiny-baseline" / "metrics.jsonl").readline())
    # a checkpoint needs nothing else to serve as a teacher
    model, info = build_teacher(str(out / "resnet8" / "model.pt"), num_classes=10)
    assert info["arch"] == "resnet8" and model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert json.load(open(out / "resnet8" / "config.json"))["cache"] == fp32_cache


def test_same_seed_gives_the_same_student(fp32_cache, tmp_path):
    a = train_student(cache=fp32_cache, students=["cnn_tiny"], out=str(tmp_path / "a"), **FAST)
    b = train_student(cache=fp32_cache, students=["cnn_tiny"], out=str(tmp_path / "b"), **FAST)
    assert a[0]["step_losses"] == b[0]["step_losses"]


def test_trained_students_are_not_overwritten_by_accident(fp32_cache, tmp_path):
    train_student(cache=fp32_cache, students=["cnn_tiny"], out=str(tmp_path), **FAST)
    with pytest.raises(KDCacheError, match="--overwrite"):
        train_student(cache=fp32_cache, students=["cnn_tiny"], out=str(tmp_path), **FAST)


def test_a_cache_is_never_joined_to_other_data(fp32_cache, tmp_path):
    with pytest.raises(KDCacheError, match="fingerprint"):
        train_student(cache=fp32_cache, students=["cnn_tiny"], out=str(tmp_path), dataset="fake:size=1437,classes=10")


def _metrics(folder):
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in open(folder / "metrics.jsonl")]


def test_killed_training_resumes_from_its_last_epoch_to_the_same_metrics(fp32_cache, tmp_path, monkeypatch):
    opts = dict(cache=fp32_cache, students=["cnn_tiny"], dataset="digits", epochs=3, batch_size=128,
                alpha_schedule="linear")
    train_student(out=str(tmp_path / "full"), **opts)
    revive = kill_in_epoch(monkeypatch, 3)
    with pytest.raises(RuntimeError, match="killed"):
        train_student(out=str(tmp_path / "run"), **opts)
    run = tmp_path / "run" / "cnn_tiny"
    assert (run / "last.pt").exists() and not (run / "model.pt").exists() and len(_metrics(run)) == 2
    revive()
    train_student(out=str(tmp_path / "run"), resume=True, **opts)
    assert _metrics(run) == _metrics(tmp_path / "full" / "cnn_tiny")
    assert not (run / "last.pt").exists()


def test_a_damaged_training_state_is_one_line_on_resume(fp32_cache, tmp_path, monkeypatch):
    opts = dict(cache=fp32_cache, students=["cnn_tiny"], dataset="digits", epochs=2, batch_size=128,
                out=str(tmp_path))
    revive = kill_in_epoch(monkeypatch, 2)
    with pytest.raises(RuntimeError, match="killed"):
        train_student(**opts)
    revive()
    state = tmp_path / "cnn_tiny" / "last.pt"
    state.write_bytes(state.read_bytes()[:5000])  # truncated, as by a full disk or a bad copy
    with pytest.raises(KDCacheError, match="training state .*last.pt cannot be restored .*pass --overwrite"):
        train_student(resume=True, **opts)
    assert train_student(overwrite=True, **opts)[0]["top1"] > 0


def test_a_resumed_sweep_skips_students_already_finished(fp32_cache, tmp_path, capsys):
    train_student(cache=fp32_cache, students=["cnn_tiny"], out=str(tmp_path), **FAST)
    stamp = (tmp_path / "cnn_tiny" / "model.pt").stat().st_mtime_ns
    rows = train_student(cache=fp32_cache, students=["cnn_tiny", "resnet8"], out=str(tmp_path), resume=True, **FAST)
    assert (tmp_path / "cnn_tiny" / "model.pt").stat().st_mtime_ns == stamp
    assert [r["student"] for r in rows] == ["cnn_tiny", "resnet8"] and rows[0]["top1"] > 0
    assert len(open(tmp_path / "summary.csv").readlines()) == 3


def test_verify_before_training_refuses_a_corrupted_cache(fp32_cache, tmp_path):
    import shutil

    cache = str(tmp_path / "c.zarr")
    shutil.copytree(fp32_cache, cache)
    os.remove(os.path.join(cache, "train", "logits", "c", "0", "0", "0"))
    with pytest.raises(KDCacheError, match="fails verification"):
        train_student(cache=cache, students=["cnn_tiny"], out=str(tmp_path / "o"), verify=True, **FAST)
    assert not (tmp_path / "o").exists()
