"""Sampled targets (random-sampling KD): S classes drawn per row from the tempered teacher, replayable,
and a loss whose mean over draws is the full KD loss, and whose gradient's mean is the full gradient."""
import math

import numpy as np
import pytest
import torch

from kdcache import fidelity, train_student
from kdcache import store as stores
from kdcache.convert import convert_store
from kdcache.encodings import LogitCodec, Sampled, from_storage, to_storage
from kdcache.errors import KDCacheError
from kdcache.losses import soft_target, soft_target_sampled
from kdcache.targets import open_cache
from kdcache.verify import verify_store
from helpers.synthetic_store import stored
from helpers.cli import run

FAST = dict(dataset="digits", epochs=1, batch_size=128)
T = 2.0


def sampler(s: int, c: int, seed: int = 0, dtype: str = "float32", **kw) -> LogitCodec:
    return LogitCodec(dtype, None, c, sample=s, sample_temperature=T, sample_seed=seed, **kw).validate()


def drawn(codec: LogitCodec, x: torch.Tensor) -> Sampled:
    arrays = {n: from_storage(to_storage(t, codec.arrays()[n][1]), codec.arrays()[n][1]) for n, t in codec.encode(x).items()}
    return codec.decode(arrays)


def teacher_and_student(b: int = 3, c: int = 12):
    g = torch.Generator().manual_seed(0)
    return 2 * torch.randn(b, c, generator=g), torch.randn(b, c, generator=g)


def estimates(targets, student: torch.Tensor, loss) -> tuple[torch.Tensor, torch.Tensor]:
    """(losses [M], gradients [M, B, C]) of `loss(student, target)` for each target."""
    values, grads = [], []
    for target in targets:
        s = student.clone().requires_grad_(True)
        value = loss(s, target)
        value.backward()
        values.append(value.detach())
        grads.append(s.grad)
    return torch.stack(values).double(), torch.stack(grads).double()


def assert_mean_converges(samples: torch.Tensor, truth: torch.Tensor, z: float = 5.0) -> None:
    """The mean of M iid estimates lies within z standard errors of `truth`, element by element: with
    M = 800 fixed draws and ~40 elements, a fair estimator passes with probability > 0.9999."""
    mean = samples.mean(0)
    stderr = samples.std(0) / math.sqrt(samples.shape[0])
    assert torch.all((mean - truth.double()).abs() <= z * stderr + 1e-6), ((mean - truth) / stderr).abs().max()


# ----------------------------------------------------------------------------- the estimator


M = 800  # sampled targets, one seed each


@pytest.fixture(scope="module")
def draws():
    teacher, _ = teacher_and_student()
    return [drawn(sampler(6, teacher.shape[1], seed), teacher) for seed in range(M)]


def test_the_mean_over_draws_of_the_loss_and_its_gradient_is_the_full_kd_loss(draws):
    teacher, student = teacher_and_student()
    values, grads = estimates(draws, student, lambda s, t: soft_target_sampled(s, t, T))
    full = student.clone().requires_grad_(True)
    exact = soft_target(full, teacher, T)
    exact.backward()
    assert_mean_converges(values.unsqueeze(1), exact.detach().reshape(1))
    assert_mean_converges(grads.flatten(1), full.grad.flatten())
    assert values.std() > 0.01 * exact  # a real estimate: each draw differs


def test_the_same_check_rejects_the_biased_top_s_renormalised_target(draws):
    """The check has the power to see a bias: S classes renormalised (what top-k KD does) fail it."""
    teacher, student = teacher_and_student()

    def renormalised(s, t):
        log_ps = torch.log_softmax(s / T, 1).gather(1, t.indices)
        w = (t.counts > 0).float() * t.log_q.exp()
        return T * T * (w / w.sum(1, keepdim=True) * (t.log_q - log_ps)).sum(1).mean()

    _, grads = estimates(draws[:300], student, renormalised)
    full = student.clone().requires_grad_(True)
    soft_target(full, teacher, T).backward()
    with pytest.raises(AssertionError):
        assert_mean_converges(grads.flatten(1), full.grad.flatten())


def test_class_frequencies_over_draws_are_the_tempered_teachers(draws):
    teacher, _ = teacher_and_student()
    q = torch.softmax(teacher.double() / T, 1)
    counts = torch.zeros_like(q)
    for d in draws:
        counts.scatter_add_(1, d.indices, d.counts.double())
    freq = counts / (6 * M)
    stderr = (q * (1 - q) / (6 * M)).sqrt()
    assert torch.all((freq - q).abs() <= 5 * stderr)


def test_the_loss_refuses_another_temperature_and_another_shape(draws):
    _, student = teacher_and_student()
    with pytest.raises(ValueError, match="drawn at temperature 2 .* train with --temperature 2"):
        soft_target_sampled(student, draws[0], T=4.0)
    with pytest.raises(ValueError, match="the student needs the teacher's classes"):
        soft_target_sampled(student[:, :5], draws[0], T)


# ----------------------------------------------------------------------------- the draws


def test_draws_are_replayable_whatever_the_batch_and_differ_by_seed():
    x = torch.randn(40, 300) * 3
    codec = sampler(12, 300, seed=7)
    whole = codec.encode(x)
    parts = [codec.encode(x[i : i + 7]) for i in range(0, 40, 7)]
    backwards = codec.encode(x.flip(0))
    for name, t in whole.items():
        assert torch.equal(t, torch.cat([p[name] for p in parts])), name
        assert torch.equal(t, backwards[name].flip(0)), name
    other = sampler(12, 300, seed=8).encode(x)
    assert not torch.equal(whole["sample_indices"], other["sample_indices"])


