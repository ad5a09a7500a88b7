"""The command line end to end on digits, and every bad input answered in one line with exit 2."""
import json
import os

import pytest

from helpers.cli import run


def test_teacher_dump_inspect_and_a_two_student_sweep(capsys, tmp_path):
    t, c, s = str(tmp_path / "t"), str(tmp_path / "c.zarr"), str(tmp_path / "s")
    code, out, err = run(capsys, "train-student", "--student", "cnn_small", "--epochs", "2", "--out", t)
    assert code == 0, err
    code, out, err = run(capsys, "dump-teacher", "--teacher", f"{t}/cnn_small/model.pt", "--dataset", "digits",
                         "--split", "train", "--split", "test", "--out", c)
    assert code == 0 and "wrote" in out, err
    code, out, err = run(capsys, "inspect", c)
    assert code == 0 and "complete" in out and "teacher top-1" in out and "B/sample" in out
    code, out, err = run(capsys, "inspect", c, "--json")
    report = json.loads(out)
    assert report["complete"] and report["splits"]["train"]["arrays"]["logits"]["shape"] == [1437, 1, 10]
    code, out, err = run(capsys, "verify", c)
    assert code == 0 and "OK" in out
    code, out, err = run(capsys, "train-student", "--cache", c, "--student", "cnn_tiny", "--student", "resnet8",
                         "--epochs", "1", "--alpha-schedule", "cos", "--out", s)
    assert code == 0, err
    assert "cnn_tiny" in out and "resnet8" in out and "teacher" in out
    assert os.path.exists(f"{s}/summary.csv") and os.path.exists(f"{s}/resnet8/model.pt")


