"""Feature KD: a cache gives the same training as a live teacher, adapters train but are never
saved, and every feature pair that cannot work is refused in one line before training starts."""
import json

import pytest
import torch

from kdcache import losses, train, train_student
from kdcache.cli import main
from kdcache.config import TrainConfig
from kdcache.errors import KDCacheError
from kdcache.features import FeaturePair, make_adapter, pairs_for_teacher, parse_feature
from kdcache.models import build_teacher, create_model, load_checkpoint, model_from_checkpoint

FAST = dict(dataset="digits", epochs=1, batch_size=128)


@pytest.fixture(scope="module")
def feature_cache(teacher_ckpt, tmp_path_factory) -> str:
    """The cnn_small teacher with layer2 [32, 8, 8] full, layer3 as a [4, 4] attention map and layer1 pooled [16]."""
    from kdcache import dump_teacher

    return dump_teacher(teacher=teacher_ckpt, dataset="digits", out=str(tmp_path_factory.mktemp("f") / "t.zarr"),
                        activations=["layer2", "layer3:attention", "layer1:pool"], dtype="float32")


# --- the cache changes the cost of feature KD, not its result ------------------------------

@pytest.mark.parametrize("feature", ["layer2=layer2:fitnet", "layer3=layer3:attention"])
def test_feature_kd_from_an_fp32_cache_matches_online_kd_step_for_step(feature, teacher_ckpt, feature_cache, tmp_path):
    # cnn_tiny's layer2 has 16 channels to the teacher's 32, so the fitnet case trains an adapter too
    options = dict(students=["cnn_tiny"], features=[feature], feature_weight=10.0, alpha=0.7, **FAST)
    cached = train_student(cache=feature_cache, out=str(tmp_path / "a"), **options)
    online = train_student(teacher=teacher_ckpt, out=str(tmp_path / "b"), **options)
    a, b = cached[0]["step_losses"], online[0]["step_losses"]
    assert len(a) == len(b) == 12
    for step, (x, y) in enumerate(zip(a, b)):
        assert abs(x - y) <= 1e-5 * max(1.0, abs(y)), (step, x, y)


def test_adapters_train_with_the_student_and_stay_out_of_its_checkpoint(feature_cache, tmp_path, monkeypatch):
    built, make_optimizer = {}, train.make_optimizer

    def spy(cfg, *modules):  # the optimizer fit() builds, what it is over, and the adapters' initial weights
        optimizer = make_optimizer(cfg, *modules)
        built.update(modules=modules, optimizer=optimizer, initial=[p.detach().clone() for p in modules[1].parameters()])
        return optimizer

    monkeypatch.setattr(train, "make_optimizer", spy)
    out = tmp_path / "s"
    rows = train_student(cache=feature_cache, students=["cnn_tiny"], features=["layer2=layer2"], feature_weight=10.0,
                         feature_weight_schedule="linear", out=str(out), **FAST)

    adapters = built["modules"][1]
    in_optimizer = {id(p) for group in built["optimizer"].param_groups for p in group["params"]}
    assert [tuple(p.shape) for p in adapters.parameters()] == [(32, 16, 1, 1), (32,)]  # a 1x1 conv, 16 -> 32 channels
    assert all(id(p) in in_optimizer for p in adapters.parameters())
    assert all(not torch.equal(p, p0) for p, p0 in zip(adapters.parameters(), built["initial"]))

    ckpt = load_checkpoint(out / "cnn_tiny" / "model.pt")
    assert set(ckpt["state_dict"]) == set(create_model("cnn_tiny", num_classes=10).state_dict())
    assert rows[0]["params"] == sum(p.numel() for p in model_from_checkpoint(ckpt).parameters())
    student, info = build_teacher(str(out / "cnn_tiny" / "model.pt"), num_classes=10)  # a plain model
    from kdcache.data import load_split

    test = load_split("digits", "test")
    with torch.no_grad():
        pred = student(torch.stack([test.dataset[i][0] for i in range(len(test))])).argmax(1)
    assert 100.0 * (pred == torch.as_tensor(test.labels)).float().mean().item() == pytest.approx(rows[0]["top1"])

    epoch = json.loads(open(out / "cnn_tiny" / "metrics.jsonl").readline())
    assert {"loss", "task_loss", "kd_loss", "feature_loss", "feature_weight"} <= set(epoch)
    assert 0 < epoch["feature_weight"] < 10.0  # the linear schedule, from 0 on the way to 10


# --- the objective and the adapters, by hand -----------------------------------------------

def test_objective_adds_the_weighted_sum_of_feature_losses_and_reports_it():
    s, t, y = torch.tensor([[2.0, 0.5, -1.0]]), torch.tensor([[1.0, 1.5, -0.5]]), torch.tensor([0])
    cfg = TrainConfig(students=["x"])
    logit_only = train.objective(s, y, {"logits": t}, 0.3, cfg)
    parts = train.objective(s, y, {"logits": t}, 0.3, cfg, {"a": torch.tensor(0.5), "b": torch.tensor(0.25)}, 2.0)
    torch.testing.assert_close(parts["loss"], logit_only["loss"] + 2.0 * 0.75)
    torch.testing.assert_close(parts["feature_loss"], torch.tensor(0.75))


