"""Specification of losses.token_kd: forward KL, reverse KL and generalised JSD per token position,
against formulas written out here in numpy (float64), from dense logits and from top-K caches."""

import math

import numpy as np
import pytest
import torch

from kdcache import losses
from kdcache.encodings import LogitCodec, TopK

B, L, C = 2, 3, 6
LOSSES = losses.TOKEN_LOSSES
TOL64 = dict(rtol=1e-9, atol=1e-12)
TOL32 = dict(rtol=1e-5, atol=1e-6)


def logits(*shape, seed=0, scale=2.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def np_kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def np_divergence(loss, p, q, beta=0.5):
    """D(p_teacher, q_student) on one position's probabilities, straight from the definitions."""
    if loss == "soft_target":
        return np_kl(p, q)
    if loss == "reverse_kl":
        return np_kl(q, [max(pi, math.exp(losses.LOG_P_FLOOR)) for pi in p])
    m = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q)]
    return beta * np_kl(p, m) + (1 - beta) * np_kl(q, m)


def np_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def np_token_kd(loss, s, t, T, beta=0.5, mask=None):
    """T^2 * mean over the masked positions of D(softmax(t / T), softmax(s / T)), one position at a time."""
    s, t = s.reshape(-1, s.shape[-1]).numpy(), t.reshape(-1, t.shape[-1]).numpy()
    keep = range(len(s)) if mask is None else np.flatnonzero(mask.reshape(-1).numpy())
    return T * T * np.mean([np_divergence(loss, np_softmax(t[i] / T), np_softmax(s[i] / T), beta) for i in keep])


def topk(x, k):
    """The TopK a float32 top-k cache decodes to, as float64 (the values are float32 logits, exact)."""
    codec = LogitCodec("float32", k, x.shape[-1])
    t = codec.decode(codec.encode(x))
    return TopK(t.values.double(), t.indices, t.logsumexp.double(), t.log_tail.double(), t.num_classes)


# ---------------------------------------------------------------------------- against the formulas


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_each_loss_is_the_mean_over_positions_of_its_divergence(loss, T):
    s, t = logits(B, L, C, seed=1), logits(B, L, C, seed=2)
    got = losses.token_kd(s, t, loss=loss, T=T, beta=0.3)
    assert got.item() == pytest.approx(np_token_kd(loss, s, t, T, beta=0.3), rel=1e-9)


def test_gjsd_at_one_half_is_the_symmetric_jensen_shannon_divergence():
    s, t = logits(B, L, C, seed=3), logits(B, L, C, seed=4)
    p, q = t.softmax(-1), s.softmax(-1)
    m = (p + q) / 2
    jsd = 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)
    got = losses.token_kd(s, t, loss="gjsd", beta=0.5)
    torch.testing.assert_close(got, jsd.mean(), **TOL64)
    # symmetric: swapping student and teacher gives the same value
    torch.testing.assert_close(losses.token_kd(t, s, loss="gjsd"), got, **TOL64)


@pytest.mark.parametrize("loss", LOSSES)
def test_every_loss_is_zero_when_the_student_is_the_teacher(loss):
    t = logits(B, L, C, seed=5)
    assert losses.token_kd(t.clone(), t, loss=loss, T=2.0).item() == pytest.approx(0.0, abs=1e-12)


def test_soft_target_on_b_by_c_is_the_logit_loss_soft_target():
    s, t = logits(4, C, seed=6), logits(4, C, seed=7)
    torch.testing.assert_close(losses.token_kd(s, t, T=4.0), losses.soft_target(s, t, T=4.0), **TOL64)


# ---------------------------------------------------------------------------- top-K teachers


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_topk_with_every_class_kept_equals_the_dense_teacher_in_value_and_gradient(loss, T):
    s, x = logits(B, L, C, seed=8), logits(B, L, C, seed=9).float().double()  # the logits a float32 cache keeps
    s_dense, s_topk = s.clone().requires_grad_(), s.clone().requires_grad_()
    dense = losses.token_kd(s_dense, x, loss=loss, T=T)
    sparse = losses.token_kd(s_topk, topk(x, C), loss=loss, T=T)
    dense.backward()
    sparse.backward()
    torch.testing.assert_close(sparse, dense, **TOL64)
    torch.testing.assert_close(s_topk.grad, s_dense.grad, **TOL64)