def test_config_file_values_are_overridden_by_flags(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("students: [cnn_tiny]\nepochs: 5\nbatch_size: 256\n")
    code, out, err = run(capsys, "train-student", "--config", str(cfg), "--epochs", "1", "--out", str(tmp_path / "o"))
    assert code == 0, err
    saved = json.load(open(tmp_path / "o" / "cnn_tiny" / "config.json"))
    assert saved["epochs"] == 1 and saved["batch_size"] == 256


def test_layers_lists_dotted_names_with_shapes(capsys):
    code, out, err = run(capsys, "layers", "resnet8")
    assert code == 0 and "layer3.0.conv1" in out and "64x8x8" in out


@pytest.fixture(scope="module")
def newer_store(tmp_path_factory):
    from kdcache import store as stores

    path = str(tmp_path_factory.mktemp("n") / "c.zarr")
    s = stores.create_store(path)
    s.update_attrs({"schema_version": stores.SCHEMA_VERSION + 1, "complete": True})
    s.close()
    return path


@pytest.fixture(scope="module")
def partial_store(tmp_path_factory):
    from kdcache import store as stores

    path = str(tmp_path_factory.mktemp("p") / "c.zarr")
    s = stores.create_store(path + ".partial")
    s.update_attrs({"schema_version": stores.SCHEMA_VERSION, "complete": False})
    s.close()
    return path


BAD = {
    "unknown student": ["train-student", "--student", "resnt8", "--epochs", "1"],
    "unknown teacher": ["dump-teacher", "--teacher", "resnet1000", "--out", "{tmp}/x.zarr"],
    "unknown dataset": ["train-student", "--student", "resnet8", "--dataset", "digitz"],
    "unknown split": ["dump-teacher", "--teacher", "{ckpt}", "--split", "validation", "--out", "{tmp}/x.zarr"],
    "unknown layer": ["dump-teacher", "--teacher", "{ckpt}", "--activation", "layer9", "--out", "{tmp}/x.zarr"],
    "missing cache": ["train-student", "--cache", "{tmp}/nope.zarr", "--student", "resnet8"],
    "incomplete cache": ["train-student", "--cache", "{partial}", "--student", "resnet8"],
    "mismatched cache": ["train-student", "--cache", "{cache}", "--student", "resnet8", "--dataset", "fake:size=1437"],
    "existing output": ["dump-teacher", "--teacher", "{ckpt}", "--out", "{cache}"],
    "missing data root": ["dump-teacher", "--teacher", "{ckpt}", "--dataset", "cifar10", "--data-root", "{tmp}/none", "--out", "{tmp}/x.zarr"],
    "no data root": ["train-student", "--student", "resnet8", "--dataset", "cifar10"],
    "weights that do not fit": ["dump-teacher", "--teacher", "resnet20", "--weights", "{ckpt}", "--out", "{tmp}/x.zarr"],
    "bad store suffix": ["dump-teacher", "--teacher", "{ckpt}", "--out", "{tmp}/x.npz"],
    "negative epochs": ["train-student", "--student", "resnet8", "--epochs", "-1"],
    "alpha above one": ["train-student", "--student", "resnet8", "--alpha", "1.5"],
    "non-numeric option": ["train-student", "--student", "resnet8", "--epochs", "many"],
    "unknown flag": ["dump-teacher", "--teachr", "x"],
    "unknown config key": ["train-student", "--config", "{tmp}/bad.yaml"],
    "missing config file": ["train-student", "--config", "{tmp}/absent.yaml"],
    "resume and overwrite": ["dump-teacher", "--teacher", "{ckpt}", "--out", "{tmp}/x.zarr", "--resume", "--overwrite"],
    "cache and teacher": ["train-student", "--cache", "{cache}", "--teacher", "{ckpt}", "--student", "resnet8"],
    "unknown loss": ["train-student", "--cache", "{cache}", "--student", "resnet8", "--loss", "kl"],
    "inspect a missing store": ["inspect", "{tmp}/nope.zarr"],
    "feature not in the cache": ["train-student", "--cache", "{cache}", "--student", "cnn_tiny", "--feature", "layer3=layer3", "--out", "{tmp}/s"],
    "feature without a teacher": ["train-student", "--student", "cnn_tiny", "--feature", "layer3=layer3", "--out", "{tmp}/s"],
    "unknown feature loss": ["train-student", "--teacher", "{ckpt}", "--student", "cnn_tiny", "--feature", "layer3=layer3:kl", "--out", "{tmp}/s"],
    "unknown student layer": ["train-student", "--teacher", "{ckpt}", "--student", "cnn_tiny", "--feature", "layer9=layer3", "--out", "{tmp}/s"],
    "unknown teacher module": ["train-student", "--teacher", "{ckpt}", "--student", "cnn_tiny", "--feature", "layer3=layer9", "--out", "{tmp}/s"],
    "empty fake dataset": ["train-student", "--student", "resnet8", "--dataset", "fake:size=0"],
    "zero batch size": ["dump-teacher", "--teacher", "{ckpt}", "--batch-size", "0", "--out", "{tmp}/x.zarr"],
    "unknown dtype": ["dump-teacher", "--teacher", "{ckpt}", "--dtype", "int3", "--out", "{tmp}/x.zarr"],
    "split named twice": ["dump-teacher", "--teacher", "{ckpt}", "--split", "test", "--split", "test", "--out", "{tmp}/x.zarr"],
    "zero temperature": ["train-student", "--student", "resnet8", "--temperature", "0"],
    "negative weight decay": ["train-student", "--student", "resnet8", "--weight-decay", "-1"],
    "unknown schedule": ["train-student", "--cache", "{cache}", "--student", "resnet8", "--alpha-schedule", "cosine"],
    "split missing from the cache": ["train-student", "--cache", "{cache}", "--student", "resnet8", "--train-split", "val"],
    "newer schema": ["inspect", "{newer}"],
    "not a store": ["inspect", "{tmp}"],
    "verify a missing store": ["verify", "{tmp}/nope.zarr"],
    "layers of an unknown model": ["layers", "resnet1000"],
    "missing pipeline": ["run", "{tmp}/absent.yaml"],
    "pipeline with an unknown stage": ["run", "{tmp}/bad-pipeline.yaml"],
    "wrong type in a config file": ["train-student", "--config", "{tmp}/wrong-type.yaml"],
    "resume and overwrite in training": ["train-student", "--student", "resnet8", "--resume", "--overwrite"],
    "verify without a cache": ["train-student", "--student", "resnet8", "--verify"],
    "teacher of another architecture's weights": ["dump-teacher", "--teacher", "resnet8", "--weights", "{ckpt}", "--out", "{tmp}/x.zarr"],
    "views of one clean input": ["dump-teacher", "--teacher", "{ckpt}", "--views", "4", "--out", "{tmp}/x.zarr"],
    "unknown augmentation": ["dump-teacher", "--teacher", "{ckpt}", "--views", "4", "--augment", "cifarr", "--out", "{tmp}/x.zarr"],
    "views of no split dumped": ["dump-teacher", "--teacher", "{ckpt}", "--split", "test", "--augment", "digits", "--out", "{tmp}/x.zarr"],
    "mixing from an unmixed cache": ["train-student", "--cache", "{cache}", "--student", "cnn_tiny", "--mix", "cutmix", "--out", "{tmp}/s"],
    "mixing with a one-class loss": ["train-student", "--student", "cnn_tiny", "--mix", "mixup", "--loss", "dkd"],
    "student views without augmentation": ["train-student", "--student", "cnn_tiny", "--views", "4"],
    "unknown view policy": ["train-student", "--student", "cnn_tiny", "--augment", "digits", "--view-policy", "shuffle"],
    "training output that is a file": ["train-student", "--student", "cnn_tiny", "--epochs", "1", "--out", "{tmp}/a-file"],
    "dump output below a file": ["dump-teacher", "--teacher", "{ckpt}", "--out", "{tmp}/a-file/x.zarr"],
    "an HDF5 store that is a folder": ["inspect", "{tmp}/folder.h5"],
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_with_exit_status_two(case, capsys, tmp_path, teacher_ckpt, fp32_cache, partial_store,
                                                    newer_store):
    (tmp_path / "bad.yaml").write_text("studnets: [resnet8]\n")
    (tmp_path / "wrong-type.yaml").write_text("students: [resnet8]\nepochs: ten\n")
    (tmp_path / "bad-pipeline.yaml").write_text("stages:\n  - train-teacher: {epochs: 1}\n")
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "folder.h5").mkdir()
    before = sorted(os.listdir(tmp_path))
    argv = [a.format(tmp=tmp_path, ckpt=teacher_ckpt, cache=fp32_cache, partial=partial_store, newer=newer_store)
            for a in BAD[case]]
    code, out, err = run(capsys, *argv)
    assert code == 2, (case, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and "Traceback" not in err, err
    assert sorted(os.listdir(tmp_path)) == before  # nothing written
