"""Specification of kdcache.encodings: what each logit encoding stores and what comes back.

Every round trip goes the way a cache does: encode on the device, to_storage (numpy, the store's
dtype), from_storage, decode. Tensors are tiny; the references are plain torch ops on the input.
"""

import numpy as np
import pytest
import torch

from kdcache import losses
from kdcache.encodings import LogitCodec, TopK, from_storage, index_dtype, to_storage
from kdcache.errors import KDCacheError

C = 10


def logits_batch(*shape, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=g)


def through_store(codec, x):
    """encode -> numpy arrays of the declared dtypes -> back, as a cache write and read does."""
    stored = {}
    for name, t in codec.encode(x).items():
        shape, dtype = codec.arrays()[name]
        a = to_storage(t, dtype)
        assert a.dtype == np.dtype(dtype) and a.shape == (*x.shape[:-1], *shape), name
        stored[name] = from_storage(a.copy(), dtype)
    return codec.decode(stored)


def full_kl(s, t, T=1.0):
    return losses.soft_target(s, t, T=T)


# ----------------------------------------------------------------------------- index dtype


@pytest.mark.parametrize("num_classes, expected", [
    (1, "uint8"), (256, "uint8"), (257, "uint16"), (5000, "uint16"), (65536, "uint16"), (65537, "uint32"),
])
def test_index_dtype_is_the_smallest_unsigned_type_holding_every_class(num_classes, expected):
    assert index_dtype(num_classes) == expected


def test_topk_indices_are_exact_for_5000_classes_where_float16_would_lose_them():
    c = 5000
    hot = torch.tensor([4999, 4097, 2049, 3001, 7])
    assert any(float(np.float16(i)) != i for i in hot.tolist())  # why indices are never floats
    x = torch.zeros(1, c)
    x[0, hot] = torch.tensor([9.0, 8.0, 7.0, 6.0, 5.0])
    got = through_store(LogitCodec("float16", 5, c), x)
    assert got.indices.tolist() == [hot.tolist()]


@pytest.mark.parametrize("c, dtype", [(40000, "uint16"), (70000, "uint32")])
def test_topk_indices_above_the_signed_range_survive_storage(c, dtype):
    # 39999 does not fit int16, the carrier of uint16 bits: it must come back unchanged anyway
    x = torch.zeros(2, c)
    x[0, c - 1], x[0, 1], x[1, 32768], x[1, 0] = 3.0, 2.0, 3.0, 2.0
    codec = LogitCodec("float32", 2, c)
    assert codec.arrays()["topk_indices"][1] == dtype
    got = through_store(codec, x)
    assert got.indices.tolist() == [[c - 1, 1], [32768, 0]]
    assert codec.decode(codec.encode(x)).indices.tolist() == got.indices.tolist()  # no store between


# ----------------------------------------------------------------------------- dense floats


@pytest.mark.parametrize("dtype, stored", [("float32", "float32"), ("float16", "float16"), ("bfloat16", "uint16")])
def test_dense_float_round_trip_is_the_logits_rounded_to_dtype(dtype, stored):
    x = logits_batch(2, 3, C)  # [N, V, C]: any leading shape
    codec = LogitCodec(dtype, None, C)
    assert codec.arrays() == {"logits": ((C,), stored)}
    got = through_store(codec, x)
    assert got.dtype == torch.float32 and got.shape == x.shape
    assert torch.equal(got, x.to(getattr(torch, dtype)).float())
    assert torch.equal(codec.decode(codec.encode(x)), got)


def test_bfloat16_is_stored_as_its_bits_in_uint16():
    x = torch.tensor([[1.0, -2.5, 3e38, -0.0]])
    a = to_storage(LogitCodec("bfloat16", None, 4).encode(x)["logits"], "uint16")
    assert a.tolist() == [x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16).tolist()[0]]
    assert a[0, 0] == 0x3F80  # bfloat16 1.0


# ----------------------------------------------------------------------------- int8


def test_int8_round_trip_error_is_at_most_half_a_step_per_element():
    x = logits_batch(4, 2, 50, scale=8.0)
    codec = LogitCodec("int8", None, 50)
    enc = codec.encode(x)
    scale = enc["logits_scale"]
    assert enc["logits"].dtype == torch.int8 and scale.shape == x.shape[:-1]
    assert torch.allclose(scale, (x.amax(-1) - x.amin(-1)) / 255)
    err = (through_store(codec, x) - x).abs()
    # scale / 2 from rounding to the nearest step, plus float32 rounding of q * scale + offset
    bound = scale.unsqueeze(-1) / 2 + 4 * torch.finfo(torch.float32).eps * x.abs().amax()
    assert (err <= bound).all()