def test_each_row_holds_distinct_classes_with_counts_summing_to_the_draws_most_drawn_first():
    x = torch.randn(64, 50)
    x[:, 7] = -math.inf  # a class the teacher rules out is never drawn
    codec = sampler(20, 50)
    d = drawn(codec, x)
    used = d.counts > 0
    assert torch.equal(d.counts.sum(1), torch.full((64,), 20.0))
    assert torch.all(d.counts[:, :-1] >= d.counts[:, 1:]) and torch.equal(d.argmax(-1), d.indices[:, 0])
    for row, keep in zip(d.indices, used):
        assert len(set(row[keep].tolist())) == int(keep.sum())
    assert not torch.any((d.indices == 7) & used)
    torch.testing.assert_close(d.log_q[used], torch.log_softmax(x / T, 1).gather(1, d.indices)[used])
    assert torch.all(d.log_q[~used] == 0) and torch.all(d.indices[~used] == 0)


def test_sampled_codec_arrays_bytes_and_attrs():
    codec = sampler(12, 1000, dtype="float16", indices="packed")
    assert codec.arrays() == {"logits": ((12,), "float16"), "sample_indices": ((15,), "uint8"),
                              "sample_counts": ((12,), "uint8")}
    assert codec.bytes_per_view() == 51
    assert LogitCodec.from_attrs(codec.attrs()) == codec
    assert codec.attrs()["encoding"] == "sampled-12-at-T2-seed0+indices-packed-10bit"


@pytest.mark.parametrize("codec, hint", [
    (LogitCodec("float16", 5, 10, sample=4, sample_temperature=4.0), "pass one of them"),
    (LogitCodec("float16", None, 10, sample=256, sample_temperature=4.0), "from 1 to 255"),
    (LogitCodec("int8", None, 10, sample=4, sample_temperature=4.0), "use --dtype float16"),
    (LogitCodec("float16", None, 10, sample=4, sample_temperature=0.0), "must be a positive number"),
    (LogitCodec("float16", None, 10, sample=4, sample_temperature=4.0, sample_seed=-1), "from 0 to 2\\^32 - 1"),
])
def test_bad_sampling_options_are_one_line_errors(codec, hint):
    with pytest.raises(KDCacheError, match=hint) as err:
        codec.validate()
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- stores


@pytest.fixture(scope="module")
def sampled_cache(fp32_cache, tmp_path_factory) -> str:
    return convert_store(fp32_cache, tmp_path_factory.mktemp("s") / "s.zarr", sample=8, sample_temperature=4.0,
                         dtype="float16", indices="packed")


def test_convert_to_sampled_targets_verifies_and_inspect_says_how_they_were_drawn(sampled_cache, capsys):
    assert verify_store(sampled_cache) == []
    arrays = stored(sampled_cache)
    assert arrays["sample_counts"].sum(-1).min() == arrays["sample_counts"].sum(-1).max() == 8
    code, out, err = run(capsys, "inspect", sampled_cache)
    assert code == 0 and "sampled 8 draws at T 4" in out and "teacher top-1" in out, err


def test_a_dump_with_sample_stores_what_convert_stores(teacher_ckpt, sampled_cache, tmp_path, capsys):
    out = str(tmp_path / "d.zarr")
    code, _, err = run(capsys, "dump-teacher", "--teacher", teacher_ckpt, "--dataset", "digits", "--dtype", "float32",
                       "--sample", "8", "--sample-temperature", "4", "--topk-indices", "packed", "--out", out)
    assert code == 0, err
    # float32 log q from the dump, float16 from the convert: the same draws, the same classes
    for name in ("sample_indices", "sample_counts"):
        np.testing.assert_array_equal(stored(out)[name], stored(sampled_cache)[name], err_msg=name)
    assert stores.open_store(out).get_attrs()["sample_temperature"] == 4.0


@pytest.mark.parametrize("targets_in", ["memory", "stream"])
def test_students_train_from_sampled_targets(sampled_cache, tmp_path, targets_in):
    rows = train_student(cache=sampled_cache, students=["cnn_tiny"], out=str(tmp_path), targets_in=targets_in, **FAST)
    assert math.isfinite(rows[0]["top1"]) and all(map(math.isfinite, rows[0]["step_losses"]))
    assert all(loss > 0 for loss in rows[0]["step_losses"])


def test_training_at_another_temperature_or_loss_is_refused_before_it_starts(sampled_cache, tmp_path):
    for options in (dict(temperature=2.0), dict(loss="dkd")):
        with pytest.raises(KDCacheError, match="sampled at temperature 4, an unbiased KD loss only for --loss soft_target"):
            train_student(cache=sampled_cache, students=["cnn_tiny"], out=str(tmp_path), **FAST, **options)


def test_sampled_targets_convert_only_to_another_backend(sampled_cache, tmp_path):
    h5 = convert_store(sampled_cache, tmp_path / "s.h5")
    for name, values in stored(sampled_cache).items():
        np.testing.assert_array_equal(stored(h5)[name], values, err_msg=name)
    a, b = open_cache(h5)["train"].logits, open_cache(sampled_cache)["train"].logits
    assert torch.equal(a.indices, b.indices) and torch.equal(a.counts, b.counts)
    with pytest.raises(KDCacheError, match="from which no other encoding can be made"):
        convert_store(sampled_cache, tmp_path / "k.zarr", topk=4)
    with pytest.raises(KDCacheError, match="holds sampled targets"):
        fidelity.measure(sampled_cache)


def test_a_top_k_store_cannot_be_sampled(fp32_cache, tmp_path):
    top = convert_store(fp32_cache, tmp_path / "t.zarr", topk=4, dtype="float16")
    with pytest.raises(KDCacheError, match="--sample draws from every class"):
        convert_store(top, tmp_path / "s.zarr", sample=8)
