"""Specification of kdcache.losses: each loss against a hand computation written out here.

The references use numpy and explicit loops, not the torch ops of the implementation.
"""

import math

import numpy as np
import pytest
import torch

from kdcache import losses

TOL = dict(rtol=1e-6, atol=1e-9)


def t64(a):
    return torch.tensor(a, dtype=torch.float64)


def np_softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def np_kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def np_smooth_l1(x):
    x = abs(x)
    return 0.5 * x * x if x < 1 else x - 0.5


# Small hand-made batches: B = 3, C = 4, with ties, negatives and a confident row.
S = np.array([[1.0, 2.0, 0.5, -1.0], [0.0, 0.0, 0.0, 0.0], [3.0, -2.0, 1.0, 0.5]])
TT = np.array([[2.0, 1.0, 0.0, -0.5], [1.5, -1.0, 0.5, 2.0], [4.0, -1.0, 0.0, 0.0]])
Y = np.array([1, 3, 0])


# ----------------------------------------------------------------------------- logit losses


def test_soft_target_is_T2_scaled_kl_teacher_to_student_mean_over_batch():
    T = 3.0
    expected = 0.0
    for s, t in zip(S, TT):
        expected += T * T * np_kl(np_softmax(t / T), np_softmax(s / T))
    expected /= len(S)
    got = losses.soft_target(t64(S), t64(TT), T=T)
    assert got.dim() == 0
    assert got.item() == pytest.approx(expected, rel=1e-9)


def test_soft_target_gradient_is_T_times_probability_gap_over_batch():
    T = 2.5
    s = t64(S).requires_grad_()
    losses.soft_target(s, t64(TT), T=T).backward()
    gap = [np_softmax(a / T) - np_softmax(b / T) for a, b in zip(S, TT)]
    expected = T * np.stack(gap) / len(S)
    np.testing.assert_allclose(s.grad.numpy(), expected, **TOL)


def test_soft_target_of_identical_logits_is_zero():
    assert losses.soft_target(t64(TT), t64(TT)).item() == pytest.approx(0.0, abs=1e-12)


def test_soft_target_accepts_float16_teacher_with_float32_student():
    s, t = torch.tensor(S, dtype=torch.float32), torch.tensor(TT, dtype=torch.float16)
    got = losses.soft_target(s, t)
    assert got.dtype == torch.float32


def test_logits_is_mean_squared_error_over_all_entries():
    expected = sum((a - b) ** 2 for a, b in zip(S.ravel(), TT.ravel())) / S.size
    assert losses.logits(t64(S), t64(TT)).item() == pytest.approx(expected, rel=1e-12)


def test_mutual_is_kl_at_temperature_one_mean_over_batch():
    expected = sum(np_kl(np_softmax(t), np_softmax(s)) for s, t in zip(S, TT)) / len(S)
    assert losses.mutual(t64(S), t64(TT)).item() == pytest.approx(expected, rel=1e-9)


def np_tckd_nckd(s, t, g, T):
    """Per-sample TCKD and NCKD (without T^2), the non-target distribution by dropping class g."""
    ps, pt = np_softmax(s / T), np_softmax(t / T)
    tckd = np_kl([pt[g], 1 - pt[g]], [ps[g], 1 - ps[g]])
    keep = [i for i in range(len(s)) if i != g]
    rest = pt[keep].sum()
    # a teacher with no non-target mass has no non-target distribution: NCKD is an empty sum, 0
    nckd = np_kl(pt[keep] / rest, ps[keep] / ps[keep].sum()) if rest > 0 else 0.0
    return tckd, nckd


