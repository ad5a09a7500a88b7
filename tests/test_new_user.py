"""What a newcomer meets on the command line: advice that works when followed, no silent
defaults, and one line with exit status 2 for whatever is wrong with the input."""
import os

import pytest

from helpers.cli import one_line, run
from helpers.interrupted import kill_in_epoch


@pytest.fixture
def interrupted(teacher_ckpt, tmp_path):
    """An interrupted dump: X.partial on disk, X absent."""
    from kdcache import store as stores

    path = str(tmp_path / "c.zarr")
    s = stores.create_store(path + ".partial")
    s.update_attrs({"schema_version": stores.SCHEMA_VERSION, "complete": False})
    s.close()
    return path


def test_training_from_a_partial_store_advises_resuming_the_real_path(interrupted, capsys):
    code, _, err = run(capsys, "train-student", "--cache", interrupted + ".partial", "--student", "cnn_tiny")
    line = one_line(err)
    assert code == 2 and f"--out {interrupted} --resume" in line and f"--out {interrupted}.partial" not in line


def test_a_dump_pointed_at_a_partial_path_never_reports_success(interrupted, teacher_ckpt, capsys):
    code, out, err = run(capsys, "dump-teacher", "--teacher", teacher_ckpt, "--dataset", "digits",
                         "--out", interrupted + ".partial", "--resume")
    line = one_line(err)
    assert code == 2 and f"pass --out {interrupted} --resume" in line and "wrote" not in out
    assert not os.path.exists(interrupted + ".partial.partial")


def test_a_teacher_given_by_name_without_weights_is_refused_unless_asked_for(capsys, tmp_path):
    code, _, err = run(capsys, "dump-teacher", "--teacher", "cnn_tiny", "--dataset", "digits", "--out", tmp_path / "c.zarr")
    assert code == 2 and "randomly initialised" in one_line(err) and "--random-teacher" in err
    assert not os.listdir(tmp_path)
    code, _, err = run(capsys, "train-student", "--teacher", "cnn_tiny", "--student", "cnn_tiny", "--dataset", "digits",
                       "--out", tmp_path / "o")
    assert code == 2 and "--weights FILE" in one_line(err)
    code, out, err = run(capsys, "dump-teacher", "--teacher", "cnn_tiny", "--random-teacher", "--dataset", "digits",
                         "--split", "test", "--out", tmp_path / "c.zarr")
    assert code == 0, err


def test_online_kd_takes_a_teacher_by_name_with_its_weights(teacher_ckpt, capsys, tmp_path):
    import torch

    from kdcache.models import load_checkpoint

    weights = tmp_path / "w.pt"
    torch.save(load_checkpoint(teacher_ckpt)["state_dict"], weights)  # a plain state dict, as users have them
    code, out, err = run(capsys, "train-student", "--teacher", "cnn_small", "--weights", weights, "--student", "cnn_tiny",
                         "--dataset", "digits", "--epochs", "1", "--out", tmp_path / "o")
    assert code == 0, err
    teacher_top1 = float(out.strip().splitlines()[-1].split()[-1])  # the table's teacher row: the trained one
    assert "online_kd epoch 1/1" in out and teacher_top1 > 50


def test_a_users_module_in_the_current_folder_works_without_pythonpath(tmp_path, monkeypatch, capsys):
    (tmp_path / "mynets.py").write_text(
        "import torch\n"
        "def tiny(num_classes, in_chans=1):\n"
        "    return torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(),\n"
        "                               torch.nn.Linear(in_chans * 16, num_classes))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    code, out, err = run(capsys, "train-student", "--student", "mynets:tiny", "--dataset", "digits", "--epochs", "1",
                         "--out", "o")
    assert code == 0, err
    assert os.path.exists(tmp_path / "o" / "mynets.tiny" / "model.pt")  # no colon in a folder name


def test_layers_lists_a_checkpoints_modules(teacher_ckpt, capsys):
    code, out, err = run(capsys, "layers", teacher_ckpt)
    assert code == 0, err
    names = [line.split()[0] for line in out.splitlines()]
    assert "conv1.conv" in names and "layer1" in names  # the trained cnn_small's modules
    code, _, err = run(capsys, "layers", teacher_ckpt + ".missing.pt")  # a path, not a model to suggest names for
    assert code == 2 and "checkpoint" in one_line(err) and "does not exist" in err and "did you mean" not in err


def test_inspect_shows_what_a_store_was_converted_from(fp32_cache, tmp_path, capsys):
    from kdcache.convert import convert_store

    top4 = convert_store(fp32_cache, str(tmp_path / "k4.zarr"), topk=4)
    top2 = convert_store(top4, str(tmp_path / "k2.h5"), topk=2)
    code, out, err = run(capsys, "inspect", top2)
    converted = [line for line in out.splitlines() if line.startswith("converted")]
    assert code == 0 and len(converted) == 2, out
    assert top4 in converted[0] and fp32_cache in converted[1] and "float32" in converted[1]