@pytest.mark.parametrize("loss", LOSSES)
def test_topk_with_every_class_kept_equals_the_dense_teacher_in_float32(loss):
    s, x = logits(B, L, C, seed=10).float().requires_grad_(), logits(B, L, C, seed=11).float()
    codec = LogitCodec("float32", C, C)
    sparse = losses.token_kd(s, codec.decode(codec.encode(x)), loss=loss, T=2.0)
    (g_sparse,) = torch.autograd.grad(sparse, s)
    dense = losses.token_kd(s, x, loss=loss, T=2.0)
    (g_dense,) = torch.autograd.grad(dense, s)
    torch.testing.assert_close(sparse, dense, **TOL32)
    torch.testing.assert_close(g_sparse, g_dense, **TOL32)


def np_bins(s, t, k, T):
    """Hand-computed K + 1 bins of one position: the teacher's top K at T with its tail packed at
    the K-th probability (soft_target_topk's sparse form), the student's K classes and its tail sum."""
    top = np.argsort(-t, kind="stable")[:k]
    rest = [i for i in range(len(t)) if i not in top]
    log_q = t - np.log(np.exp(t).sum())  # T = 1 log-probabilities
    m = np.exp(log_q[rest]).sum()
    pt = np.exp(np.append(log_q[top] / T, math.log(m) - (1 - 1 / T) * log_q[top[-1]]))
    ps = np_softmax(s / T)
    return pt / pt.sum(), np.append(ps[top], ps[rest].sum())


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_topk_below_c_compares_the_k_classes_and_one_tail_bucket(loss, T):
    k = 2
    s, x = logits(B, L, C, seed=12), logits(B, L, C, seed=13).float().double()
    got = losses.token_kd(s, topk(x, k), loss=loss, T=T, beta=0.3)
    s2, x2 = s.reshape(-1, C).numpy(), x.reshape(-1, C).numpy()
    expected = T * T * np.mean([np_divergence(loss, *np_bins(si, ti, k, T), beta=0.3) for si, ti in zip(s2, x2)])
    assert got.item() == pytest.approx(expected, rel=1e-5)  # lse and tail were computed in float32
    # not the top K renormalised on both sides: the tail bucket carries mass
    renormalised = []
    for si, ti in zip(s2, x2):
        top = np.argsort(-ti, kind="stable")[:k]
        renormalised.append(np_divergence(loss, np_softmax(ti[top] / T), np_softmax(si[top] / T), beta=0.3))
    assert abs(got.item() - T * T * np.mean(renormalised)) > 1e-3


def test_soft_target_from_topk_is_soft_target_topk():
    s, x = logits(4, C, seed=14), logits(4, C, seed=15)
    t = topk(x, 3)
    torch.testing.assert_close(losses.token_kd(s, t, T=4.0), losses.soft_target_topk(s, t, T=4.0), **TOL64)


# ---------------------------------------------------------------------------- masks


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "topk"])
def test_masked_positions_get_no_gradient_and_do_not_change_the_value(loss, sparse):
    s, x = logits(B, L, C, seed=16), logits(B, L, C, seed=17)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    teacher = topk(x, 3) if sparse else x
    s = s.requires_grad_()
    got = losses.token_kd(s, teacher, loss=loss, T=2.0, mask=mask)
    got.backward()
    assert (s.grad[~mask] == 0).all() and (s.grad[mask] != 0).any()
    # the kept positions alone, as a [N, C] batch without a mask
    alone = losses.token_kd(s.detach()[mask], topk(x[mask], 3) if sparse else x[mask], loss=loss, T=2.0)
    torch.testing.assert_close(got, alone, **TOL64)
    # anything at the other positions (padding) is never read
    s_pad, x_pad = s.detach().clone(), x.clone()
    s_pad[~mask], x_pad[~mask] = 1e30, float("nan")
    teacher_pad = topk(x_pad.nan_to_num(1e30), 3) if sparse else x_pad
    torch.testing.assert_close(losses.token_kd(s_pad, teacher_pad, loss=loss, T=2.0, mask=mask), got, **TOL64)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "topk"])
