"""Options, config files and pipeline files: every value is checked for its field's type before any
work starts, and a bad one is one line on stderr, exit status 2, nothing written."""
import dataclasses
import os
import typing

import pytest

from kdcache.config import DumpConfig, TrainConfig, resolve
from kdcache.errors import KDCacheError
from helpers.cli import run

NAN, INF = float("nan"), float("inf")
NEEDS = {DumpConfig: {"teacher": "cnn_tiny", "out": "x.zarr"}, TrainConfig: {"students": ["cnn_tiny"]}}


def one_line_error(code, err):
    lines = err.strip().splitlines()
    return code == 2 and len(lines) == 1 and "error" in lines[0] and "Traceback" not in err


def numeric_fields(cls, kind):
    hints = typing.get_type_hints(cls)
    return [f.name for f in dataclasses.fields(cls) if kind in (hints[f.name], *typing.get_args(hints[f.name]))]


# --- numbers: every numeric option of every stage -----------------------------------------------

@pytest.mark.parametrize("cls", [DumpConfig, TrainConfig], ids=["dump", "train"])
@pytest.mark.parametrize("value", [NAN, INF, -INF, 1e39, "nan", "inf"])
def test_every_float_option_refuses_nan_inf_and_numbers_beyond_float32(cls, value):
    names = numeric_fields(cls, float)
    assert "mix_alpha" in names and (cls is DumpConfig or {"lr", "temperature", "weight_decay"} <= set(names))
    for name in names:
        with pytest.raises(KDCacheError, match=f"option '{name}' must be a finite number"):
            resolve(cls, overrides={**NEEDS[cls], name: value})


@pytest.mark.parametrize("cls", [DumpConfig, TrainConfig], ids=["dump", "train"])
@pytest.mark.parametrize("value", [2**63, -(2**63) - 1, 10**400, "123456789012345678901234567890"],
                         ids=["2**63", "-2**63-1", "10**400", "text"])
def test_every_integer_option_refuses_numbers_beyond_int64(cls, value):
    names = numeric_fields(cls, int)
    assert "batch_size" in names and (cls is DumpConfig or "seed" in names)
    for name in names:
        with pytest.raises(KDCacheError, match=f"option '{name}' must be an integer of at most 63 bits"):
            resolve(cls, overrides={**NEEDS[cls], name: value})


def test_integers_are_exact_and_never_truncated():
    assert resolve(TrainConfig, overrides={**NEEDS[TrainConfig], "seed": str(2**63 - 1)}).seed == 2**63 - 1
    assert resolve(DumpConfig, overrides={**NEEDS[DumpConfig], "topk": "1e1"}).topk == 10
    for value in (3.7, "3.5", NAN, True):
        with pytest.raises(KDCacheError, match="option 'epochs' must be an integer"):
            resolve(TrainConfig, overrides={**NEEDS[TrainConfig], "epochs": value})


def test_a_huge_worker_count_is_refused_before_any_process_starts():
    with pytest.raises(KDCacheError, match="--num-workers"):
        resolve(DumpConfig, overrides={**NEEDS[DumpConfig], "num_workers": 10**6})


CLI_NUMBERS = {
    "lr nan": ["--lr", "nan"], "lr inf": ["--lr", "inf"], "weight decay nan": ["--weight-decay", "nan"],
    "temperature nan": ["--temperature", "nan"], "temperature inf": ["--temperature", "inf"],
    "mix alpha nan": ["--mix-alpha", "nan"],
    "feature weight inf": ["--feature-weight", "inf"], "seed beyond int64": ["--seed", str(2**64)],
    "epochs beyond int64": ["--epochs", str(2**70)],
}


@pytest.mark.parametrize("case", sorted(CLI_NUMBERS))
def test_train_student_numbers_are_one_line_and_write_nothing(case, capsys, tmp_path):
    flag, value = CLI_NUMBERS[case]
    code, out, err = run(capsys, "train-student", "--student", "cnn_tiny", "--epochs", "1", flag, value,
                         "--out", str(tmp_path / "o"))
    assert one_line_error(code, err) and f"option '{flag[2:].replace('-', '_')}'" in err, err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("flags", [["--mix", "mixup", "--mix-alpha", "nan"], ["--augment-seed", str(2**63)],
                                   ["--batch-size", str(2**64)], ["--topk", str(2**64)]], ids=str)
def test_dump_teacher_numbers_are_one_line_and_write_nothing(flags, capsys, tmp_path):
    code, out, err = run(capsys, "dump-teacher", "--teacher", "cnn_tiny", *flags, "--out", str(tmp_path / "c.zarr"))
    assert one_line_error(code, err) and f"option '{flags[-2][2:].replace('-', '_')}'" in err, err
    assert os.listdir(tmp_path) == []


# --- names: splits and the types of config values ------------------------------------------------

