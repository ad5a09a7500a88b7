"""Targets that can be trusted at the edges: the exact top-k tail, values float16 cannot hold,
the precision the teacher ran in, and training that stops on a NaN loss instead of going on.

The references are the float32 logits of the same digits teacher (the `fp32_cache` fixture).
"""
import os

import numpy as np
import pytest
import torch
import zarr

from kdcache import dump_teacher, losses, open_cache
from kdcache.config import DumpConfig
from kdcache.convert import convert_store
from kdcache.dump import autocast_dtype
from kdcache.encodings import LogitCodec, TopK
from kdcache.errors import KDCacheError
from kdcache.models import load_checkpoint, save_checkpoint, model_from_checkpoint

C = 10  # digits


def true_logits(store: str, split: str = "train") -> torch.Tensor:
    return torch.from_numpy(np.asarray(zarr.open_group(store, mode="r")[f"{split}/logits"][:]))[:, 0].double()


def true_bins(x: torch.Tensor, k: int, T: float):
    """float64 reference: the tail mass and the sparse K + 1 bins at T, from the unrounded logits."""
    log_p = x - torch.logsumexp(x, dim=1, keepdim=True)
    log_q, idx = log_p.topk(k, dim=1)
    log_m = torch.logsumexp(log_p.scatter(1, idx, float("-inf")), dim=1)
    bins = log_q / T
    if k < x.shape[1]:
        bins = torch.cat([bins, (log_m - (1 - 1 / T) * log_q[:, -1]).unsqueeze(1)], dim=1)
    return log_m.exp(), bins.softmax(dim=1)


def check_topk_targets(store: str, reference: torch.Tensor, k: int, T: float = 4.0):
    t = open_cache(store)["train"].logits  # a TopK [N, V = 1, K]
    teacher = TopK(t.values[:, 0], t.indices[:, 0], t.logsumexp[:, 0], t.log_tail[:, 0], t.num_classes)
    m_true, bins_true = true_bins(reference, k, T)
    got_bins = losses.topk_teacher_bins(teacher, T).double().exp()
    # the tail as the reconstruction gives it at T = 1 (after the top K are rescaled), on every row
    got_m = losses.topk_teacher_bins(teacher, 1.0).double().exp()[:, -1] if k < C else None
    if got_m is not None:
        rel = ((got_m - m_true).abs() / m_true).max().item()
        assert rel <= 1e-3, f"tail mass off by {rel:.2e} relative"
    tv = 0.5 * (got_bins - bins_true).abs().sum(dim=1)
    assert tv.mean().item() <= 1e-3, f"T={T} bins off by TV {tv.mean():.2e} on average"
    return tv


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("k", [1, 4, C - 1])
def test_topk_dump_rebuilds_the_tail_mass_and_the_tempered_bins(teacher_ckpt, fp32_cache, tmp_path, dtype, k):
    # the route users take: dump-teacher --topk K, against the float32 dump of the same teacher
    store = dump_teacher(teacher=teacher_ckpt, dataset="digits", out=str(tmp_path / "k.zarr"), dtype=dtype, topk=k,
                         splits=["train"])
    tv = check_topk_targets(store, true_logits(fp32_cache), k)
    if dtype == "float16":
        assert tv.max().item() <= 1e-3  # every row, not only on average


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("k", [1, 4, C - 1])
def test_topk_convert_from_float32_rebuilds_the_tail_mass(fp32_cache, tmp_path, dtype, k):
    store = convert_store(fp32_cache, str(tmp_path / "k.zarr"), dtype=dtype, topk=k)
    check_topk_targets(store, true_logits(fp32_cache), k)


def test_topk_to_a_smaller_k_moves_the_dropped_classes_into_the_exact_tail(fp32_cache, tmp_path):
    nine = convert_store(fp32_cache, str(tmp_path / "k9.zarr"), dtype="float32", topk=C - 1)
    for dtype in ("float32", "float16"):  # the same value dtype (sliced) and another (rounded again)
        four = convert_store(nine, str(tmp_path / f"k4-{dtype}.zarr"), dtype=dtype, topk=4)
        check_topk_targets(four, true_logits(fp32_cache), 4)


def test_a_topk_store_written_before_the_exact_tail_is_refused_with_the_fix(teacher_ckpt, tmp_path):
    store = dump_teacher(teacher=teacher_ckpt, dataset="digits", out=str(tmp_path / "old.zarr"), topk=4,
                         splits=["train"])
    root = zarr.open_group(store, mode="r+")
    root.attrs.update({"schema_version": 2, "topk_values": None})  # what a schema-2 top-k store says
    with pytest.raises(KDCacheError, match="older kdcache.*dump the teacher again with --topk 4"):
        open_cache(store)["train"]


