"""Specification of kdcache.models: registry, name resolution, layer lookup, checkpoints, teachers.

Everything runs on CPU in seconds with random weights; nothing is downloaded.
"""

import textwrap

import pytest
import torch
import torch.nn as nn

from kdcache.errors import KDCacheError
from kdcache.models import (
    MODELS,
    build_teacher,
    count_parameters,
    create_model,
    get_module,
    list_layers,
    weights_sha256,
    load_checkpoint,
    model_from_checkpoint,
    model_names,
    register_model,
    save_checkpoint,
)


class TupleOut(nn.Module):
    """A submodule whose output is not a tensor, as some real models have."""

    def forward(self, x):
        return x, x.mean()


class TinyNet(nn.Module):
    def __init__(self, num_classes: int, in_chans: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, 4, 3, padding=1)
        self.pair = TupleOut()
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        x, _ = self.pair(torch.relu(self.conv(x)))
        return self.fc(x.mean(dim=(2, 3)))


def _save_ckpt(path, model, arch="resnet8", num_classes=10, **over):
    kw = dict(arch=arch, arch_kwargs={}, num_classes=num_classes, in_chans=3,
              config={"lr": 0.1, "alpha": [0.0, 0.9]}, metrics={"acc": 0.5})
    kw.update(over)
    save_checkpoint(path, model, **kw)


def _no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# --- registry and construction -------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_registered_model_maps_images_to_logits(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7).eval()
    batch = 1 if name in ("resnet110", "resnet32x4") else 2  # the two slowest: keep the suite in seconds
    with torch.no_grad():
        out = model(torch.randn(batch, 3, 32, 32))
    assert out.shape == (batch, 7)


def test_cifar_models_accept_other_channel_counts_and_small_inputs():
    model = create_model("resnet8", num_classes=10, in_chans=1).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_parameter_counts_grow_with_depth_and_width():
    p = {n: count_parameters(create_model(n, num_classes=100)) for n in
         ("resnet8", "resnet20", "resnet56", "resnet32x4", "wrn_40_2")}
    assert p["resnet8"] < p["resnet20"] < p["resnet56"]
    # the sizes the CRD paper reports for CIFAR-100, in millions
    assert round(p["resnet56"] / 1e6, 2) == 0.86 and round(p["resnet32x4"] / 1e6, 2) == 7.43
    assert round(p["wrn_40_2"] / 1e6, 2) == 2.26
    c = [count_parameters(create_model(n, num_classes=10)) for n in ("cnn_tiny", "cnn_small", "cnn_medium")]
    assert c[0] < c[1] < c[2] and c[2] >= 10 * c[0]


def test_registering_a_name_twice_warns_and_replaces():
    def kdcache_test_net(*, num_classes, in_chans=3):
        return TinyNet(num_classes, in_chans)

    try:
        register_model(kdcache_test_net)
        with pytest.warns(UserWarning, match="kdcache_test_net"):
            register_model(kdcache_test_net)
        assert isinstance(create_model("kdcache_test_net", num_classes=3), TinyNet)
    finally:
        MODELS.pop("kdcache_test_net", None)


def test_typo_in_model_name_suggests_the_right_one():
    with pytest.raises(KDCacheError, match=r"unknown model 'resnt8'; did you mean .*resnet8"):
        create_model("resnt8", num_classes=10)


def test_unknown_constructor_argument_is_a_user_error():
    with pytest.raises(KDCacheError, match="drop_rat"):
        create_model("wrn_16_1", num_classes=10, drop_rat=0.3)
    assert create_model("wrn_16_1", num_classes=10, drop_rate=0.3).block1.layer[0].drop_rate == 0.3