@pytest.mark.parametrize("split", ["../x", "a/b", "..", "", ".hidden", "x\\y"])
def test_a_split_name_that_is_a_path_is_refused_and_nothing_is_left(split, capsys, tmp_path):
    code, out, err = run(capsys, "dump-teacher", "--teacher", "cnn_tiny", "--split", split,
                         "--out", str(tmp_path / "c.zarr"))
    assert one_line_error(code, err) and "not a split name" in err, err
    code, out, err = run(capsys, "train-student", "--student", "cnn_tiny", "--test-split", split,
                         "--out", str(tmp_path / "o"))
    assert one_line_error(code, err) and "not a split name" in err, err
    assert os.listdir(tmp_path) == [] and not os.path.exists(tmp_path.parent / "x")


BAD_FILES = {
    "a key that is not text": "1: cnn_tiny\nstudents: [cnn_tiny]\n",
    "a list where a path goes": "students: [cnn_tiny]\nout: [a, b]\n",
    "a number where a name goes": "students: [cnn_tiny]\ndataset: 5\n",
    "a mapping where a name goes": "students: [cnn_tiny]\ndataset: {name: digits}\n",
    "NaN in a file": "students: [cnn_tiny]\nlr: .nan\nmomentum: .nan\n",
    "not UTF-8": b"students: [cnn_tiny]\nout: caf\xe9\n",
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_a_config_file_value_of_the_wrong_type_is_one_line(case, capsys, tmp_path):
    path = tmp_path / "c.yaml"
    (path.write_bytes if isinstance(BAD_FILES[case], bytes) else path.write_text)(BAD_FILES[case])
    code, out, err = run(capsys, "train-student", "--config", str(path), "--epochs", "1", "--out", str(tmp_path / "o"))
    assert one_line_error(code, err), err
    assert os.listdir(tmp_path) == ["c.yaml"]


# --- pipelines: every stage checked before the first one runs ----------------------------------

DUMP_STAGE = "  - dump-teacher: {teacher: {ckpt}, dataset: digits, splits: [test], out: {tmp}/c.zarr}\n"
LATER_TYPOS = {
    "unknown loss": "  - train-student: {cache: {tmp}/c.zarr, students: [cnn_tiny], loss: kl}\n",
    "unknown student": "  - train-student: {cache: {tmp}/c.zarr, students: [cnn_tny]}\n",
    "unknown schedule": "  - train-student: {cache: {tmp}/c.zarr, students: [cnn_tiny], alpha_schedule: cosine}\n",
    "unknown dataset": "  - train-student: {cache: {tmp}/c.zarr, students: [cnn_tiny], dataset: digitz}\n",
    "unknown teacher": "  - dump-teacher: {teacher: resnet1000, dataset: digits, out: {tmp}/d.zarr}\n",
    "options that are a list": "  - train-student: [cnn_tiny]\n",
    "options that are a string": "  - train-student: cnn_tiny\n",
    "a bad split": "  - train-student: {cache: {tmp}/c.zarr, students: [cnn_tiny], train_split: ../x}\n",
    # what a stage needs from the ones before it, or from the machine
    "a cache no stage dumps": "  - train-student: {cache: {tmp}/d.zarr, students: [cnn_tiny]}\n",
    "a cache of no known suffix": "  - train-student: {cache: {tmp}/c.zar, students: [cnn_tiny]}\n",
    "a split the dump does not make": "  - train-student: {cache: {tmp}/c.zarr, students: [cnn_tiny], train_split: train}\n",
    "a device the machine lacks": "  - train-student: {cache: {tmp}/c.zarr, students: [cnn_tiny], train_split: test, "
                                  "device: 'cuda:99'}\n",
    "a teacher checkpoint no stage trains": "  - dump-teacher: {teacher: {tmp}/t/cnn_tiny/model.pt, out: {tmp}/d.zarr}\n",
}


@pytest.mark.parametrize("case", sorted(LATER_TYPOS))
def test_a_pipeline_with_a_mistake_in_a_later_stage_fails_before_the_first_runs(case, capsys, tmp_path, teacher_ckpt):
    path = tmp_path / "p.yaml"
    path.write_text(("stages:\n" + DUMP_STAGE + LATER_TYPOS[case]).replace("{tmp}", str(tmp_path))
                    .replace("{ckpt}", teacher_ckpt))
    code, out, err = run(capsys, "run", str(path))
    assert one_line_error(code, err) and "stage 2" in err, err
    assert os.listdir(tmp_path) == ["p.yaml"]  # the dump of stage 1 never ran


def test_a_pipeline_stage_option_whose_name_is_not_text_is_one_line(capsys, tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("stages:\n  - train-student: {students: [cnn_tiny], 1: 2}\n")
    code, out, err = run(capsys, "run", str(path))
    assert one_line_error(code, err) and "stage 1" in err, err


def test_a_huge_views_count_is_refused_by_the_room_check_without_making_the_views(teacher_ckpt, capsys, tmp_path):
    code, out, err = run(capsys, "dump-teacher", "--teacher", teacher_ckpt, "--split", "train", "--augment", "digits",
                         "--views", str(2**62), "--out", str(tmp_path / "c.zarr"))
    assert one_line_error(code, err) and "needs up to" in err, err
    assert os.listdir(tmp_path) == []
