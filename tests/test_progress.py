"""What a person running kdcache sees: a line per epoch, each student's result as soon as it is
trained, progress lines from long loops when stdout is not a terminal, and curves per student."""
import logging
import os
import re

from kdcache import dump_teacher, progress, train_student

EPOCH = re.compile(r"^(\S+) (\S+) epoch (\d+)/(\d+): loss [\d.]+ \(task [\d.]+(, kd [\d.]+)?\)  top1 +[\d.]+"
                   r"(  agree +[\d.]+)?  [\d.]+s$")


def test_training_prints_one_line_per_epoch_and_each_student_when_it_finishes(fp32_cache, tmp_path, capsys):
    train_student(students=["cnn_tiny", "cnn_small"], cache=fp32_cache, epochs=2, baseline=True, out=str(tmp_path))
    lines = capsys.readouterr().out.splitlines()
    epochs = [m.groups() for m in map(EPOCH.match, lines) if m]
    assert [(g[0], g[1], g[2]) for g in epochs] == [
        (s, k, e) for s, k in (("cnn_tiny", "kd"), ("cnn_small", "kd"), ("cnn_tiny", "baseline"), ("cnn_small", "baseline"))
        for e in ("1", "2")]
    assert all(g[4] for g in epochs if g[1] == "kd") and not any(g[4] for g in epochs if g[1] == "baseline")
    # cnn_tiny's result comes before cnn_small's first epoch, not at the end of the sweep
    done = next(i for i, line in enumerate(lines) if re.match(r"^ +cnn_tiny +kd +top1", line))
    first_small = next(i for i, line in enumerate(lines) if line.startswith("cnn_small kd epoch 1/2"))
    assert done < first_small
    for folder in ("cnn_tiny", "cnn_small", "cnn_tiny-baseline"):
        assert os.path.getsize(tmp_path / folder / "curves.png") > 1000


def test_the_kdcache_logger_can_be_silenced_by_python_callers(tmp_path, capsys):
    logger = logging.getLogger("kdcache")
    logger.setLevel(logging.WARNING)
    try:
        train_student(students=["cnn_tiny"], epochs=1, out=str(tmp_path))
    finally:
        logger.setLevel(logging.INFO)
    assert capsys.readouterr().out == ""


def test_a_dump_not_on_a_terminal_prints_progress_lines(teacher_ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(progress, "LINE_SECONDS", 0.0)  # every batch may print: what a long dump does every 10 s
    dump_teacher(teacher=teacher_ckpt, dataset="digits", out=str(tmp_path / "c.zarr"), batch_size=256)
    lines = capsys.readouterr().out.splitlines()
    seen = [line for line in lines if re.match(r"^dump train: [\d,]+/1,437 samples \(\d+%\), [\d,]+ samples/s, ETA", line)]
    assert len(seen) >= 3


def test_progress_lines_are_rate_limited_and_read_lazy_values_only_when_shown(capsys, monkeypatch):
    clock = iter(float(t) for t in range(0, 1000, 3))  # every call to the clock is 3 s later
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    reads = []
    p = progress.Progress(100, "work")
    for _ in range(10):
        p.update(5, loss=lambda: reads.append(1) or 0.5)
    lines = capsys.readouterr().out.splitlines()
    assert 0 < len(lines) < 10 and all(line.startswith("work: ") and "loss 0.5" in line for line in lines)
    assert len(reads) == len(lines)  # the value was computed only for the lines shown


def test_a_trainings_progress_lines_show_the_loss_by_part(fp32_cache, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(progress, "LINE_SECONDS", 0.0)  # every batch may print: what a long epoch does every 10 s
    train_student(students=["cnn_tiny"], cache=fp32_cache, epochs=1, out=str(tmp_path))
    lines = [line for line in capsys.readouterr().out.splitlines() if "samples/s" in line]
    assert lines and all(re.match(r"^cnn_tiny kd epoch 1/1: [\d,]+/1,437 samples \(\d+%\), [\d,]+ samples/s, ETA \S+, "
                                  r"loss [\d.e-]+, task [\d.e-]+, kd [\d.e-]+$", line) for line in lines), lines


def test_on_a_terminal_progress_is_a_bar_with_rate_eta_and_the_values_given(capsys, monkeypatch):
    import itertools

    import tqdm.std

    clock = itertools.count(0.0, 3.0)  # every call to a clock is 3 s later: the bar redraws at each update
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(tqdm.std, "time", lambda: next(clock))
    monkeypatch.setattr(progress, "is_terminal", lambda: True)
    with progress.Progress(100, "work") as p:
        for _ in range(10):
            p.update(10, loss=lambda: 0.5, task=0.25)
    drawn = capsys.readouterr().out.split("\r")
    assert any(re.match(r"work:  50%.*\[[\d:]+<[\d:]+, .*samples.*, loss=0.5, task=0.25\]", bar) for bar in drawn), drawn
    assert not any(line.startswith("work: ") and "ETA" in line for line in drawn)  # a bar, not plain lines