def test_no_target_gives_zero_and_a_zero_gradient(loss, sparse):
    s, x = logits(B, L, C, seed=18).requires_grad_(), logits(B, L, C, seed=19)
    got = losses.token_kd(s, topk(x, 2) if sparse else x, loss=loss, mask=torch.zeros(B, L, dtype=torch.bool))
    got.backward()
    assert got.item() == 0.0 and (s.grad == 0).all()


# ---------------------------------------------------------------------------- ruled-out classes


@pytest.mark.parametrize("loss", LOSSES)
def test_ruled_out_teacher_classes_give_finite_losses_and_gradients(loss):
    s = logits(B, L, C, seed=20).requires_grad_()
    x = logits(B, L, C, seed=21)
    x[..., 1] = float("-inf")
    x[0, 0, 2:] = float("-inf")  # one position keeps a single class
    x[0, 0, 0] = 0.0
    got = losses.token_kd(s, x, loss=loss, T=2.0)
    got.backward()
    assert torch.isfinite(got) and torch.isfinite(s.grad).all()
    assert got.item() == pytest.approx(np_token_kd(loss, s.detach(), x, 2.0), rel=1e-9)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("k", [2, 4, 5])
def test_topk_of_ruled_out_classes_gives_finite_losses_and_gradients(loss, k):
    # the tail holds finite classes (k=2), only -inf ones (k=4: an empty tail the student still fills), or nothing
    x = torch.tensor([[3.0, 1.0, float("-inf"), 0.5, float("-inf")]])
    codec = LogitCodec("float32", k, 5)
    s = torch.zeros(1, 5, requires_grad=True)
    got = losses.token_kd(s, codec.decode(codec.encode(x)), loss=loss, T=4.0)
    got.backward()
    assert torch.isfinite(got) and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("loss", LOSSES)
def test_a_class_both_sides_rule_out_adds_nothing_and_no_nan_gradient(loss):
    # e.g. a vocabulary entry masked in both models: gjsd's mixture there is log(0 + 0)
    s = logits(B, L, C, seed=23)
    x = logits(B, L, C, seed=24)
    s[..., 3] = x[..., 3] = float("-inf")
    s = s.requires_grad_()
    got = losses.token_kd(s, x, loss=loss, T=2.0)
    got.backward()
    assert torch.isfinite(s.grad).all() and (s.grad[..., 3] == 0).all()
    keep = [0, 1, 2, 4, 5]
    torch.testing.assert_close(got, losses.token_kd(s.detach()[..., keep], x[..., keep], loss=loss, T=2.0), **TOL64)


def test_reverse_kl_reads_a_ruled_out_class_at_the_documented_floor():
    s = torch.zeros(1, 3, dtype=torch.float64)  # p_s = 1/3 each
    t = torch.tensor([[0.0, 0.0, float("-inf")]], dtype=torch.float64)
    p = [0.5, 0.5, 0.0]
    expected = sum(1 / 3 * math.log((1 / 3) / max(pi, math.exp(losses.LOG_P_FLOOR))) for pi in p)
    assert losses.token_kd(s, t, loss="reverse_kl").item() == pytest.approx(expected, rel=1e-12)
    assert losses.LOG_P_FLOOR == pytest.approx(math.log(np.finfo(np.float32).tiny))


# ---------------------------------------------------------------------------- refused inputs


