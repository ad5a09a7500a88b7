"""Datasets by name: fixed splits, fingerprints that notice changed data, clear errors."""
import numpy as np
import pytest
import torch

from kdcache.data import load_split
from kdcache.errors import KDCacheError


def test_digits_splits_are_fixed_disjoint_and_cover_all_1797_images():
    train, test = load_split("digits", "train"), load_split("digits", "test")
    assert (len(train), len(test)) == (1437, 360)
    x, y = train.dataset[0]
    assert x.shape == (3, 32, 32) and -1 <= float(x.min()) and float(x.max()) <= 1 and isinstance(y, int)
    a = {train.dataset[i][0].numpy().tobytes() for i in range(len(train))}
    b = {test.dataset[i][0].numpy().tobytes() for i in range(len(test))}
    assert not a & b
    assert train.fingerprint() == load_split("digits", "train").fingerprint() != test.fingerprint()


def test_fingerprint_changes_when_a_label_changes():
    data = load_split("digits", "test")
    before = data.fingerprint()
    data.labels = data.labels.copy()
    data.labels[5] = (data.labels[5] + 1) % 10
    assert data.fingerprint() != before


def test_fake_data_matches_torchvision_fakedata_sample_for_sample():
    from torchvision import datasets, transforms

    ours = load_split("fake:size=6,classes=7,image=16", "train")
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)])
    theirs = datasets.FakeData(size=6, image_size=(3, 16, 16), num_classes=7, transform=tf)
    for i in range(6):
        (x, y), (x2, y2) = ours.dataset[i], theirs[i]
        assert torch.equal(x, x2) and y == y2 == ours.labels[i]


def test_fake_test_split_holds_other_images():
    a, b = load_split("fake:size=4", "train"), load_split("fake:size=4", "test")
    assert not torch.equal(a.dataset[0][0], b.dataset[0][0])