def test_int8_uses_the_whole_range_with_min_at_minus_128_and_max_at_127():
    x = logits_batch(3, C)
    q = LogitCodec("int8", None, C).encode(x)["logits"]
    assert q.amin(-1).tolist() == [-128] * 3 and q.amax(-1).tolist() == [127] * 3


def test_int8_constant_rows_come_back_exactly():
    x = torch.tensor([[0.0] * 5, [-3.25] * 5, [1e4] * 5, [0.0, 1.0, 2.0, 3.0, 4.0]])
    got = through_store(LogitCodec("int8", None, 5), x)
    assert torch.equal(got[:3], x[:3])
    assert torch.isfinite(got).all()


# ----------------------------------------------------------------------------- top-K


def test_topk_keeps_the_k_largest_logits_sorted_their_classes_and_the_row_logsumexp():
    x = logits_batch(3, 2, C)
    got = through_store(LogitCodec("float32", 4, C), x)
    assert isinstance(got, TopK) and got.num_classes == C
    assert torch.equal(got.values, x.sort(-1, descending=True).values[..., :4])
    assert torch.equal(x.gather(-1, got.indices), got.values)
    assert (got.indices.sort(-1).values.diff(dim=-1) > 0).all()  # distinct classes
    assert torch.equal(got.logsumexp, torch.logsumexp(x, dim=-1))


def test_topk_float16_values_are_the_top_logits_rounded():
    x = logits_batch(3, C)
    got = through_store(LogitCodec("float16", 3, C), x)
    lse = torch.logsumexp(x, -1, keepdim=True)
    assert torch.equal(got.values, (x.gather(-1, got.indices) - lse).half().float() + lse)
    assert got.logsumexp.dtype == torch.float32 and got.log_tail.dtype == torch.float32


def test_topk_probabilities_at_T1_are_exact_and_so_is_the_tail_mass():
    x = logits_batch(5, C)
    got = through_store(LogitCodec("float32", 3, C), x)
    p = x.softmax(-1)
    p_top = (got.values - got.logsumexp.unsqueeze(-1)).exp()
    assert torch.allclose(p_top, p.gather(-1, got.indices), rtol=1e-5, atol=0)
    tail = p.masked_fill(torch.zeros_like(p, dtype=torch.bool).scatter_(-1, got.indices, True), 0).sum(-1)
    # relatively: the tail's log-mass is computed from the unrounded row and stored in float32
    torch.testing.assert_close(got.log_tail_mass().exp(), tail, rtol=1e-5, atol=0)


def test_dense_reconstruction_spreads_the_exact_tail_mass_evenly():
    x = logits_batch(4, C)
    t = through_store(LogitCodec("float32", 3, C), x)
    dense = t.dense()
    assert dense.shape == (4, C)
    torch.testing.assert_close(dense.gather(-1, t.indices), t.values, rtol=1e-5, atol=1e-6)
    in_top = torch.zeros(4, C, dtype=torch.bool).scatter_(-1, t.indices, True)
    tail = dense[~in_top].view(4, C - 3)
    assert (tail == tail[:, :1]).all()  # one logit for every tail class
    p_true, p_dense = x.softmax(-1), dense.softmax(-1)
    assert torch.allclose(p_dense.gather(-1, t.indices), p_true.gather(-1, t.indices), rtol=1e-5)
    assert torch.allclose(torch.logsumexp(dense, -1), t.logsumexp, atol=1e-5)


def test_a_tiny_stored_tail_survives_values_that_rounding_made_hold_all_the_mass():
    # float16 rounding can make the top K hold all the mass, or more than all of it: the stored
    # tail (here 1e-30) is still the tail, and the K + 1 bins still sum to 1
    t = TopK(values=torch.tensor([[5.0, 0.0]]), indices=torch.tensor([[2, 0]]),
             logsumexp=torch.tensor([4.999]), log_tail=torch.tensor([-69.0776]), num_classes=4)
    dense = t.dense()
    assert torch.isfinite(dense).all()
    assert dense[0, 1] == dense[0, 3]
    torch.testing.assert_close((dense[0, 1] - t.logsumexp[0]).exp() * 2, torch.tensor(1e-30), rtol=1e-4, atol=0)
    assert torch.logsumexp(t.log_probs(), -1).exp().item() + 1e-30 == pytest.approx(1.0, rel=1e-5)
    s = torch.zeros(1, 4, requires_grad=True)
    for reconstruction in ("sparse", "dense"):
        loss = losses.soft_target_topk(s, t, T=4.0, reconstruction=reconstruction)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_k_equal_c_dense_reconstruction_is_exactly_the_logits():
    x = logits_batch(3, C)
    assert torch.equal(through_store(LogitCodec("float32", C, C), x).dense(), x)