def test_top5_is_not_reported_for_five_classes_or_fewer(tmp_path):
    from kdcache import train_student

    row, = train_student(students=["cnn_tiny"], dataset="fake:size=64,classes=2,image=16", epochs=1, out=str(tmp_path))
    assert row["top5"] is None and row["top1"] is not None


def test_an_imagefolder_keeps_its_images_size_unless_told_and_refuses_unknown_options(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from kdcache.data import load_split
    from kdcache.errors import KDCacheError

    for i, cls in enumerate(("cat", "dog")):
        (tmp_path / "train" / cls).mkdir(parents=True)
        Image.fromarray(np.full((32, 32, 3), 40 * i, dtype=np.uint8)).save(tmp_path / "train" / cls / "a.png")
    assert load_split(f"imagefolder:{tmp_path}", "train").dataset[0][0].shape == (3, 32, 32)  # not a silent 224
    assert load_split(f"imagefolder:{tmp_path},image=24", "train").dataset[0][0].shape == (3, 24, 24)
    for bad, says in (("size=32", "takes one option, image=SIZE"), ("image=big", "not a size in pixels")):
        with pytest.raises(KDCacheError, match=says):
            load_split(f"imagefolder:{tmp_path},{bad}", "train")
    code, _, err = run(capsys, "train-student", "--student", "cnn_tiny", "--dataset", f"imagefolder:{tmp_path},size=32",
                       "--out", tmp_path / "o")
    assert code == 2 and "image=SIZE" in one_line(err)


def test_rerunning_a_killed_training_without_resume_is_refused_not_started_over(tmp_path, capsys, monkeypatch):
    from kdcache import train_student

    revive = kill_in_epoch(monkeypatch, 2)
    with pytest.raises(RuntimeError):
        train_student(students=["cnn_tiny"], dataset="digits", epochs=2, out=str(tmp_path))
    revive()
    assert (tmp_path / "cnn_tiny" / "last.pt").exists()
    code, _, err = run(capsys, "train-student", "--student", "cnn_tiny", "--dataset", "digits", "--epochs", "2",
                       "--out", tmp_path)
    assert code == 2 and "interrupted; pass --resume" in one_line(err)


@pytest.mark.parametrize("device, says", [("mps", "no Apple GPU"), ("xla", "kdcache runs on cpu, cuda or mps"),
                                          ("cuda:x", "is not a device")])
def test_a_device_the_machine_lacks_is_one_line(device, says, capsys, tmp_path):
    import torch

    if device == "mps" and getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        pytest.skip("this machine has an Apple GPU")
    code, _, err = run(capsys, "train-student", "--student", "cnn_tiny", "--dataset", "digits", "--device", device,
                       "--out", tmp_path / "o")
    assert code == 2 and says in one_line(err)


def test_a_pipeline_runs_again_with_resume_skipping_what_is_finished(tmp_path, capsys):
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(f"""stages:
  - train-student: {{students: [cnn_tiny], dataset: digits, epochs: 1, out: {tmp_path}/t}}
  - dump-teacher: {{teacher: {tmp_path}/t/cnn_tiny/model.pt, dataset: digits, splits: [train, test], out: {tmp_path}/c.zarr}}
  - train-student: {{cache: {tmp_path}/c.zarr, dataset: digits, students: [cnn_tiny], epochs: 1, out: {tmp_path}/s}}
""")
    code, out, err = run(capsys, "run", pipeline)
    assert code == 0 and f"wrote {tmp_path}/c.zarr" in out.splitlines(), err  # the dump stage says what it wrote
    code, _, err = run(capsys, "run", pipeline)  # again: stage 1's output exists
    assert code == 2 and "--resume" in one_line(err)
    code, out, err = run(capsys, "run", pipeline, "--resume")
    assert code == 0, err
    assert "c.zarr is complete: stage 2 skipped" in out and out.count("(trained earlier)") == 2


def test_the_default_dataset_is_said_not_silent(tmp_path, capsys):
    code, out, err = run(capsys, "train-student", "--student", "cnn_tiny", "--epochs", "1", "--out", tmp_path)
    assert code == 0, err
    assert out.splitlines()[0] == "dataset: digits (the default; pass --dataset NAME for yours)"
    code, out, _ = run(capsys, "train-student", "--student", "cnn_tiny", "--epochs", "1", "--dataset", "digits",
                       "--out", tmp_path / "b")
    assert "the default" not in out
    pipeline = tmp_path / "p.yaml"  # a pipeline stage without dataset: says it too
    pipeline.write_text(f"stages:\n  - train-student: {{students: [cnn_tiny], epochs: 1, out: {tmp_path}/p}}\n")
    code, out, err = run(capsys, "run", pipeline)
    assert code == 0, err
    assert out.splitlines()[1] == "dataset: digits (the default; add dataset: NAME to the stage for yours)"