@pytest.mark.parametrize(
    "student, teacher, mask, shapes",
    [
        ((B, L, C), (B, L, C + 1), None, r"\(2, 3, 6\).*\(2, 3, 7\)"),
        ((B, L, C), (L, B, C), None, r"\(2, 3, 6\).*\(3, 2, 6\)"),
        ((B, L, C), (B, L, C), (B, L + 1), r"mask \(2, 4\).*\(2, 3\)"),
    ],
    ids=["classes", "positions", "mask"],
)
def test_mismatched_shapes_are_refused_naming_them(student, teacher, mask, shapes):
    m = None if mask is None else torch.ones(mask, dtype=torch.bool)
    with pytest.raises(ValueError, match=shapes):
        losses.token_kd(torch.zeros(student), torch.zeros(teacher), mask=m)


def test_a_topk_teacher_of_other_classes_or_positions_is_refused():
    t = topk(logits(B, L, C, seed=22), 2)
    with pytest.raises(ValueError, match=r"student \(2, 3, 7\).*of 6 classes"):
        losses.token_kd(torch.zeros(B, L, C + 1), t)
    with pytest.raises(ValueError, match=r"student \(3, 2, 6\).*values \(2, 3, 2\)"):
        losses.token_kd(torch.zeros(L, B, C), t)


def test_an_integer_mask_unknown_loss_and_beta_outside_zero_one_are_refused():
    s, t = torch.zeros(B, L, C), torch.zeros(B, L, C)
    with pytest.raises(ValueError, match="bool mask"):
        losses.token_kd(s, t, mask=torch.ones(B, L, dtype=torch.long))
    with pytest.raises(ValueError, match="reverse_kl"):
        losses.token_kd(s, t, loss="forward_kl")
    for beta in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="0 < beta < 1"):
            losses.token_kd(s, t, loss="gjsd", beta=beta)


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_log_probs_given_by_the_caller_are_the_same_student(T):
    """A caller that normalised the student for its CE passes log_softmax(s): the same loss and gradient."""
    from kdcache import encodings
    from kdcache.losses import token_kd

    g = torch.Generator().manual_seed(3)
    t = torch.randn(6, 50, generator=g, dtype=torch.float64) * 3
    teacher = encodings.LogitCodec("float32", 8, 50).decode(encodings.LogitCodec("float32", 8, 50).encode(t.float()))
    teacher = encodings.TopK(*(x.double() if x.is_floating_point() else x for x in
                               (teacher.values, teacher.indices, teacher.logsumexp, teacher.log_tail)), 50)
    for loss in ("soft_target", "reverse_kl", "gjsd"):
        s1 = (torch.randn(6, 50, generator=g, dtype=torch.float64) * 2).requires_grad_()
        s2 = s1.detach().clone().requires_grad_()
        a = token_kd(s1, teacher, loss=loss, T=T)
        b = token_kd(torch.log_softmax(s2, dim=1), teacher, loss=loss, T=T, log_probs=True)
        a.backward()
        b.backward()
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-9, atol=1e-12)


def test_the_student_tail_bucket_is_exact_also_for_a_confident_student():
    """log(1 - sum p_k) serves rows with a large tail; rows whose tail is tiny are summed class by class:
    both match the logsumexp over the other classes, in value and gradient."""
    from kdcache.losses import _student_tail

    g = torch.Generator().manual_seed(5)
    s = torch.randn(8, 40, generator=g, dtype=torch.float32)
    s[:4, :3] += torch.tensor([30.0, 12.0, 9.0])  # confident rows: the top 3 hold all but ~1e-5 .. 1e-12
    indices = s.topk(3, dim=1).indices
    x1, x2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    lp1, lp2 = torch.log_softmax(x1, 1), torch.log_softmax(x2, 1)
    ours = _student_tail(lp1, lp1.gather(1, indices), indices)
    exact = torch.logsumexp(lp2.scatter(1, indices, float("-inf")), dim=1, keepdim=True)
    torch.testing.assert_close(ours, exact, rtol=1e-5, atol=1e-6)
    ours.sum().backward()
    exact.sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-6)