# ---------------------------------------------------------------------------- float16's range


def _scaled_teacher(ckpt_path: str, out: str, factor: float, layer: str | None = None) -> str:
    """The digits teacher with its last layer's weights (or `layer`'s) multiplied by `factor`."""
    ckpt = load_checkpoint(ckpt_path)
    model = model_from_checkpoint(ckpt)
    params = [p for n, p in model.named_parameters() if layer is None or n.startswith(layer)]
    with torch.no_grad():
        for p in (params[-2:] if layer is None else params):
            p.mul_(factor)
    save_checkpoint(out, model, arch=ckpt["arch"], arch_kwargs=ckpt["arch_kwargs"], num_classes=ckpt["num_classes"],
                    in_chans=ckpt["in_chans"], config=ckpt["config"], metrics=ckpt["metrics"])
    return out


def test_logits_beyond_float16s_range_stop_the_dump_instead_of_storing_inf(teacher_ckpt, tmp_path):
    loud = _scaled_teacher(teacher_ckpt, str(tmp_path / "loud.pt"), 1e5)
    with pytest.raises(KDCacheError, match="float16 stores as inf; dump with --dtype bfloat16 or float32"):
        dump_teacher(teacher=loud, dataset="digits", out=str(tmp_path / "c.zarr"), splits=["test"])
    assert not os.path.exists(tmp_path / "c.zarr")
    # bfloat16 has float32's range: the same teacher is stored, finite
    store = dump_teacher(teacher=loud, dataset="digits", out=str(tmp_path / "b.zarr"), splits=["test"], dtype="bfloat16")
    assert torch.isfinite(open_cache(store)["test"].logits).all()


def test_convert_to_float16_stops_at_logits_or_activations_beyond_its_range(teacher_ckpt, tmp_path):
    loud = _scaled_teacher(teacher_ckpt, str(tmp_path / "loud.pt"), 1e5)
    wide = dump_teacher(teacher=loud, dataset="digits", out=str(tmp_path / "b.zarr"), splits=["test"], dtype="bfloat16")
    with pytest.raises(KDCacheError, match="SRC's logits reach .* float16 stores as inf; convert with --dtype bfloat16"):
        convert_store(wide, str(tmp_path / "h.zarr"), dtype="float16")
    assert not os.path.exists(tmp_path / "h.zarr")
    convert_store(wide, str(tmp_path / "h.zarr"), dtype="float16", topk=4, overwrite=True)  # log-probabilities fit
    assert torch.isfinite(open_cache(str(tmp_path / "h.zarr"))["test"].logits.values).all()
    model = model_from_checkpoint(load_checkpoint(teacher_ckpt))
    first_conv = next(n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d))
    bright = _scaled_teacher(teacher_ckpt, str(tmp_path / "bright.pt"), 1e6, layer=first_conv)
    acts = dump_teacher(teacher=bright, dataset="digits", out=str(tmp_path / "a.zarr"), splits=["test"], dtype="float32",
                        activations=[first_conv], allow_nonfinite=True)
    with pytest.raises(KDCacheError, match="SRC's activations reach .* float16 stores as inf"):
        convert_store(acts, str(tmp_path / "a16.zarr"), dtype="float16", topk=4)


def test_activations_are_checked_too_for_float16_overflow_and_nonfinite_values(teacher_ckpt, tmp_path):
    from kdcache.models import get_module

    model = model_from_checkpoint(load_checkpoint(teacher_ckpt))
    first_conv = next(n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d))
    assert get_module(model, first_conv) is not None
    loud = _scaled_teacher(teacher_ckpt, str(tmp_path / "loud.pt"), 1e6, layer=first_conv)
    with pytest.raises(KDCacheError, match=f"activation {first_conv} .*float16 stores as inf"):
        dump_teacher(teacher=loud, dataset="digits", out=str(tmp_path / "c.zarr"), splits=["test"],
                     activations=[first_conv], allow_nonfinite=True)
    broken = _scaled_teacher(teacher_ckpt, str(tmp_path / "broken.pt"), float("inf"), layer=first_conv)
    with pytest.raises(KDCacheError, match="not finite"):
        dump_teacher(teacher=broken, dataset="digits", out=str(tmp_path / "d.zarr"), splits=["test"],
                     activations=[first_conv], dtype="float32")


# ---------------------------------------------------------------------------- -inf teacher logits