def test_user_dataset_by_module_callable(tmp_path, monkeypatch):
    (tmp_path / "mydata.py").write_text(
        "import torch\n"
        "def make(split, root=None):\n"
        "    return [(torch.full((3, 8, 8), float(i)), i % 3) for i in range(9 if split == 'train' else 3)]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    data = load_split("mydata:make", "train")
    assert len(data) == 9 and data.num_classes == 3 and list(data.labels[:4]) == [0, 1, 2, 0]


def test_imagefolder_reads_splits_and_names_missing_ones(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(tmp_path / split / cls / "a.png")
    data = load_split(f"imagefolder:{tmp_path},image=32", "val")
    assert len(data) == 2 and data.class_names == ["cat", "dog"] and data.dataset[0][0].shape == (3, 32, 32)
    with pytest.raises(KDCacheError, match="train, val"):
        load_split(f"imagefolder:{tmp_path}", "test")


def test_imagefolder_labels_a_class_alike_in_every_split_even_where_one_lacks_a_class(tmp_path):
    from PIL import Image

    for split, classes in (("train", ("bird", "cat", "dog")), ("test", ("cat", "dog"))):
        for cls in classes:
            (tmp_path / split / cls).mkdir(parents=True)
            Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / split / cls / "a.png")
    test = load_split(f"imagefolder:{tmp_path}", "test")
    assert test.class_names == ["bird", "cat", "dog"] and test.num_classes == 3
    assert list(test.labels) == [1, 2] and [test.dataset[i][1] for i in range(2)] == [1, 2]  # cat is 1, as in train


@pytest.mark.parametrize("made", ["train", "train/cat"])
def test_an_imagefolder_split_without_images_is_one_line(made, tmp_path):
    (tmp_path / made).mkdir(parents=True)
    with pytest.raises(KDCacheError, match=r"holds no images \(.*\); put each class's images in .*train/<class>/$"):
        load_split(f"imagefolder:{tmp_path}", "train")


@pytest.mark.parametrize("spec,split,match", [
    ("digitz", "train", "did you mean digits"),
    ("digits", "validation", "splits are train, test"),
    ("cifar10", "train", "--data-root"),
    ("fake:size=0", "train", "size >= 1"),
    ("fake:sizes=3", "train", "bad options"),
    ("nosuchmodule:fn", "train", "cannot load dataset"),
])
def test_bad_dataset_names_say_what_to_do(spec, split, match):
    with pytest.raises(KDCacheError, match=match):
        load_split(spec, split)


# --- digit-pairs: 100 classes built from the bundled digits ----------------------------------

def test_digit_pairs_has_100_balanced_classes_named_00_to_99():
    data = load_split("digit-pairs:size=1000,test_size=200", "train")
    assert (len(data), data.num_classes) == (1000, 100) and data.class_names[:3] == ["00", "01", "02"]
    assert data.class_names[-1] == "99" and np.bincount(data.labels, minlength=100).tolist() == [10] * 100
    assert len(load_split("digit-pairs:size=1000,test_size=200", "test")) == 200


def test_digit_pair_halves_are_the_digits_its_label_names():
    from kdcache.data import digits_tensors

    data = load_split("digit-pairs:size=300", "train")
    images, digit_labels = digits_tensors("train")
    for i in range(0, 300, 7):
        x, y = data.dataset[i]
        left, right = data.dataset.pairs[i].tolist()
        assert x.shape == (3, 32, 64) and -1 <= float(x.min()) and float(x.max()) <= 1
        assert y == data.labels[i] == 10 * digit_labels[left] + digit_labels[right]
        assert torch.equal(x[..., :32], images[left]) and torch.equal(x[..., 32:], images[right])


def test_digit_pairs_are_deterministic_and_fingerprinted_per_size():
    a, b = load_split("digit-pairs:size=500", "train"), load_split("digit-pairs:size=500", "train")
    assert np.array_equal(a.labels, b.labels) and torch.equal(a.dataset[123][0], b.dataset[123][0])
    assert a.fingerprint() == b.fingerprint() != load_split("digit-pairs:size=501", "train").fingerprint()


def test_digit_pairs_train_and_test_draw_on_disjoint_digit_images():
    from kdcache.data import digits_tensors

    def halves(split):
        data = load_split("digit-pairs:size=400,test_size=400", split)
        return {h.numpy().tobytes() for i in range(len(data)) for h in data.dataset[i][0].split(32, dim=-1)}

    test_digits = {x.numpy().tobytes() for x in digits_tensors("test")[0]}
    train_halves, test_halves = halves("train"), halves("test")
    assert test_halves <= test_digits and not train_halves & test_digits


def test_digit_pairs_survive_pickling_for_dataloader_workers():
    import pickle

    data = load_split("digit-pairs:size=50", "train")
    copy = pickle.loads(pickle.dumps(data.dataset))
    assert torch.equal(copy[7][0], data.dataset[7][0]) and copy[7][1] == data.dataset[7][1]


def test_cnn_tiny_runs_on_digit_pairs():
    from kdcache.models import create_model

    data = load_split("digit-pairs:size=4", "train")
    x = torch.stack([data.dataset[i][0] for i in range(4)])
    assert create_model("cnn_tiny", num_classes=data.num_classes)(x).shape == (4, 100)


@pytest.mark.parametrize("spec,split,match", [
    ("digit-pairs:size=0", "train", "size >= 1"),
    ("digit-pairs:test_size=-3", "test", "test_size >= 1"),
    ("digit-pairs:size=lots", "train", "whole numbers"),
    ("digit-pairs:sise=5", "train", "bad options"),
    ("digit-pairs:size", "train", "not key=value"),
    ("digit-pairs", "validation", "splits are train, test"),
])
def test_bad_digit_pairs_options_say_what_to_do_in_one_line(spec, split, match):
    with pytest.raises(KDCacheError, match=match) as e:
        load_split(spec, split)
    assert "\n" not in str(e.value)


def test_a_loader_worker_drops_a_lost_connection_quietly_and_reports_any_other_thread_error():
    """A stopped run closes its end of the worker's fd-sharing connection; the worker's serving thread
    then fails with BrokenPipeError, which must not print a traceback under the run's one line."""
    import subprocess
    import sys

    code = ("import sys, threading, kdcache.data as d\n"
            "d._quiet_worker(0)\n"
            "def serve(e):  # as multiprocessing.resource_sharer's thread reports its errors\n"
            "    try:\n        raise e\n    except BaseException:\n        sys.excepthook(*sys.exc_info())\n"
            "for e in (BrokenPipeError(32, 'Broken pipe'), ConnectionResetError(104, 'reset'), ValueError('real')):\n"
            "    t = threading.Thread(target=serve, args=(e,)); t.start(); t.join()\n")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stderr
    assert "ValueError: real" in err and "BrokenPipeError" not in err and "ConnectionResetError" not in err, err