def test_module_callable_builds_a_user_model(tmp_path, monkeypatch):
    (tmp_path / "kdcache_user_nets.py").write_text(textwrap.dedent("""
        import torch.nn as nn

        def make_net(num_classes, hidden=8):
            return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, hidden), nn.Linear(hidden, num_classes))

        def not_a_model(num_classes):
            return 42
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    model = create_model("kdcache_user_nets:make_net", num_classes=5, hidden=6)
    assert model(torch.randn(2, 3, 4, 4)).shape == (2, 5)
    assert model[1].out_features == 6

    with pytest.raises(KDCacheError, match="make_net"):
        create_model("kdcache_user_nets:make_nte", num_classes=5)
    with pytest.raises(KDCacheError, match="not a torch.nn.Module"):
        create_model("kdcache_user_nets:not_a_model", num_classes=5)
    with pytest.raises(KDCacheError, match="in_chans"):
        create_model("kdcache_user_nets:make_net", num_classes=5, in_chans=1)


def test_module_callable_that_cannot_be_imported_names_the_module():
    with pytest.raises(KDCacheError, match="cannot import module 'no_such_pkg.nets'"):
        create_model("no_such_pkg.nets:make_net", num_classes=5)


def test_torchvision_names_build_without_downloading():
    assert "resnet18" in model_names() and "resnet8" in model_names()
    model = create_model("resnet18", num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    with pytest.raises(KDCacheError, match="3 input channels"):
        create_model("resnet18", num_classes=7, in_chans=1)


# --- inspection ------------------------------------------------------------------------------


def test_get_module_resolves_dotted_paths():
    model = create_model("resnet20", num_classes=10)
    assert get_module(model, "") is model
    assert get_module(model, "layer3.1.conv2") is model.layer3[1].conv2
    assert get_module(model, "fc") is model.fc


def test_get_module_unknown_name_lists_the_closest():
    model = create_model("resnet8", num_classes=10)
    with pytest.raises(KDCacheError, match=r"no module 'layer9'; closest: .*layer\d"):
        get_module(model, "layer9")


def test_module_names_are_the_same_stages_across_families():
    for name in ("resnet8", "resnet32x4", "cnn_tiny"):
        names = {n for n, _ in create_model(name, num_classes=10).named_modules()}
        assert {"conv1", "layer1", "layer2", "layer3", "fc"} <= names
    wrn = {n for n, _ in create_model("wrn_16_2", num_classes=10).named_modules()}
    assert {"block1.layer.0.conv1", "block2.layer.0.convShortcut", "block3", "fc"} <= wrn


def test_list_layers_reports_shapes_and_leaves_no_hooks_behind():
    model = create_model("resnet8", num_classes=10).train()
    layers = {row["name"]: row for row in list_layers(model)}
    assert layers["layer1"]["shape"] == (1, 16, 32, 32)
    assert layers["layer3"]["shape"] == (1, 64, 8, 8)
    assert layers["layer3.0.conv2"]["type"] == "Conv2d"
    assert layers["fc"]["shape"] == (1, 10) and layers["fc"]["params"] == 64 * 10 + 10
    assert _no_hooks(model)
    assert all(m.training for m in model.modules())


def test_list_layers_keeps_frozen_parts_frozen_and_reports_non_tensor_outputs():
    model = TinyNet(3).train()
    model.conv.eval()  # e.g. a frozen part: list_layers must not flip it back to training
    layers = {row["name"]: row for row in list_layers(model, input_shape=(2, 3, 8, 8))}
    assert layers["pair"]["shape"] is None
    assert layers["conv"]["shape"] == (2, 4, 8, 8)
    assert model.training and not model.conv.training and model.fc.training


def test_list_layers_failed_forward_is_a_user_error_and_removes_hooks():
    model = create_model("resnet8", num_classes=10).train()
    with pytest.raises(KDCacheError, match="input_shape"):
        list_layers(model, input_shape=(1, 1, 32, 32))
    assert _no_hooks(model)
    assert model.training


# --- checkpoints -----------------------------------------------------------------------------


def _trained_a_little(name="resnet8", num_classes=10):
    torch.manual_seed(0)
    model = create_model(name, num_classes=num_classes)
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32))  # moves BN running stats off their init values
    return model.eval()


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    model = _trained_a_little()
    path = tmp_path / "run" / "model.pt"
    _save_ckpt(path, model, extra={"epoch": 3})
    assert path.exists() and not (tmp_path / "run" / "model.pt.partial").exists()

    ckpt = load_checkpoint(path)
    assert ckpt["kdcache_checkpoint"] == 1 and ckpt["arch"] == "resnet8"
    assert ckpt["config"] == {"lr": 0.1, "alpha": [0.0, 0.9]} and ckpt["extra"] == {"epoch": 3}
    restored = model_from_checkpoint(ckpt).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), restored(x))


def test_checkpoint_with_non_plain_config_is_refused_before_writing(tmp_path):
    path = tmp_path / "model.pt"
    with pytest.raises(KDCacheError, match=r"config\['out'\]"):
        _save_ckpt(path, _trained_a_little(), config={"out": tmp_path})
    assert not path.exists() and not (tmp_path / "model.pt.partial").exists()


def test_load_checkpoint_refuses_missing_and_foreign_files(tmp_path):
    with pytest.raises(KDCacheError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    torch.save({"a": 1}, tmp_path / "other.pt")
    with pytest.raises(KDCacheError, match="not a kdcache checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(KDCacheError, match="junk.pt"):
        load_checkpoint(tmp_path / "junk.pt")


# --- teachers --------------------------------------------------------------------------------


def test_build_teacher_from_checkpoint(tmp_path):
    model = _trained_a_little("cnn_tiny")
    path = tmp_path / "model.pt"
    _save_ckpt(path, model, arch="cnn_tiny")
    teacher, info = build_teacher(str(path), num_classes=None)
    assert not teacher.training
    assert info == {"arch": "cnn_tiny", "arch_kwargs": {}, "num_classes": 10, "in_chans": 3,
                    "weights_sha256": weights_sha256(model)}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(teacher(x), model(x))

    with pytest.raises(KDCacheError, match="has 10 classes"):
        build_teacher(str(path), num_classes=100)


@pytest.mark.parametrize("wrap", ["raw", "state_dict", "model", "dataparallel"])
def test_build_teacher_from_name_and_weights(tmp_path, wrap):
    model = _trained_a_little("resnet8", num_classes=7)
    sd = model.state_dict()
    obj = {"raw": sd, "state_dict": {"state_dict": sd, "epoch": 9}, "model": {"model": sd, "best_acc": 0.7},
           "dataparallel": {"module." + k: v for k, v in sd.items()}}[wrap]
    path = tmp_path / "w.pth"
    torch.save(obj, path)
    teacher, info = build_teacher("resnet8", num_classes=7, weights=str(path))
    assert not teacher.training
    assert info["arch"] == "resnet8" and info["num_classes"] == 7
    assert info["weights_sha256"] == weights_sha256(model)  # the tensors', however the file wraps them
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(teacher(x), model(x))


def test_build_teacher_with_weights_that_do_not_fit_says_what_differs(tmp_path):
    path = tmp_path / "w100.pth"
    torch.save(create_model("resnet8", num_classes=100).state_dict(), path)
    with pytest.raises(KDCacheError, match=r"do not fit model resnet8: 0 missing keys, 0 unexpected, "
                                           r"2 shape mismatches \(e\.g\. fc\.weight \[100,64\].*\[10,64\]"):
        build_teacher("resnet8", num_classes=10, weights=str(path))
    with pytest.raises(KDCacheError, match="missing keys"):
        build_teacher("resnet20", num_classes=100, weights=str(path))


def test_build_teacher_random_by_name_has_no_weights_hash():
    teacher, info = build_teacher("cnn_tiny", num_classes=10, random_ok=True)  # --random-teacher
    assert not teacher.training and info["weights_sha256"] is None
    with pytest.raises(KDCacheError, match="--random-teacher"):
        build_teacher("cnn_tiny", num_classes=10)
    with pytest.raises(KDCacheError, match="num_classes"):
        build_teacher("cnn_tiny", num_classes=None)
    with pytest.raises(KDCacheError, match="does not exist"):
        build_teacher("runs/resnet8/model.pt", num_classes=None)


def test_the_same_weights_have_one_hash_in_any_file(tmp_path):
    model = _trained_a_little("cnn_tiny")
    _save_ckpt(tmp_path / "model.pt", model, arch="cnn_tiny")
    torch.save(model.state_dict(), tmp_path / "raw.pt")
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, tmp_path / "dp.pt")
    hashes = {build_teacher(str(tmp_path / "model.pt"), num_classes=None)[1]["weights_sha256"]}
    hashes |= {build_teacher("cnn_tiny", num_classes=10, weights=str(tmp_path / f))[1]["weights_sha256"]
               for f in ("raw.pt", "dp.pt")}
    assert len(hashes) == 1
    torch.manual_seed(1)
    assert weights_sha256(create_model("cnn_tiny", num_classes=10)) not in hashes  # other weights, another hash


def test_a_damaged_checkpoint_and_one_of_pickled_objects_get_their_own_advice(tmp_path, teacher_ckpt):
    whole = open(teacher_ckpt, "rb").read()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(whole[: len(whole) // 2])  # a copy that stopped half way
    with pytest.raises(KDCacheError, match=r"is damaged or not a torch.save file .*; save or copy it again"):
        load_checkpoint(str(cut))
    objects = tmp_path / "objects.pt"
    torch.save({"model": KDCacheError}, objects)  # a class: pickled code, which weights_only refuses
    with pytest.raises(KDCacheError, match=r"cannot be read by torch.load\(weights_only=True\).*save plain data"):
        load_checkpoint(str(objects))