def np_nkd(s, t, g, alpha, beta, T):
    """Per-sample NKD: alpha * CE of the target class at T = 1 + beta * T^2 * CE of the non-target
    distributions at T; terms of teacher probability 0 (and an empty non-target set) add 0."""
    target_term = -np_softmax(t)[g] * math.log(np_softmax(s)[g])
    keep = [i for i in range(len(s)) if i != g]
    rest = t[keep] / T
    pt = np_softmax(rest) if np.isfinite(rest).any() else np.zeros(len(keep))
    ps = np_softmax(s[keep] / T)
    non_target_term = -sum(a * math.log(b) for a, b in zip(pt, ps) if a > 0)
    return alpha * target_term + beta * T * T * non_target_term


def test_dkd_is_alpha_tckd_plus_beta_nckd_each_T2_scaled():
    alpha, beta, T = 1.5, 2.0, 3.0
    expected = 0.0
    for s, t, g in zip(S, TT, Y):
        tckd, nckd = np_tckd_nckd(s, t, g, T)
        expected += T * T * (alpha * tckd + beta * nckd)
    expected /= len(S)
    got = losses.dkd(t64(S), t64(TT), torch.tensor(Y), alpha=alpha, beta=beta, T=T)
    assert got.item() == pytest.approx(expected, rel=1e-9)


def test_dkd_with_beta_zero_and_alpha_one_is_the_binary_target_class_kl():
    T = 4.0
    expected = sum(T * T * np_tckd_nckd(s, t, g, T)[0] for s, t, g in zip(S, TT, Y)) / len(S)
    got = losses.dkd(t64(S), t64(TT), torch.tensor(Y), alpha=1.0, beta=0.0, T=T)
    assert got.item() == pytest.approx(expected, rel=1e-9)


def test_dkd_reassembles_kd_when_nckd_is_weighted_by_teacher_non_target_mass():
    # the paper's decomposition KD = TCKD + (1 - p_g_teacher) * NCKD, one sample at a time
    T = 2.0
    for s, t, g in zip(S, TT, Y):
        weight = 1.0 - np_softmax(t / T)[g]
        kd = losses.soft_target(t64(s[None]), t64(t[None]), T=T)
        got = losses.dkd(t64(s[None]), t64(t[None]), torch.tensor([g]), alpha=1.0, beta=weight, T=T)
        assert got.item() == pytest.approx(kd.item(), rel=1e-9)


def test_dkd_rejects_soft_label_targets_with_a_hint():
    with pytest.raises(ValueError, match="argmax"):
        losses.dkd(t64(S), t64(TT), torch.rand(3, 4))


def test_dkd_of_identical_logits_is_zero():
    got = losses.dkd(t64(TT), t64(TT), torch.tensor(Y))
    assert got.item() == pytest.approx(0.0, abs=1e-12)