@pytest.mark.parametrize("T", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("reconstruction", ["sparse", "dense"])
def test_k_equal_c_topk_loss_is_soft_target(T, reconstruction):
    x, s = logits_batch(4, C), logits_batch(4, C, seed=1)
    teacher = through_store(LogitCodec("float32", C, C), x)
    got = losses.soft_target_topk(s, teacher, T=T, reconstruction=reconstruction)
    assert got.item() == pytest.approx(losses.soft_target(s, x, T=T).item(), rel=1e-5)


def test_sparse_loss_is_finite_has_gradients_and_is_a_lower_bound_of_full_kl_at_T1():
    x = logits_batch(6, C)
    teacher = through_store(LogitCodec("float32", 3, C), x)
    s = logits_batch(6, C, seed=1).requires_grad_()
    loss = losses.soft_target_topk(s, teacher, T=1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    # merging the tail into one bin can only lose information (chain rule of KL)
    assert loss.item() <= full_kl(s, x).item() * (1 + 1e-5)  # KL ~ 5: relative, float32 resolves 1e-6 only near 1


def test_sparse_loss_is_zero_when_the_student_is_the_teacher_at_T1():
    x = logits_batch(3, C)
    teacher = through_store(LogitCodec("float32", 4, C), x)
    assert losses.soft_target_topk(x, teacher, T=1.0).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("T, softer", [(4.0, True), (0.5, False)])
def test_even_spread_misstates_the_tempered_tail_as_documented(T, softer):
    # an uneven tail: at T > 1 the even spread gives it more tempered mass, at T < 1 less
    x = torch.tensor([[6.0, 5.0, 3.0, 0.0, -2.0, -4.0]])
    dense = through_store(LogitCodec("float32", 2, 6), x).dense()
    tail_true = (x / T).softmax(-1)[0, 2:].sum()
    tail_even = (dense / T).softmax(-1)[0, 2:].sum()
    assert (tail_even > tail_true) if softer else (tail_even < tail_true)


def test_topk_loss_rejects_a_teacher_of_other_classes():
    teacher = through_store(LogitCodec("float32", 2, C), logits_batch(2, C))
    with pytest.raises(ValueError, match="classes"):
        losses.soft_target_topk(torch.zeros(2, C + 1), teacher)


def test_topk_index_select_gathers_rows_like_a_batch():
    x = logits_batch(5, C)
    t = through_store(LogitCodec("float16", 2, C), x)
    rows = torch.tensor([4, 0])
    sub = t.index_select(rows)
    assert torch.equal(sub.indices, t.indices[rows]) and torch.equal(sub.logsumexp, t.logsumexp[rows])
    assert torch.equal(sub.dense(), t.dense()[rows])


def test_gathering_stored_rows_before_decoding_equals_decoding_then_gathering():
    # training decodes after the gather, from the carrier tensors from_storage returns
    x = logits_batch(6, 300)  # uint16 indices
    codec = LogitCodec("bfloat16", 3, x.shape[-1])
    enc = {n: from_storage(to_storage(t, codec.arrays()[n][1]), codec.arrays()[n][1])
           for n, t in codec.encode(x).items()}
    rows = torch.tensor([5, 1, 1])
    first = codec.decode({n: t[rows] for n, t in enc.items()})
    assert torch.equal(first.dense(), codec.decode(enc).index_select(rows).dense())


# ----------------------------------------------------------------------------- storage layout


@pytest.mark.parametrize("codec, arrays, nbytes", [
    (LogitCodec("float16", None, 100), {"logits": ((100,), "float16")}, 200),
    (LogitCodec("bfloat16", None, 100), {"logits": ((100,), "uint16")}, 200),
    (LogitCodec("int8", None, 100),
     {"logits": ((100,), "int8"), "logits_scale": ((), "float32"), "logits_offset": ((), "float32")}, 108),
    (LogitCodec("float16", 5, 100),
     {"logits": ((5,), "float16"), "topk_indices": ((5,), "uint8"), "logsumexp": ((), "float32"),
      "log_tail": ((), "float32")}, 23),
    (LogitCodec("bfloat16", 5, 1000),
     {"logits": ((5,), "uint16"), "topk_indices": ((5,), "uint16"), "logsumexp": ((), "float32"),
      "log_tail": ((), "float32")}, 28),
])
def test_arrays_and_bytes_per_view(codec, arrays, nbytes):
    assert codec.arrays() == arrays
    assert codec.bytes_per_view() == nbytes


@pytest.mark.parametrize("codec", [
    LogitCodec("float32", None, C), LogitCodec("bfloat16", None, C), LogitCodec("int8", None, C),
    LogitCodec("float16", 3, C), LogitCodec("bfloat16", C, C),
])
def test_attrs_say_how_the_store_was_encoded_and_give_the_codec_back(codec):
    attrs = codec.attrs()
    assert set(attrs) == {"dtype", "topk", "num_classes", "encoding", "topk_values"}
    assert LogitCodec.from_attrs(attrs) == codec


def test_attrs_name_the_encodings_readers_must_undo():
    assert LogitCodec("bfloat16", None, C).attrs()["encoding"] == "bfloat16-as-uint16"
    assert LogitCodec("bfloat16", 2, C).attrs()["encoding"] == "bfloat16-as-uint16"
    assert LogitCodec("int8", None, C).attrs()["encoding"] == "int8-affine-per-row"
    assert LogitCodec("float16", 2, C).attrs()["encoding"] is None


def test_from_attrs_reads_todays_root_attrs_with_classes_under_teacher():
    attrs = {"dtype": "bfloat16", "encoding": "bfloat16-as-uint16", "topk": None, "teacher": {"num_classes": 10}}
    assert LogitCodec.from_attrs(attrs) == LogitCodec("bfloat16", None, 10)


def test_from_attrs_rejects_an_encoding_that_contradicts_the_dtype():
    with pytest.raises(KDCacheError, match="dump the teacher again"):
        LogitCodec.from_attrs({"dtype": "float16", "encoding": "bfloat16-as-uint16", "topk": None, "num_classes": 3})


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("codec, hint", [
    (LogitCodec("float64", None, C), "use one of float32, float16, bfloat16, int8"),
    (LogitCodec("float16", 0, C), "from 1 to the teacher's 10 classes"),
    (LogitCodec("float16", C + 1, C), "from 1 to the teacher's 10 classes"),
    (LogitCodec("int8", 3, C), "use --dtype float16"),
])
def test_validate_names_the_problem_and_the_fix_in_one_line(codec, hint):
    with pytest.raises(KDCacheError, match=hint) as err:
        codec.validate()
    assert "\n" not in str(err.value)


def test_validate_accepts_every_supported_combination():
    for dtype in ("float32", "float16", "bfloat16", "int8"):
        assert LogitCodec(dtype, None, C).validate()
    for dtype in ("float32", "float16", "bfloat16"):
        assert LogitCodec(dtype, 1, C).validate() and LogitCodec(dtype, C, C).validate()


def test_to_storage_refuses_to_round_and_range_checks_integers():
    with pytest.raises(ValueError, match="without rounding"):
        to_storage(torch.zeros(2), "float16")
    with pytest.raises(ValueError, match="do not fit uint8"):
        to_storage(torch.tensor([256]), "uint8")
    assert to_storage(torch.tensor([65535]), "uint16").tolist() == [65535]  # int64 indices, cast


def test_decode_also_takes_plain_torch_from_numpy_of_unsigned_arrays():
    c = 40000
    x = torch.zeros(1, c)
    x[0, c - 1], x[0, 3] = 5.0, 4.0
    codec = LogitCodec("bfloat16", 2, c)
    arrays = {n: torch.from_numpy(to_storage(t, codec.arrays()[n][1])) for n, t in codec.encode(x).items()}
    got = codec.decode(arrays)
    assert got.indices.tolist() == [[c - 1, 3]]
    # bfloat16 log-probabilities (~ -5.6 here) come back to bfloat16's 2^-8 relative resolution
    torch.testing.assert_close(got.values, torch.tensor([[5.0, 4.0]]), rtol=0, atol=0.03)
