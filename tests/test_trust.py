"""Names of code come from the user, never from a store or a checkpoint.

A store is shared across teams and a checkpoint is a downloaded file: each may name registry
entries (datasets, augmentation presets, models), and a `module:callable` it names is refused in
one line (verify: the check that needs it is skipped, with how to run it), and run only when the
user names the same code. Every crafted file here would leave a marker if kdcache ran what it names.
"""
import os
import shutil

import pytest
import torch

from helpers.marked_code import hub_repo, marker_module
from kdcache import store as stores
from kdcache.errors import KDCacheError
from kdcache.models import build_teacher
from helpers.cli import run


def assert_one_line_error(code, err, *words):
    assert code == 2 and err.startswith("kdcache: error: ") and err.count("\n") == 1, err
    for word in words:
        assert word in err, err


@pytest.fixture
def code(tmp_path, monkeypatch):
    """(module name, marker): a module of the user's that marks its import and every call."""
    return marker_module(tmp_path, monkeypatch)


def crafted_store(src, tmp_path, *, dataset=None, preset=None) -> str:
    """A copy of store `src` whose train split names dataset `dataset`, or whose views name `preset`."""
    path = str(tmp_path / "crafted.zarr")
    shutil.copytree(src, path)
    with stores.open_store(path, read_only=False) as s:
        if dataset is not None:
            s.update_attrs({"dataset": dict(s.get_attrs("train")["dataset"], name=dataset)}, "train")
        if preset is not None:
            s.update_attrs({"augment": dict(s.get_attrs()["augment"], preset=preset)})
    return path


def crafted_checkpoint(teacher_ckpt, path, arch, arch_kwargs=None) -> str:
    """The digits teacher's checkpoint with another `arch`: plain data, so torch.load(weights_only=True) reads it."""
    ckpt = torch.load(teacher_ckpt, map_location="cpu", weights_only=True)
    ckpt.update(arch=arch, arch_kwargs=arch_kwargs or {})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(ckpt, path)
    torch.load(path, weights_only=True)  # passes the check that keeps pickled code out
    return str(path)


# --- a store's dataset and augmentation ------------------------------------------------------

def test_verify_skips_the_data_checks_of_a_dataset_the_store_names_as_code(fp32_cache, tmp_path, code, capsys):
    module, mark = code
    path = crafted_store(fp32_cache, tmp_path, dataset=f"{module}:digits")
    status, out, err = run(capsys, "verify", path)
    assert status == 0 and f"{path}: OK" in out, out + err  # blocks, rows, values: all still checked
    assert "split 'train': fingerprint and replay checks skipped" in out and f"--dataset {module}:digits" in out
    assert not mark.exists()

    status, out, err = run(capsys, "verify", path, "--dataset", f"{module}:digits")  # the user names it: it runs
    assert status == 0 and "skipped" not in out and "dataset" in mark.read_text(), out + err