def test_dkd_stays_finite_when_the_teacher_is_certain_in_float32():
    s = torch.tensor([[0.0, 1.0, 2.0]], requires_grad=True)
    t = torch.tensor([[200.0, 0.0, 0.0]])
    loss = losses.dkd(s, t, torch.tensor([0]), T=1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_dkd_normalize_is_the_nkd_loss():
    alpha, beta, T = 1.0, 1.5, 2.0
    expected = sum(np_nkd(s, t, g, alpha, beta, T) for s, t, g in zip(S, TT, Y)) / len(S)
    got = losses.dkd(t64(S), t64(TT), torch.tensor(Y), alpha=alpha, beta=beta, T=T, normalize=True)
    assert got.item() == pytest.approx(expected, rel=1e-9)


def test_dkd_normalize_non_target_term_ignores_the_teachers_target_logit():
    y = torch.tensor(Y)
    t2 = TT.copy()
    t2[np.arange(len(Y)), Y] += 5.0
    a = losses.dkd(t64(S), t64(TT), y, alpha=0.0, beta=1.0, normalize=True)
    b = losses.dkd(t64(S), t64(t2), y, alpha=0.0, beta=1.0, normalize=True)
    assert a.item() == pytest.approx(b.item(), rel=1e-12)


# ----------------------------------------------------------------------------- -inf teacher logits

NEG = float("-inf")
# TT with ruled-out classes: row 0 a non-target class, row 1 its target class (Y[1] = 3), row 2
# every class but its target (Y[2] = 0), a teacher that is certain
TT_OUT = TT.copy()
TT_OUT[0, 2] = NEG
TT_OUT[1, 3] = NEG
TT_OUT[2, 1:] = NEG


def np_logit_loss(name, T=2.0):
    """The float64 reference of each KL loss on S and TT_OUT; a class of teacher probability 0 adds 0."""
    per_sample = {
        "soft_target": lambda s, t, g: T * T * np_kl(np_softmax(t / T), np_softmax(s / T)),
        "mutual": lambda s, t, g: np_kl(np_softmax(t), np_softmax(s)),
        "dkd": lambda s, t, g: T * T * (1.5 * np_tckd_nckd(s, t, g, T)[0] + 2.0 * np_tckd_nckd(s, t, g, T)[1]),
        "nkd": lambda s, t, g: np_nkd(s, t, g, 1.5, 2.0, T),
    }[name]
    return sum(per_sample(s, t, g) for s, t, g in zip(S, TT_OUT, Y)) / len(S)


def logit_loss(name, s, t, T=2.0):
    return {
        "soft_target": lambda: losses.soft_target(s, t, T=T),
        "mutual": lambda: losses.mutual(s, t),
        "dkd": lambda: losses.dkd(s, t, torch.tensor(Y), alpha=1.5, beta=2.0, T=T),
        "nkd": lambda: losses.dkd(s, t, torch.tensor(Y), alpha=1.5, beta=2.0, T=T, normalize=True),
    }[name]()


@pytest.mark.parametrize("name", ["soft_target", "mutual", "dkd", "nkd"])
def test_a_ruled_out_teacher_class_adds_nothing_and_the_gradient_stays_finite(name):
    expected = np_logit_loss(name)
    assert math.isfinite(expected)
    s = t64(S).requires_grad_()
    got = logit_loss(name, s, t64(TT_OUT))
    assert got.item() == pytest.approx(expected, rel=1e-9)
    got.backward()
    assert torch.isfinite(s.grad).all()
    # the cached route: a float16 teacher under a float32 student
    s32 = torch.tensor(S, dtype=torch.float32, requires_grad=True)
    got32 = logit_loss(name, s32, torch.tensor(TT_OUT, dtype=torch.float16))
    assert got32.item() == pytest.approx(expected, rel=1e-5)
    got32.backward()
    assert torch.isfinite(s32.grad).all()


def test_soft_target_with_ruled_out_classes_is_finite_and_its_gradient_the_gap_to_probability_0():
    T = 2.0
    s = t64(S).requires_grad_()
    loss = losses.soft_target(s, t64(TT_OUT), T=T)
    assert torch.isfinite(loss)
    loss.backward()
    gap = [np_softmax(a / T) - np_softmax(b / T) for a, b in zip(S, TT_OUT)]
    np.testing.assert_allclose(s.grad.numpy(), T * np.stack(gap) / len(S), **TOL)


def test_dkd_with_a_certain_teacher_has_no_non_target_term():
    # row 2 of TT_OUT puts all its mass on the target: only TCKD (and NKD's target term) is left
    s, t, y = t64(S[2:]), t64(TT_OUT[2:]), torch.tensor(Y[2:])
    tckd_only = losses.dkd(s, t, y, alpha=1.0, beta=0.0)
    assert losses.dkd(s, t, y, alpha=1.0, beta=8.0).item() == pytest.approx(tckd_only.item(), rel=1e-12)
    target_only = losses.dkd(s, t, y, alpha=1.0, beta=0.0, normalize=True)
    assert losses.dkd(s, t, y, alpha=1.0, beta=1.5, normalize=True).item() == pytest.approx(target_only.item(), rel=1e-12)


@pytest.mark.parametrize("name", ["soft_target", "mutual", "dkd", "nkd"])
@pytest.mark.parametrize("row,match", [([NEG] * 4, "every logit -inf"),
                                       ([1.0, float("nan"), 0.0, 0.0], r"NaN or \+inf"),
                                       ([1.0, float("inf"), 0.0, 0.0], r"NaN or \+inf")])
def test_a_teacher_row_without_a_distribution_is_refused(name, row, match):
    t = TT.copy()
    t[1] = row
    with pytest.raises(ValueError, match=f"{name}: teacher row 1 .*{match}"):
        logit_loss(name, t64(S), t64(t))


def test_logit_regression_refuses_a_non_finite_teacher_and_points_at_soft_target():
    for bad in (NEG, float("inf"), float("nan")):
        t = TT.copy()
        t[0, 1] = bad
        with pytest.raises(ValueError, match="logits: .*use soft_target"):
            losses.logits(t64(S), t64(t))


def test_kd_objective_interpolates_cross_entropy_and_soft_target():
    s, t, y = t64(S), t64(TT), torch.tensor(Y)
    ce = sum(-math.log(np_softmax(a)[g]) for a, g in zip(S, Y)) / len(S)
    only_ce = losses.kd_objective(s, t, y, alpha=0.0, T=4.0)
    assert only_ce["loss"].item() == pytest.approx(ce, rel=1e-9)
    assert only_ce["task_loss"].item() == pytest.approx(ce, rel=1e-9)
    only_kd = losses.kd_objective(s, t, y, alpha=1.0, T=4.0)
    assert only_kd["loss"].item() == pytest.approx(losses.soft_target(s, t, 4.0).item(), rel=1e-12)
    mixed = losses.kd_objective(s, t, y, alpha=0.3, T=4.0)
    assert mixed["loss"].item() == pytest.approx(0.7 * ce + 0.3 * mixed["kd_loss"].item(), rel=1e-9)
    assert set(mixed) == {"loss", "task_loss", "kd_loss"}


# ----------------------------------------------------------------------------- feature losses

g = np.random.default_rng(0)
FS = g.normal(size=(2, 3, 2, 2))  # [B, C, H, W]
FT = g.normal(size=(2, 3, 2, 2))
VS = g.normal(size=(4, 5))  # [B, D]
VT = g.normal(size=(4, 7))  # a different width: relational losses need no adapter


def test_fitnet_is_mean_squared_error_and_its_gradient_is_2_diff_over_n():
    fs = t64(FS).requires_grad_()
    loss = losses.fitnet(fs, t64(FT))
    assert loss.item() == pytest.approx(((FS - FT) ** 2).sum() / FS.size, rel=1e-12)
    loss.backward()
    np.testing.assert_allclose(fs.grad.numpy(), 2 * (FS - FT) / FS.size, **TOL)


def test_fitnet_rejects_shape_mismatch_with_a_hint_to_adapt():
    with pytest.raises(ValueError, match="adapter"):
        losses.fitnet(torch.zeros(2, 3, 4, 4), torch.zeros(2, 5, 4, 4))


def np_attention(x, p):
    b, c, h, w = x.shape
    out = np.zeros((b, h * w))
    for n in range(b):
        for i in range(h):
            for j in range(w):
                out[n, i * w + j] = sum(abs(x[n, k, i, j]) ** p for k in range(c)) / c
        out[n] /= math.sqrt((out[n] ** 2).sum())
    return out


@pytest.mark.parametrize("p", [1, 2, 3])
def test_attention_is_mean_squared_gap_between_unit_attention_maps(p):
    expected = ((np_attention(FS, p) - np_attention(FT, p)) ** 2).mean()
    assert losses.attention(t64(FS), t64(FT), p=p).item() == pytest.approx(expected, rel=1e-9)


def test_attention_gives_the_same_loss_for_full_and_cached_maps():
    fs, ft = t64(FS), t64(FT)
    full = losses.attention(fs, ft)
    cached_s, cached_t = losses.attention_map(fs, 2), losses.attention_map(ft, 2)
    assert cached_t.shape == (2, 2, 2)
    assert losses.attention(fs, cached_t).item() == full.item()
    assert losses.attention(cached_s, ft).item() == full.item()
    assert losses.attention(cached_s, cached_t).item() == full.item()


def test_attention_map_is_channel_mean_of_abs_power_and_passes_3d_maps_through():
    x = t64(FS)
    expected = np.abs(FS) ** 3
    np.testing.assert_allclose(losses.attention_map(x, 3).numpy(), expected.mean(axis=1), **TOL)
    cached = torch.rand(2, 4, 4)
    assert losses.attention_map(cached) is cached


def test_attention_of_identical_maps_is_zero():
    assert losses.attention(t64(FT), t64(FT)).item() == 0.0


def test_attention_rejects_mismatched_spatial_sizes():
    with pytest.raises(ValueError, match="interpolate"):
        losses.attention(torch.rand(2, 3, 4, 4), torch.rand(2, 8, 2, 2))


def test_attention_rejects_cached_map_with_p_other_than_2():
    with pytest.raises(ValueError, match="p=4"):
        losses.attention(torch.rand(2, 3, 4, 4), torch.rand(2, 4, 4), p=4)


def test_attention_rejects_vectors():
    with pytest.raises(ValueError, match="H, W"):
        losses.attention(torch.rand(2, 3), torch.rand(2, 3))


def test_activation_boundaries_penalises_only_the_wrong_side_of_the_margin():
    # teacher off (<= 0): student penalised (s + m)^2 when s > -m; teacher on: (s - m)^2 when s <= m
    fs = t64([[-2.0, -0.5, 0.5, 2.0, -2.0, -0.5, 0.5, 2.0]])
    ft = t64([[-1.0, 0.0, -3.0, -1.0, 1.0, 1.0, 0.1, 5.0]])
    m = 1.0
    per_element = [0.0, 0.5**2, 1.5**2, 3.0**2, 3.0**2, 1.5**2, 0.5**2, 0.0]
    got = losses.activation_boundaries(fs, ft, m=m)
    assert got.item() == pytest.approx(sum(per_element) / 8, rel=1e-12)


def test_activation_boundaries_is_zero_when_student_is_beyond_the_margin_on_the_teachers_side():
    ft = t64(FT)
    fs = torch.where(ft > 0, ft.abs() + 1.0, -ft.abs() - 1.0)
    assert losses.activation_boundaries(fs, ft, m=1.0).item() == 0.0


def np_similarity_gram(x):
    f = x.reshape(len(x), -1)
    b = len(f)
    gram = np.array([[sum(f[i] * f[j]) for j in range(b)] for i in range(b)])
    return gram / np.sqrt((gram**2).sum(axis=1, keepdims=True))


def test_similarity_is_squared_frobenius_gap_of_row_normalised_grams_over_b2():
    expected = ((np_similarity_gram(VS) - np_similarity_gram(VT)) ** 2).sum() / len(VS) ** 2
    assert losses.similarity(t64(VS), t64(VT)).item() == pytest.approx(expected, rel=1e-9)
    expected_maps = ((np_similarity_gram(FS) - np_similarity_gram(FT)) ** 2).sum() / len(FS) ** 2
    assert losses.similarity(t64(FS), t64(FT)).item() == pytest.approx(expected_maps, rel=1e-9)


def test_similarity_rejects_different_batch_sizes():
    with pytest.raises(ValueError, match="batch"):
        losses.similarity(torch.rand(3, 4), torch.rand(2, 4))


def np_pkt_conditional(x):
    f = x.reshape(len(x), -1)
    b = len(f)
    k = np.zeros((b, b))
    for i in range(b):
        for j in range(b):
            cos = f[i] @ f[j] / (np.linalg.norm(f[i]) * np.linalg.norm(f[j]))
            k[i, j] = (cos + 1) / 2
    return k / k.sum(axis=1, keepdims=True)


def test_pkt_is_kl_teacher_to_student_of_cosine_kernel_conditionals_over_b2():
    ps, pt = np_pkt_conditional(VS), np_pkt_conditional(VT)
    expected = sum(np_kl(pt[i], ps[i]) for i in range(len(VS))) / len(VS) ** 2
    # eps = 1e-7 inside the loss moves it by about that much
    assert losses.pkt(t64(VS), t64(VT)).item() == pytest.approx(expected, rel=1e-5)
    assert losses.pkt(t64(VS), t64(VT), eps=0.0).item() == pytest.approx(expected, rel=1e-9)


def test_pkt_of_identical_features_is_zero():
    assert losses.pkt(t64(VT), t64(VT)).item() == pytest.approx(0.0, abs=1e-15)


def np_rkd(fs, ft, wd, wa):
    """The official RKD written with explicit difference vectors and loops."""

    def parts(x):
        f = x.reshape(len(x), -1)
        b = len(f)
        d = np.array([[np.linalg.norm(f[i] - f[j]) for j in range(b)] for i in range(b)])
        mu = d[~np.eye(b, dtype=bool)].mean()
        cos = np.zeros((b, b, b))
        for i in range(b):
            for j in range(b):
                for k in range(b):
                    if i != j and k != j:
                        u, v = f[i] - f[j], f[k] - f[j]
                        cos[i, j, k] = u @ v / (np.linalg.norm(u) * np.linalg.norm(v))
        return d / mu, cos

    ds, cs = parts(fs)
    dt, ct = parts(ft)
    dist = np.mean([np_smooth_l1(a - b) for a, b in zip(ds.ravel(), dt.ravel())])
    angle = np.mean([np_smooth_l1(a - b) for a, b in zip(cs.ravel(), ct.ravel())])
    return wd * dist + wa * angle


def test_rkd_is_weighted_smooth_l1_on_normalised_distances_and_angles():
    expected = np_rkd(VS, VT, 25.0, 50.0)
    assert losses.rkd(t64(VS), t64(VT)).item() == pytest.approx(expected, rel=1e-9)
    got = losses.rkd(t64(FS), t64(FT), distance_weight=2.0, angle_weight=3.0)
    assert got.item() == pytest.approx(np_rkd(FS, FT, 2.0, 3.0), rel=1e-9)


def test_rkd_is_zero_for_a_scaled_and_shifted_copy_of_the_teacher():
    # distances are mean-normalised and angles scale free, so only relations are transferred
    ft = t64(VT)
    assert losses.rkd(3.0 * ft + 7.0, ft).item() == pytest.approx(0.0, abs=1e-12)


def test_rkd_gradient_is_finite_with_duplicate_samples():
    fs = t64(np.stack([VS[0], VS[0], VS[1], VS[2]])).requires_grad_()
    losses.rkd(fs, t64(VT)).backward()
    assert torch.isfinite(fs.grad).all()


def torch_rkd_reference(fs, ft, wd=25.0, wa=50.0):
    """The paper's RKD in float64, vectorised as its official code writes the angles ([B, B, D]
    differences, F.normalize, bmm; anchor first) and with the distances from explicit differences."""

    def parts(x):
        f = x.reshape(len(x), -1).double()
        diff = f.unsqueeze(0) - f.unsqueeze(1)  # [a, b] = f_b - f_a
        d = diff.norm(dim=2)
        mu = d[~torch.eye(len(f), dtype=torch.bool)].mean()
        e = torch.nn.functional.normalize(diff, p=2, dim=2)
        return d / mu, torch.bmm(e, e.transpose(1, 2))

    (ds, cs), (dt, ct) = parts(fs), parts(ft)
    smooth_l1 = torch.nn.functional.smooth_l1_loss
    return wd * smooth_l1(ds, dt) + wa * smooth_l1(cs, ct)


def near_duplicate_batch(seed, b=6, d=8):
    """A float32 batch whose rows 0 and 1 differ by about 1e-6 relative (a duplicated image)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(b, d))
    x[1] = x[0] * (1 + 1e-6 * rng.normal(size=d))
    return torch.tensor(x, dtype=torch.float32)


def test_rkd_of_a_near_duplicate_pair_matches_the_float64_paper_formulation():
    # the Gram-matrix route cancelled here: cosines of ~5e8 and a loss ~1e4 times too large
    fs, ft = near_duplicate_batch(1), near_duplicate_batch(2)
    fs.requires_grad_()
    loss = losses.rkd(fs, ft)
    expected = np_rkd(fs.detach().double().numpy(), ft.double().numpy(), 25.0, 50.0)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    f64 = fs.detach().double().requires_grad_()
    torch_rkd_reference(f64, ft.double()).backward()
    assert f64.grad.abs().max() > 1e3  # the pair's direction is steep in its rows: 1 / d_01
    torch.testing.assert_close(fs.grad.double(), f64.grad, rtol=1e-5, atol=1e-5 * f64.grad.abs().max().item())


def test_rkd_in_blocks_of_one_anchor_is_the_same_and_keeps_no_b_by_b_by_d_tensor(monkeypatch):
    fs, ft = near_duplicate_batch(3, b=5, d=64), near_duplicate_batch(4, b=5, d=48)
    fs.requires_grad_()
    whole = losses.rkd(fs, ft)
    (whole_grad,) = torch.autograd.grad(whole, fs)
    # as if D were large: each anchor is a block of its own, recomputed in backward
    monkeypatch.setattr(losses, "_RKD_BLOCK_ELEMENTS", 1)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        blocked = losses.rkd(fs, ft)
    (blocked_grad,) = torch.autograd.grad(blocked, fs)
    assert blocked.item() == pytest.approx(whole.item(), rel=1e-5)
    torch.testing.assert_close(blocked_grad, whole_grad, rtol=1e-5, atol=1e-5 * whole_grad.abs().max().item())
    assert max(saved) <= 5 * 64  # nothing bigger than the [B, D] input is kept for backward


def test_losses_return_scalars_and_flow_gradient_to_the_student():
    for name, fn in losses.FEATURE_LOSSES.items():
        fs = t64(FS).requires_grad_()
        loss = fn(fs, t64(FT))
        assert loss.dim() == 0, name
        loss.backward()
        assert fs.grad is not None and torch.isfinite(fs.grad).all(), name


# ----------------------------------------------------------------------------- registries


def test_registries_name_every_loss():
    assert set(losses.LOGIT_LOSSES) == {"soft_target", "logits", "mutual", "dkd"}
    assert set(losses.FEATURE_LOSSES) == {
        "fitnet", "attention", "activation_boundaries", "similarity", "pkt", "rkd"
    }
    for name, fn in {**losses.LOGIT_LOSSES, **losses.FEATURE_LOSSES}.items():
        assert fn.__name__ == name


def test_every_feature_loss_declares_the_cached_forms_it_can_use():
    assert set(losses.FEATURE_LOSS_FORMS) == set(losses.FEATURE_LOSSES)
    for forms in losses.FEATURE_LOSS_FORMS.values():
        assert "full" in forms and forms <= {"full", "pool", "attention"}
    assert "pool" not in losses.FEATURE_LOSS_FORMS["attention"]


def test_every_declared_form_runs():
    b, c, h, w = FS.shape
    fs, ft = t64(FS), t64(FT)
    forms = {
        "full": lambda x: x,
        "pool": lambda x: x.mean(dim=(2, 3)),
        "attention": lambda x: losses.attention_map(x, 2),
    }
    for name, allowed in losses.FEATURE_LOSS_FORMS.items():
        for form in allowed:
            loss = losses.FEATURE_LOSSES[name](forms[form](fs), forms[form](ft))
            assert torch.isfinite(loss), (name, form)


# ----------------------------------------------------------------------------- top-K teachers


def topk_teacher(k):
    """TT's K largest logits per row with the full rows' logsumexp, as a top-K cache holds them."""
    from kdcache.encodings import TopK

    idx = np.argsort(-TT, axis=1, kind="stable")[:, :k]
    lse = np.log(np.exp(TT).sum(axis=1))
    p = np.exp(TT - lse[:, None])
    tail = 1.0 - np.take_along_axis(p, idx, 1).sum(axis=1)  # float64: exact enough for the tail's log
    log_tail = np.log(np.clip(tail, 0, None)) if k < TT.shape[1] else np.full(len(TT), -np.inf)
    return TopK(t64(np.take_along_axis(TT, idx, 1)), torch.tensor(idx), t64(lse), t64(log_tail), TT.shape[1]), idx


def np_even_tail_logit(t, top):
    """The logit each of the C - K other classes gets so that they hold the true tail mass evenly."""
    lse = math.log(np.exp(t).sum())
    tail_mass = 1.0 - sum(math.exp(t[i] - lse) for i in top)
    return lse + math.log(tail_mass / (len(t) - len(top)))


def test_soft_target_topk_sparse_is_kl_over_the_k_classes_and_one_tail_bin():
    T, k = 2.0, 2
    teacher, idx = topk_teacher(k)
    expected = 0.0
    for s, t, top in zip(S, TT, idx):
        rest = [i for i in range(len(t)) if i not in top]
        v_k = t[top[-1]]  # the smallest kept logit: no tail class is above it
        packed = sum(math.exp(t[i]) for i in rest) / math.exp(v_k)  # the tail's mass in classes at v_K
        pt = np.array([math.exp(t[i] / T) for i in top] + [packed * math.exp(v_k / T)])
        ps = np_softmax(s / T)
        expected += T * T * np_kl(pt / pt.sum(), [ps[i] for i in top] + [ps[rest].sum()])
    expected /= len(S)
    got = losses.soft_target_topk(t64(S), teacher, T=T)
    assert got.item() == pytest.approx(expected, rel=1e-9)


def test_soft_target_topk_dense_is_soft_target_against_the_evenly_filled_logits():
    T, k = 2.0, 2
    teacher, idx = topk_teacher(k)
    expected = 0.0
    for s, t, top in zip(S, TT, idx):
        filled = np.full(len(t), np_even_tail_logit(t, top))
        filled[top] = t[top]
        expected += T * T * np_kl(np_softmax(filled / T), np_softmax(s / T))
    expected /= len(S)
    got = losses.soft_target_topk(t64(S), teacher, T=T, reconstruction="dense")
    assert got.item() == pytest.approx(expected, rel=1e-9)


def test_kd_objective_takes_any_teacher_a_cache_gives():
    # a top-k cache's TopK (the README's Python API on a --topk store) and dense logits alike
    from kdcache.encodings import LogitCodec

    g = torch.Generator().manual_seed(0)
    s, t, y = torch.randn(4, 10, generator=g), torch.randn(4, 10, generator=g), torch.tensor([1, 2, 3, 4])
    dense = losses.kd_objective(s, t, y, alpha=0.9, T=4.0)
    codec = LogitCodec("float32", 10, 10)
    full = losses.kd_objective(s, codec.decode(codec.encode(t)), y, alpha=0.9, T=4.0)
    assert set(dense) == {"loss", "task_loss", "kd_loss"}
    assert full["loss"].item() == pytest.approx(dense["loss"].item(), rel=1e-5)  # K = C is the dense loss
    top3 = LogitCodec("float16", 3, 10)
    parts = losses.kd_objective(s, top3.decode(top3.encode(t)), y, alpha=0.9, T=4.0, loss="dkd")
    assert torch.isfinite(parts["loss"])