def test_nkd_is_dkd_normalized_with_the_papers_weight():
    s, t, y = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    parts = train.objective(s, y, {"logits": t}, 1.0, TrainConfig(students=["x"], loss="nkd", temperature=2.0))
    torch.testing.assert_close(parts["kd_loss"], losses.dkd(s, t, y, beta=1.5, T=2.0, normalize=True))
    assert "nkd" in losses.KD_LOSSES


@pytest.mark.parametrize("loss, form, student, teacher, out, params", [
    ("fitnet", "full", (16, 16, 16), (32, 8, 8), (32, 8, 8), 32 * 16 + 32),  # pool 16 -> 8, 1x1 conv 16 -> 32
    ("fitnet", "full", (32, 4, 4), (32, 8, 8), (32, 8, 8), 0),  # bilinear 4 -> 8, channels already equal
    ("fitnet", "full", (32, 8, 8), (32, 8, 8), (32, 8, 8), 0),  # nothing to adapt
    ("fitnet", "pool", (16, 4, 4), (32,), (32,), 16 * 32 + 32),  # pool as the cache did, then linear
    ("activation_boundaries", "full", (8, 4, 4), (16, 4, 4), (16, 4, 4), 8 * 16 + 16),
    ("attention", "attention", (16, 4, 4), (8, 8), (8, 8), 0),  # the student's map, resized; no channels
    ("attention", "full", (16, 4, 4), (64, 8, 8), (8, 8), 0),
    ("similarity", "full", (16, 4, 4), (64, 8, 8), (16, 4, 4), 0),  # compares samples: any sizes
    ("rkd", "pool", (16, 4, 4), (64,), (16,), 0),
])
def test_an_adapter_brings_the_student_feature_to_the_shape_its_loss_compares(loss, form, student, teacher, out, params):
    pair = FeaturePair("s=t", "s", "t", loss, form)
    adapter = make_adapter(pair, torch.randn(2, *student), torch.randn(2, *teacher))
    assert tuple(adapter(torch.randn(2, *student)).shape[1:]) == out
    assert sum(p.numel() for p in adapter.parameters()) == params


def test_feature_pairs_read_s_layer_equals_t_act_then_an_optional_loss():
    assert parse_feature("layer3=layer3") == ("layer3", "layer3", "fitnet")
    assert parse_feature("layer3.0.conv2=layer3.1:attention") == ("layer3.0.conv2", "layer3.1", "attention")
    for bad, message in [("layer3", "S_LAYER=T_ACT"), ("=layer3", "S_LAYER=T_ACT"), ("layer3=layer3:kl", "unknown loss"),
                         ("layer3=layer3:full", "is a form, chosen at dump time")]:
        with pytest.raises(KDCacheError, match=message):
            parse_feature(bad)


def test_online_kd_hooks_each_teacher_module_once_in_the_cheapest_form_its_losses_share():
    teacher = create_model("cnn_small", num_classes=10)
    alone = pairs_for_teacher(["layer3=layer3:attention", "layer2=layer2:pkt"], teacher)
    assert [p.form for p in alone] == ["attention", "full"]
    shared = pairs_for_teacher(["layer3=layer3:attention", "layer2=layer3:fitnet"], teacher)
    assert [p.form for p in shared] == ["full", "full"]  # attention takes the full map too


# --- bad pairs: one line, exit status 2, before training -----------------------------------

BAD_FEATURES = {
    "a loss that cannot use the cached form": (["--feature", "layer1=layer1:attention"], "cached as 'pool'"),
    "a cached form the default loss cannot use": (["--feature", "layer3=layer3"], "cached as 'attention'"),
    "an activation the cache does not hold": (["--feature", "layer1=layer9"], "no activation 'layer9'"),
    "a student layer that does not exist": (["--feature", "layer9=layer2"], "no module 'layer9'"),
    "shapes no adapter can join": (["--feature", "fc=layer2"], "student fc gives [10]"),
}


@pytest.mark.parametrize("case", sorted(BAD_FEATURES))
def test_a_feature_pair_that_cannot_work_is_one_line_with_exit_status_two(case, feature_cache, tmp_path, capsys):
    flags, message = BAD_FEATURES[case]
    out = tmp_path / "s"
    try:
        main(["train-student", "--cache", feature_cache, "--student", "cnn_tiny", "--out", str(out), *flags])
        code = 0
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not out.exists()  # refused before the first step


def test_activation_boundaries_trains_the_papers_connector_also_when_channels_match():
    pair = FeaturePair("s=t:activation_boundaries", "s", "t", "activation_boundaries", "full")
    adapter = make_adapter(pair, torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4))
    assert sum(p.numel() for p in adapter.parameters()) == 8 * 8 + 8  # a 1x1 conv, 8 -> 8 channels
    fitnet = make_adapter(FeaturePair("s=t", "s", "t", "fitnet", "full"), torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4))
    assert sum(p.numel() for p in fitnet.parameters()) == 0  # FitNets' hint needs none when shapes match