def test_int8_refuses_infinite_logits_and_topk_keeps_a_ruled_out_class_at_probability_zero():
    x = torch.tensor([[3.0, 1.0, float("-inf"), 0.5, float("-inf")]])
    with pytest.raises(KDCacheError, match="int8 logits cannot hold NaN or infinite"):
        LogitCodec("int8", None, 5).encode(x)
    with pytest.raises(KDCacheError, match="cannot hold NaN"):
        LogitCodec("float16", 2, 5).encode(torch.tensor([[3.0, float("nan"), 0.0, 0.0, 0.0]]))
    for k in (2, 4, 5):  # the tail holds finite classes, only -inf ones, or nothing
        codec = LogitCodec("float16", k, 5)
        t = codec.decode(codec.encode(x))
        bins = losses.topk_teacher_bins(t, T=4.0)
        assert not torch.isnan(bins).any() and bins.exp().sum().item() == pytest.approx(1.0, rel=1e-5)
        s = torch.zeros(1, 5, requires_grad=True)
        loss = losses.soft_target_topk(s, t, T=4.0)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


class _Rules(torch.nn.Module):
    """A digits teacher that rules class 7 out (-inf), or gives every row a NaN at class 7."""

    def __init__(self, value: float):
        super().__init__()
        self.fc, self.value = torch.nn.Linear(3 * 64, C), value

    def forward(self, x):
        out = self.fc(torch.nn.functional.adaptive_avg_pool2d(x, 8).flatten(1))
        out[:, 7] = self.value
        return out


def rules_out_a_class(num_classes=C, in_chans=3):
    return _Rules(float("-inf"))


def gives_nan(num_classes=C, in_chans=3):
    return _Rules(float("nan"))


def test_verify_passes_ruled_out_classes_and_empty_tails_and_finds_nan_also_in_bfloat16(teacher_ckpt, tmp_path):
    from kdcache.verify import verify_store

    # K = C: no tail, so every row's log_tail is -inf (verify used to call every such store damaged)
    whole = dump_teacher(teacher=teacher_ckpt, dataset="digits", out=str(tmp_path / "k10.zarr"), topk=C, splits=["test"])
    assert verify_store(whole) == []
    kept = dict(dataset="digits", splits=["test"], random_teacher=True, allow_nonfinite=True)
    for i, options in enumerate([dict(dtype="float16"), dict(dtype="bfloat16"), dict(topk=C - 1)]):  # the tail: class 7
        store = dump_teacher(teacher="test_exact_targets:rules_out_a_class", out=str(tmp_path / f"{i}.zarr"),
                             **kept, **options)
        assert verify_store(store) == [], options
    nan = dump_teacher(teacher="test_exact_targets:gives_nan", out=str(tmp_path / "nan.zarr"), dtype="bfloat16", **kept)
    assert verify_store(nan) == ["test/logits: NaN or +inf values, first at row 0"]  # bfloat16 is stored as bits


# ---------------------------------------------------------------------------- autocast


def test_autocast_follows_the_stored_dtype_unless_asked():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert autocast_dtype(DumpConfig(dtype="float32"), cuda) is None  # float32 stores are float32-accurate
    assert autocast_dtype(DumpConfig(dtype="float16"), cuda) is torch.float16
    assert autocast_dtype(DumpConfig(dtype="int8"), cuda) is torch.float16
    assert autocast_dtype(DumpConfig(dtype="bfloat16"), cuda) is torch.bfloat16
    assert autocast_dtype(DumpConfig(dtype="float32", amp=True), cuda) is torch.float16
    assert autocast_dtype(DumpConfig(dtype="float16", amp=False), cuda) is None
    assert autocast_dtype(DumpConfig(dtype="float16", amp=True), cpu) is None  # the CPU runs float32


def test_the_store_records_the_precision_the_teacher_ran_in(fp32_cache):
    attrs = zarr.open_group(fp32_cache, mode="r").attrs
    assert "autocast" in attrs and attrs["autocast"] is None and attrs["config"]["amp"] is None


# ---------------------------------------------------------------------------- NaN losses


def test_a_nan_training_loss_stops_training_naming_the_epoch_and_step():
    from kdcache.config import TrainConfig
    from kdcache.train import Run, train_one_epoch

    model = torch.nn.Linear(4, 3)
    xs, ys = torch.randn(12, 4), torch.randint(0, 3, (12,))
    xs[2, 0] = float("nan")  # a broken input in the first batch (step 1 of 3)
    loader = torch.utils.data.DataLoader(list(zip(xs, ys, torch.arange(12))), batch_size=4)

    def teacher(x, rows):
        return {"logits": torch.zeros(len(rows), 3)}

    from kdcache.schedules import Schedule

    cfg = TrainConfig(students=["x"], lr=0.1)
    with pytest.raises(KDCacheError, match=r"NaN or inf in epoch 2, step 1 of 3"):
        run = Run(model, torch.optim.SGD(model.parameters(), lr=0.1), cfg, torch.device("cpu"), total_steps=6,
                  teacher=teacher, alpha=Schedule("constant", 0.0, 0.5))
        train_one_epoch(run, loader, step=3)
