"""`torchrun --nproc-per-node N -m kdcache dump-teacher`: ranks write their own whole blocks, and the store
is the 1-process store value for value, also when killed and resumed with another number of processes."""
import os

import numpy as np
import pytest

from helpers.torchrun import kdcache
from kdcache import dump_teacher
from kdcache import store as stores
from kdcache.cli import main
from kdcache.distributed import rank_blocks, rank_blocks_aligned
from kdcache.verify import verify_store
from kdcache.store.records import PROGRESS, rows_written

DATA = "helpers.dying_data:digits"  # digits (1437 train, 360 test), SIGKILLed at sample $KDCACHE_TEST_KILL_AT
# float32 logits of 10 classes, 1280-byte chunks: 32-row blocks, so train is 45 blocks (the last of 29 rows),
# odd, and split 24/21 between 2 ranks. Batches of 64 samples: ranks start on a 2-block boundary, so every batch
# holds the samples it holds in the 1-process dump, and the values are identical, not merely close
OPTIONS = dict(dtype="float32", chunk_bytes=1280, batch_size=64)
TRAIN_BLOCKS = 45


def dump_args(teacher, out, config):
    return ["dump-teacher", "--teacher", teacher, "--dataset", DATA, "--out", str(out), "--config", str(config)]


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "small.yaml"
    path.write_text("".join(f"{key}: {value}\n" for key, value in OPTIONS.items()))
    return path


@pytest.fixture(scope="module")
def single(teacher_ckpt, tmp_path_factory) -> str:
    """The reference: an uninterrupted 1-process dump (in this process: a process start costs more than the dump)."""
    return dump_teacher(teacher=teacher_ckpt, dataset=DATA, out=str(tmp_path_factory.mktemp("single") / "one.zarr"),
                        **OPTIONS)


def assert_same_store(path, reference):
    """Every array of every split equal value for value, and the same recorded checksums and attrs."""
    with stores.open_store(path) as a, stores.open_store(reference) as b:
        ignore = ("created", "config")  # when, and the --out it was written to
        assert {k: v for k, v in a.get_attrs().items() if k not in ignore} == \
               {k: v for k, v in b.get_attrs().items() if k not in ignore}
        assert a.get_attrs()["complete"]
        for split in b.get_attrs()["splits"]:
            assert a.array_names(split) == b.array_names(split)
            for name in b.array_names(split):
                assert np.array_equal(a.array(f"{split}/{name}")[:], b.array(f"{split}/{name}")[:]), f"{split}/{name}"
            assert a.get_attrs(split) == b.get_attrs(split)  # checksums, layout, block_rows, rows_written
            assert PROGRESS not in a.group_names(split)  # the ranks' records are merged away
    assert verify_store(path) == []
    assert not os.path.exists(path + ".partial") and not os.path.exists(path + ".lock")


def test_ranks_start_on_a_multiple_of_the_alignment_and_share_every_block_once():
    assert [rank_blocks_aligned(45, 2, r, 2) for r in range(2)] == [range(0, 24), range(24, 45)]
    assert [rank_blocks_aligned(45, 2, r, 1) for r in range(2)] == [rank_blocks(45, 2, r) for r in range(2)]
    for n_blocks, world, unit in [(10, 3, 4), (2, 4, 8), (0, 2, 3), (9, 2, 5)]:
        ranges = [rank_blocks_aligned(n_blocks, world, r, unit) for r in range(world)]
        assert [b for r in ranges for b in r] == list(range(n_blocks))
        assert all(r.start % unit == 0 for r in ranges if r)


def test_two_process_gloo_dump_of_an_uneven_split_equals_the_one_process_dump(teacher_ckpt, config, single,
                                                                             tmp_path, capsys):
    out = str(tmp_path / "two.zarr")
    run = kdcache(dump_args(teacher_ckpt, out, config), nproc=2)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Warning" not in run.stderr  # e.g. zarr's, on listing a group while another rank rewrites its attrs
    assert_same_store(out, single)
    main(["inspect", out])
    assert "(complete" in capsys.readouterr().out


def test_two_process_dump_killed_part_way_resumes_with_one_process(teacher_ckpt, config, single, tmp_path):
    out = str(tmp_path / "c.zarr")
    # sample 1200 is rank 1's (train rows 768..1436): it dies there, and torchrun takes rank 0 down
    run = kdcache(dump_args(teacher_ckpt, out, config), nproc=2, env={"KDCACHE_TEST_KILL_AT": "1200",
                                                                    "KDCACHE_TEST_KILL_WHEN_WRITTEN": out + ".partial",
                                                                    "KDCACHE_TEST_KILL_WHEN_RECORD": "24-45"})
    assert run.returncode != 0 and not os.path.exists(out)
    with stores.open_store(out + ".partial") as s:
        assert not s.get_attrs()["complete"] and not s.get_attrs("train")["complete"]
        records = s.group_names(f"train/{PROGRESS}")
        assert "24-45" in records and set(records) <= {"0-24", "24-45"}  # one record per rank, named by its blocks
        assert rows_written(s, "train") < 1437
    dump_teacher(teacher=teacher_ckpt, dataset=DATA, out=out, resume=True, **OPTIONS)
    assert_same_store(out, single)


def test_one_process_dump_killed_part_way_resumes_with_two_processes(teacher_ckpt, config, single, tmp_path):
    out = str(tmp_path / "c.zarr")
    run = kdcache(dump_args(teacher_ckpt, out, config),
                  env={"KDCACHE_TEST_KILL_AT": "300", "KDCACHE_TEST_KILL_WHEN_WRITTEN": out + ".partial"})
    assert run.returncode == -9, run.stderr[-3000:]
    with stores.open_store(out + ".partial") as s:
        assert 0 < rows_written(s, "train") <= 300  # both ranks have blocks left to write
    run = kdcache(dump_args(teacher_ckpt, out, config) + ["--resume"], nproc=2)
    assert run.returncode == 0, run.stderr[-3000:]
    assert_same_store(out, single)


def test_a_distributed_dump_to_hdf5_is_a_one_line_user_error(teacher_ckpt, tmp_path, monkeypatch, capsys):
    # what each rank of `torchrun --nproc-per-node 2` sees; it stops before joining the process group
    for var, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(var, value)
    out = str(tmp_path / "c.h5")
    with pytest.raises(SystemExit) as e:
        main(["dump-teacher", "--teacher", teacher_ckpt, "--dataset", "digits", "--out", out])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert "HDF5" in err and ".zarr" in err and "convert" in err
    assert not os.path.exists(out) and not os.path.exists(out + ".partial")