def test_verify_still_finds_damage_in_a_store_naming_code(fp32_cache, tmp_path, code, capsys):
    module, mark = code
    path = crafted_store(fp32_cache, tmp_path, dataset=f"{module}:digits")
    chunk = os.path.join(path, "train", "logits", "c", "0", "0", "0")
    data = bytearray(open(chunk, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(chunk, "wb").write(bytes(data))
    status, out, err = run(capsys, "verify", path)
    assert status == 1 and "train/logits: block 0" in out, out + err
    assert not mark.exists()


def test_verify_skips_the_replay_check_of_views_the_store_says_code_made(view_cache, tmp_path, code, capsys):
    module, mark = code
    path = crafted_store(view_cache, tmp_path, preset=f"{module}:views")
    status, out, err = run(capsys, "verify", path)
    assert status == 0 and f"{path}: OK" in out, out + err
    assert "split 'train': replay check skipped" in out and f"--augment {module}:views" in out
    assert not mark.exists()

    status, out, err = run(capsys, "verify", path, "--augment", f"{module}:views")  # named by the user: replayed
    assert status == 0 and "skipped" not in out and "augment" in mark.read_text(), out + err


def test_training_refuses_views_the_store_says_code_made_unless_the_user_names_it(view_cache, tmp_path, code, capsys):
    module, mark = code
    path = crafted_store(view_cache, tmp_path, preset=f"{module}:views")
    out_dir = tmp_path / "students"
    status, out, err = run(capsys, "train-student", "--cache", path, "--student", "cnn_tiny", "--epochs", "1",
                           "--out", str(out_dir))
    assert_one_line_error(status, err, f"--augment {module}:views")
    assert not mark.exists() and not (out_dir / "cnn_tiny" / "model.pt").exists()

    from kdcache.augment import training_views
    from kdcache.config import TrainConfig, resolve
    from kdcache.data import load_split
    from kdcache.targets import open_cache

    cfg = resolve(TrainConfig, overrides=dict(students=["cnn_tiny"], cache=path, augment=f"{module}:views",
                                              verify_replay=4))
    views = training_views(cfg, load_split("digits", "train"), open_cache(path))  # replay-checked against the store
    assert views.describe()["augment"] == f"{module}:views" and "augment" in mark.read_text()


# --- a checkpoint's arch ---------------------------------------------------------------------

def code_arch(kind, tmp_path):
    """(arch, arch_kwargs, marker): a checkpoint arch that runs code, and the file it would leave."""
    if kind == "torch.hub":
        repo, mark = hub_repo(tmp_path)
        return "torch.hub:load", {"repo_or_dir": str(repo), "model": "teacher", "source": "local"}, mark
    mark = tmp_path / "created.log"
    return "logging:basicConfig", {"filename": str(mark), "force": True}, mark  # force: pytest holds root handlers


def command(kind, ckpt, out) -> list:
    """The command that loads `ckpt`: dump-teacher's teacher, online KD's, or (resume) the finished
    student OUT/cnn_tiny/model.pt a resumed sweep counts the parameters of."""
    if kind == "dump-teacher":
        return ["dump-teacher", "--teacher", ckpt, "--dataset", "digits", "--split", "test", "--out", f"{out}.zarr"]
    if kind == "online-kd":
        return ["train-student", "--teacher", ckpt, "--student", "cnn_tiny", "--epochs", "1", "--out", out]
    assert ckpt == os.path.join(out, "cnn_tiny", "model.pt")
    return ["train-student", "--student", "cnn_tiny", "--epochs", "1", "--out", out, "--resume"]


@pytest.mark.parametrize("arch", ["torch.hub", "logging"])
@pytest.mark.parametrize("kind", ["dump-teacher", "online-kd", "resume"])
def test_a_checkpoint_naming_code_is_refused_before_it_runs(teacher_ckpt, tmp_path, capsys, arch, kind):
    name, kwargs, mark = code_arch(arch, tmp_path)
    out = str(tmp_path / "out")
    where = os.path.join(out, "cnn_tiny", "model.pt") if kind == "resume" else str(tmp_path / "crafted.pt")
    status, text, err = run(capsys, *command(kind, crafted_checkpoint(teacher_ckpt, where, name, kwargs), out))
    assert_one_line_error(status, err, name)
    assert not mark.exists()
    assert not os.path.exists(f"{out}.zarr") and not os.path.exists(os.path.join(out, "summary.csv"))


def test_a_checkpoint_naming_the_users_own_code_loads_when_the_user_names_it(teacher_ckpt, tmp_path, code, capsys):
    module, mark = code
    ckpt = crafted_checkpoint(teacher_ckpt, tmp_path / "mine.pt", f"{module}:net")
    with pytest.raises(KDCacheError, match=f"--teacher {module}:net --weights {ckpt}"):
        build_teacher(ckpt, num_classes=None)
    assert not mark.exists()

    teacher, info = build_teacher(f"{module}:net", num_classes=10, weights=ckpt)  # dump-teacher's route
    original, _ = build_teacher(teacher_ckpt, num_classes=None)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(teacher(x), original(x))
    assert info["arch"] == f"{module}:net" and "model" in mark.read_text()

    status, out, err = run(capsys, "train-student", "--teacher", f"{module}:net", "--weights", ckpt,
                           "--student", "cnn_tiny", "--epochs", "1", "--out", str(tmp_path / "kd"))
    assert status == 0 and "online_kd" in out, err


def test_resuming_a_sweep_loads_a_finished_student_the_user_names_as_code(teacher_ckpt, tmp_path, code, capsys):
    module, mark = code
    out = tmp_path / "out"
    crafted_checkpoint(teacher_ckpt, out / f"{module}.net" / "model.pt", f"{module}:net")  # trained earlier
    status, text, err = run(capsys, "train-student", "--student", f"{module}:net", "--epochs", "1", "--out", str(out),
                            "--resume")
    assert status == 0 and f"{module}:net" in text and (out / "summary.csv").exists(), err


@pytest.mark.parametrize("field, value", [("arch", 5), ("arch", ["cnn_small"]), ("arch_kwargs", [1]),
                                          ("arch_kwargs", {1: 2}), ("num_classes", "10"), ("in_chans", 3.5),
                                          ("state_dict", [])])
def test_a_checkpoint_with_a_malformed_field_is_one_line(teacher_ckpt, tmp_path, field, value):
    ckpt = torch.load(teacher_ckpt, map_location="cpu", weights_only=True)
    ckpt[field] = value
    torch.save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(KDCacheError, match=f"{field} is"):
        build_teacher(str(tmp_path / "bad.pt"), num_classes=None)
