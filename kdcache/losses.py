"""Distillation losses as pure tensor functions: logit losses, feature losses and the KD objective.

The trainer picks them by name from LOGIT_LOSSES / FEATURE_LOSSES and combines and weights them.
"""


import functools
import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from kdcache import choices
from kdcache.encodings import Sampled, TopK

# Every loss returns a scalar tensor. Teacher arguments are targets: cached tensors carry no grad,
# and a caller with a live teacher (mutual learning) passes it detached. Teacher tensors are cast
# to the student's dtype because caches often hold float16 while students train in float32.
#
# A teacher logit of -inf rules its class out: probability 0, legal in KL (0 log 0 = 0). The KL
# losses (soft_target, mutual, dkd and its NKD form) give such a class 0 loss and the student 0
# gradient on it; a teacher row with every logit -inf, a NaN or a +inf has no distribution and is
# a ValueError, as is any non-finite teacher logit in the regression loss `logits`.


# ---------------------------------------------------------------------------------------------
# Logit losses: student_logits, teacher_logits [B, C]
# ---------------------------------------------------------------------------------------------


def soft_target(student_logits, teacher_logits, T=4.0):
    """Soft-target KD: T^2 * KL(softmax(t/T) || softmax(s/T)), summed over classes, mean over batch.

    Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", NIPS DL workshop 2015.
    The T^2 factor keeps the gradient's size independent of T:
    d/ds = T * (softmax(s/T) - softmax(t/T)) / B.
    A teacher logit of -inf (a class ruled out) is teacher probability 0: that class adds 0 to the
    KL and the loss and its gradient stay finite (the gradient formula above holds with p_t = 0).
    A teacher row whose logits are all -inf, or that holds NaN or +inf, raises ValueError.
    Shapes: student_logits, teacher_logits [B, C]; returns a scalar.
    """
    return _tempered_kl("soft_target", student_logits, teacher_logits, T)


def logits(student_logits, teacher_logits):
    """Logit regression: mean over all B*C entries of (s - t)^2.

    Ba & Caruana, "Do Deep Nets Really Need to be Deep?", NIPS 2014.
    A non-finite teacher logit (-inf for a ruled-out class, +inf, NaN) has no finite regression
    target, so it raises ValueError; soft_target handles -inf as probability 0.
    Shapes: student_logits, teacher_logits [B, C]; returns a scalar.
    """
    _same_shape("logits", student_logits, teacher_logits)
    teacher_logits = teacher_logits.to(student_logits.dtype)
    if not bool(torch.isfinite(teacher_logits).all()):
        raise ValueError(
            "logits: teacher logits hold -inf, +inf or NaN, and regressing onto an infinite target is "
            "undefined; use soft_target (or mutual, dkd, nkd), where a -inf logit is a class of probability 0"
        )
    return F.mse_loss(student_logits, teacher_logits)


def mutual(student_logits, teacher_logits):
    """Mutual-learning KL: KL(softmax(t) || softmax(s)) at T = 1, summed over classes, batch mean.

    Zhang, Xiang, Hospedales & Lu, "Deep Mutual Learning", CVPR 2018. With a live peer network,
    pass its logits detached: each peer learns from the other's prediction as a fixed target.
    -inf teacher logits as in soft_target: probability 0, adding 0 to the loss.
    Shapes: student_logits, teacher_logits [B, C]; returns a scalar.
    """
    return _tempered_kl("mutual", student_logits, teacher_logits, 1.0)


def _tempered_kl(loss, student_logits, teacher_logits, T):
    _same_shape(loss, student_logits, teacher_logits)
    teacher_logits = _checked_teacher(loss, teacher_logits.to(student_logits.dtype))
    log_ps = F.log_softmax(student_logits / T, dim=1)
    log_pt = F.log_softmax(teacher_logits / T, dim=1)
    return T * T * _kl_rows(log_pt, log_ps).mean()


def _kl_rows(log_p, log_q):
    """KL(p || q) per row [B] from log-probabilities [B, C]; a class with p = 0 adds exactly 0."""
    # F.kl_div computes 0 * (-inf - log q) = NaN for a ruled-out class; zeroing both logs there
    # gives 0 * 0, and masked_fill passes no gradient, so neither side gets a NaN
    p = log_p.exp()
    absent = p == 0
    return (p * (log_p.masked_fill(absent, 0.0) - log_q.masked_fill(absent, 0.0))).sum(dim=1)


def _checked_teacher(loss, teacher_logits):
    """The teacher logits [B, C] as they are; ValueError for a row with no distribution (CPU only)."""
    # on an accelerator the check would cost a host sync every step; there such a row gives a NaN
    # loss, which train-student stops at the end of the epoch, naming the step
    if teacher_logits.device.type != "cpu" or bool(torch.isfinite(teacher_logits).all()):
        return teacher_logits
    bad = torch.isnan(teacher_logits) | torch.isposinf(teacher_logits)
    if bool(bad.any()):
        row = int(bad.any(dim=1).nonzero()[0])
        raise ValueError(
            f"{loss}: teacher row {row} holds NaN or +inf (in {teacher_logits.dtype}); only -inf, a class "
            f"ruled out, is allowed: re-dump the teacher or drop the row"
        )
    empty = torch.isneginf(teacher_logits).all(dim=1)
    if bool(empty.any()):
        row = int(empty.nonzero()[0])
        raise ValueError(
            f"{loss}: teacher row {row} has every logit -inf, which rules out every class and is no "
            f"distribution; give at least one class a finite logit or drop the row"
        )
    return teacher_logits


def dkd(student_logits, teacher_logits, target, alpha=1.0, beta=8.0, T=4.0, normalize=False):
    """Decoupled KD: alpha * TCKD + beta * NCKD (normalize=False), or NKD (normalize=True).

    normalize=False -- Zhao, Cui, Song, Qiu & Liang, "Decoupled Knowledge Distillation", CVPR 2022,
    as in the official mdistiller code. With p = softmax(z/T), g the target class and
    b = [p_g, 1 - p_g]:
        TCKD = T^2 * mean_batch KL(b_teacher || b_student)
        NCKD = T^2 * mean_batch KL(p^_teacher || p^_student),
    where p^ is softmax(z/T) over the non-target classes, 0 at g (the official code pushes the
    target logit down by 1000; here it is masked to -inf, which is the same unless the target's
    z/T leads every other class by more than ~250, where -1000 leaves it a share). Plain KD
    equals TCKD + (1 - p_g_teacher) * NCKD; DKD drops that weight so NCKD no longer depends on
    the teacher's target probability. The paper's CIFAR recipe is alpha=1, beta=8, T=4.

    normalize=True -- NKD: Yang, Zeng, Li, Zhang, Yuan & Li, "From Knowledge Distillation to
    Self-Knowledge Distillation: A Unified Approach with Normalized Loss and Customized Soft
    Labels", ICCV 2023, as in its official code (gamma = beta):
        loss = alpha * mean_batch[-q_g_teacher * log q_g_student]
             + beta * T^2 * mean_batch[-sum_{i != g} p^_teacher_i * log p^_student_i],
    where q = softmax(z) at T = 1 (the target term takes no temperature) and p^ is the
    renormalised non-target distribution at T, as above. Both terms are cross-entropies as in
    the paper, so the value is not 0 when student equals teacher; the gradient is that of the
    KL form. The paper's recipe is alpha=1, beta=1.5, T=1.

    -inf teacher logits (ruled-out classes, probability 0), in both forms: a class of teacher
    probability 0 adds 0 to every term, so the loss and the student's gradient stay finite and
    equal the float64 formulas above with 0 log 0 = 0. A -inf target logit is p_g = q_g = 0:
    b_teacher = [0, 1], and NKD's target term is 0. A teacher whose non-target logits are all -inf
    (the target holds all the mass) has no non-target distribution: that row's NCKD, and its NKD
    non-target term, is 0 (the sum over an empty set of classes). A teacher row with every logit
    -inf, or holding NaN or +inf, raises ValueError.

    Shapes: student_logits, teacher_logits [B, C] (C >= 2); target [B] class indices.
    Returns a scalar.
    """
    _same_shape("dkd", student_logits, teacher_logits)
    teacher_logits = _checked_teacher("nkd" if normalize else "dkd", teacher_logits.to(student_logits.dtype))
    if target.shape != student_logits.shape[:1]:
        raise ValueError(
            f"dkd: target {tuple(target.shape)} should hold one class index per sample, "
            f"shape ({student_logits.shape[0]},); pass argmax of soft labels"
        )
    gt = F.one_hot(target.long(), student_logits.shape[1]).to(torch.bool)

    if normalize:
        log_qs = F.log_softmax(student_logits, dim=1)[gt]
        qt = F.softmax(teacher_logits, dim=1)[gt]
        target_term = -(qt * log_qs).mean()
        log_ps_nt = _non_target_log_softmax(student_logits / T, gt)
        log_pt_nt = _non_target_log_softmax(teacher_logits / T, gt)
        non_target_term = _cross_entropy_rows(log_pt_nt, log_ps_nt).mean()
        return alpha * target_term + beta * T * T * non_target_term

    tckd = T * T * _binary_kl(teacher_logits / T, student_logits / T, gt)
    log_ps_nt = _non_target_log_softmax(student_logits / T, gt)
    log_pt_nt = _non_target_log_softmax(teacher_logits / T, gt)
    nckd = T * T * _kl_rows(log_pt_nt, log_ps_nt).mean()
    return alpha * tckd + beta * nckd


def _non_target_log_softmax(z, gt):
    """log p^ [B, C]: log-softmax over the non-target classes, -inf at the target g.

    A row whose non-target logits are all -inf comes back -inf throughout (p^ = 0 everywhere), so
    it adds 0 to a KL or cross-entropy rather than the NaN of a softmax over nothing.
    """
    z = z.masked_fill(gt, float("-inf"))
    empty = torch.isneginf(z).all(dim=1, keepdim=True)
    return F.log_softmax(z.masked_fill(empty, 0.0), dim=1).masked_fill(empty, float("-inf"))


def _cross_entropy_rows(log_p, log_q):
    """-sum p log q per row [B] from log-probabilities [B, C]; a class with p = 0 adds exactly 0."""
    p = log_p.exp()
    return -(p * log_q.masked_fill(p == 0, 0.0)).sum(dim=1)


def _binary_kl(zt, zs, gt):
    """mean_batch KL([p_g, 1 - p_g] teacher || same for student), p = softmax(z), z [B, C]."""
    # log(1 - p_g) as logsumexp(non-target) - logsumexp(all): mdistiller takes log of the summed
    # probabilities, which gives -inf once a confident p_g rounds to 1
    def log_binary(z):
        log_all = torch.logsumexp(z, dim=1)
        log_g = z[gt] - log_all
        log_rest = torch.logsumexp(z.masked_fill(gt, float("-inf")), dim=1) - log_all
        return torch.stack([log_g, log_rest], dim=1)

    return _kl_rows(log_binary(zt), log_binary(zs)).mean()


# ---------------------------------------------------------------------------------------------
# Feature losses: fs student, ft teacher; [B, C, H, W] maps or [B, D] vectors
# ---------------------------------------------------------------------------------------------


def fitnet(fs, ft):
    """FitNets hint loss: mean over all elements of (fs - ft)^2.

    Romero, Ballas, Kahou, Chassang, Gatta & Bengio, "FitNets: Hints for Thin Deep Nets", ICLR 2015.
    The paper's regressor is the trainer's adapter, applied to fs before this call.
    Shapes: fs, ft equal, e.g. [B, C, H, W] or [B, D]; returns a scalar.
    """
    _same_shape("fitnet", fs, ft)
    return F.mse_loss(fs, ft.to(fs.dtype))


def attention_map(x, p=2):
    """Un-normalised attention map: mean over channels of |x|^p, [B, C, H, W] -> [B, H, W].

    A 3-D x is taken to be such a map already (the cached "attention" form) and returned as is.
    Half-precision input is reduced in float32: squares of activations above 256 overflow float16.
    """
    if x.dim() == 3:
        return x
    if x.dim() != 4:
        raise ValueError(
            f"attention needs a [B, C, H, W] feature map or a [B, H, W] attention map, "
            f"got shape {tuple(x.shape)}; use fitnet/similarity/pkt/rkd for vector features"
        )
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    return x.abs().pow(p).mean(dim=1)


def attention(fs, ft, p=2):
    """Attention transfer: mean over B*H*W of (a(fs) - a(ft))^2, a = normalize(attention_map(x, p)).

    Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017; the normalisation is
    the reference code's: at(x) = F.normalize(x.pow(p).mean(1).view(B, -1)), loss
    (at(x) - at(y)).pow(2).mean(), i.e. the squared L2 distance of the per-sample unit vectors
    divided by H*W, mean over batch. The paper's beta (1e3 in the code) is the caller's weight.
    Either argument may be a full map [B, C, H, W] or a cached map [B, H, W] = attention_map(x, 2);
    both give the same loss. A cached map only serves p = 2. Spatial sizes must match (the trainer
    interpolates). Returns a scalar.
    """
    for name, x in (("fs", fs), ("ft", ft)):
        if x.dim() == 3 and p != 2:
            raise ValueError(
                f"attention: {name} is a cached [B, H, W] attention map, which holds mean |x|^2 "
                f"only, but p={p}; use p=2 or cache the full feature map"
            )
    a_s, a_t = attention_map(fs, p), attention_map(ft, p)
    if a_s.shape != a_t.shape:
        raise ValueError(
            f"attention: student map {tuple(a_s.shape)} and teacher map {tuple(a_t.shape)} differ "
            f"(as [B, H, W]); interpolate the student feature to the teacher's spatial size first"
        )
    a_t = a_t.to(a_s.dtype)
    a_s = F.normalize(a_s.reshape(a_s.shape[0], -1), dim=1)
    a_t = F.normalize(a_t.reshape(a_t.shape[0], -1), dim=1)
    return (a_s - a_t).pow(2).mean()


def activation_boundaries(fs, ft, m=1.0):
    """Activation-boundary loss on pre-ReLU features, mean over all elements of

        (fs + m)^2 * [fs > -m and ft <= 0] + (fs - m)^2 * [fs <= m and ft > 0].

    Heo, Lee, Yun & Choi, "Knowledge Transfer via Distillation of Activation Boundaries Formed by
    Hidden Neurons", AAAI 2019 (the alternative hinge loss). The student is pushed to within margin
    m on the teacher's side of 0 for every neuron. The official code sums over elements and divides
    by batch size (and by 1000); the mean here differs from that by the constant C*H*W*1000, which
    the caller's weight absorbs.
    Shapes: fs, ft equal, pre-ReLU, e.g. [B, C, H, W]; returns a scalar.
    """
    _same_shape("activation_boundaries", fs, ft)
    teacher_on = ft > 0
    push_down = (fs + m).pow(2) * ((fs > -m) & ~teacher_on)
    push_up = (fs - m).pow(2) * ((fs <= m) & teacher_on)
    return (push_down + push_up).mean()


def similarity(fs, ft):
    """Similarity-preserving KD: ||G_s - G_t||_F^2 / B^2, G = row_l2_normalize(f f^T), f flattened.

    Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019.
    Shapes: fs [B, ...], ft [B, ...]; only the batch size must match, feature sizes may differ.
    Returns a scalar.
    """
    f_s, f_t = _flat_pair("similarity", fs, ft)
    g_s = F.normalize(f_s @ f_s.t(), dim=1)
    g_t = F.normalize(f_t @ f_t.t(), dim=1)
    return (g_s - g_t).pow(2).sum() / f_s.shape[0] ** 2


def pkt(fs, ft, eps=1e-7):
    """Probabilistic knowledge transfer: KL between cosine-kernel conditional distributions.

    Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer", ECCV
    2018. With f flattened to [B, D], K_ij = (1 + cos(f_i, f_j)) / 2, P_ij = K_ij / sum_j K_ij:
        loss = mean over all B*B pairs (i, j) of P^t_ij * log((P^t_ij + eps) / (P^s_ij + eps)),
    i.e. sum_i KL(P^t_i || P^s_i) / B^2, as in the reference code (which keeps the i = j terms).
    Norms get + eps so an all-zero row gives cosine 0 rather than NaN.
    Shapes: fs [B, ...], ft [B, ...]; only the batch size must match. Returns a scalar.
    """
    f_s, f_t = _flat_pair("pkt", fs, ft)

    def conditional(f):
        f = f / (f.norm(dim=1, keepdim=True) + eps)
        k = (f @ f.t() + 1.0) / 2.0
        return k / k.sum(dim=1, keepdim=True)

    p_s, p_t = conditional(f_s), conditional(f_t)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


def rkd(fs, ft, distance_weight=25.0, angle_weight=50.0):
    """Relational KD: distance_weight * L_D + angle_weight * L_A.

    Park, Kim, Lu & Cho, "Relational Knowledge Distillation", CVPR 2019, as in the official code.
    With f flattened to [B, D] and d_ij = ||f_i - f_j||:
        L_D = mean over all B*B (i, j) of smooth_l1(d^s_ij / mu_s, d^t_ij / mu_t),
              mu = mean of d_ij over i != j;
        L_A = mean over all B^3 (i, j, k) of smooth_l1(cos^s_ijk, cos^t_ijk),
              cos_ijk = <e_ij, e_kj>, e_ij = (f_i - f_j) / d_ij (anchor j), 0 where i = j or k = j.
    smooth_l1 has beta = 1. Distances and angles both come from explicit differences f_i - f_j,
    never from a Gram matrix, whose <f_i, f_k> - <f_i, f_j> - ... cancels for two near-identical
    samples (a duplicated image, a replayed view: it gave cosines of ~5e8). Two identical samples
    have no direction: e_ij = 0 and their cosines are 0, as the official F.normalize gives; a batch
    of identical samples has mu = 0 and normalised distances 0. Gradients stay finite at d = 0.
    Shapes: fs [B, ...], ft [B, ...]; only the batch size must match (B >= 2). Returns a scalar.
    """
    f_s, f_t = _flat_pair("rkd", fs, ft)
    if f_s.shape[0] < 2:
        raise ValueError("rkd compares samples within a batch, so it needs a batch of at least 2")
    distance = F.smooth_l1_loss(_normalised_distances(f_s), _normalised_distances(f_t))
    return distance_weight * distance + angle_weight * _angle_loss(f_s, f_t)


def _normalised_distances(f):
    """d_ij / mu [B, B] for f [B, D], mu the mean of d_ij over i != j."""
    # cdist's default mode takes the Gram route above 25 rows, which cancels for close samples;
    # this mode subtracts, and its backward gives 0 (not NaN) at d = 0: the diagonal, duplicates
    d = torch.cdist(f, f, compute_mode="donot_use_mm_for_euclid_dist")
    off_diagonal = ~torch.eye(f.shape[0], dtype=torch.bool, device=f.device)
    return d / d[off_diagonal].mean().clamp(min=torch.finfo(d.dtype).tiny)


_RKD_BLOCK_ELEMENTS = 1 << 23  # elements of one [anchors, B, D] block of the angle term: 32 MiB in float32


def _angle_loss(f_s, f_t):
    """L_A for f_s [B, D_s], f_t [B, D_t]: the mean of smooth_l1(cos^s_ijk, cos^t_ijk) over i, j, k."""
    # The differences for every anchor at once, as the official code builds them, are a [B, B, D]
    # tensor: 1 GiB in float32 for B = 128 and a flattened 256x8x8 map, and autograd keeps several
    # (differences and their unit vectors). So the anchors j go in blocks of [J, B, D], and with
    # more than one block each is recomputed in backward (checkpoint) instead of kept for it:
    # memory stays O(J*B*D + J*B^2) per block, O(B*D + B^2) with J = 1.
    b = f_s.shape[0]
    per_block = max(1, _RKD_BLOCK_ELEMENTS // (b * max(f_s.shape[1], f_t.shape[1], b)))
    blocks = [(j, min(b, j + per_block)) for j in range(0, b, per_block)]
    run = _angle_block
    if len(blocks) > 1 and torch.is_grad_enabled() and (f_s.requires_grad or f_t.requires_grad):
        run = functools.partial(checkpoint, _angle_block, use_reentrant=False, preserve_rng_state=False)
    return sum(run(f_s, f_t, start, stop) for start, stop in blocks) / b**3


def _angle_block(f_s, f_t, start, stop):
    """Sum of smooth_l1(cos^s_ijk, cos^t_ijk) over the anchors j in [start, stop) and all i, k."""
    return F.smooth_l1_loss(_cosines(f_s, start, stop), _cosines(f_t, start, stop), reduction="sum")


def _cosines(f, start, stop):
    """cos_ijk = <e_ij, e_kj> for the anchors j in [start, stop), laid out [j, i, k]: [J, B, B]."""
    diff = f.unsqueeze(0) - f[start:stop].unsqueeze(1)  # [J, B, D]: f_i - f_j
    norm = torch.linalg.vector_norm(diff, dim=2, keepdim=True)
    # i = j, or an exact duplicate, is a zero difference: e = 0 / 1 = 0, so its cosines are 0
    e = diff / norm.masked_fill(norm == 0, 1.0)
    return e @ e.transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# Registries and the KD objective
# ---------------------------------------------------------------------------------------------

# dkd also takes target; the others take (student_logits, teacher_logits)
LOGIT_LOSSES = {
    "soft_target": soft_target,
    "logits": logits,
    "mutual": mutual,
    "dkd": dkd,
}

FEATURE_LOSSES = {
    "fitnet": fitnet,
    "attention": attention,
    "activation_boundaries": activation_boundaries,
    "similarity": similarity,
    "pkt": pkt,
    "rkd": rkd,
}

# Which cached reduced forms of a teacher feature each loss can train from; the student feature is
# reduced the same way. "full" = module output as is, "attention" = attention_map(x, 2) [B, H, W],
# "pool" = global average pool [B, C].
FEATURE_LOSS_FORMS = {
    # pool(adapter(x)) = adapter(pool(x)) for a 1x1-conv adapter, so the pooled hint is the hint
    # of the pooled feature; MSE between unnormalised attention maps is not FitNets
    "fitnet": frozenset({"full", "pool"}),
    # needs a spatial map; a pooled vector has none
    "attention": frozenset({"full", "attention"}),
    # the loss is about which neurons fire at which position: the sign of a spatial mean says
    # neither, and the attention map is |x|^2 >= 0, so it has no sign at all: full only
    "activation_boundaries": frozenset({"full"}),
    # these three compare samples within the batch, so any per-sample vector works
    "similarity": frozenset({"full", "pool", "attention"}),
    "pkt": frozenset({"full", "pool", "attention"}),
    "rkd": frozenset({"full", "pool", "attention"}),
}


KD_LOSSES = choices.KD_LOSSES  # LOGIT_LOSSES and nkd: dkd(normalize=True), the NKD variant


def logit_kd_loss(name, student_logits, teacher, target, T=4.0, reconstruction="sparse"):
    """The logit loss `name` (KD_LOSSES) between student logits [B, C] and any teacher a cache gives:
    logits [B, C], a TopK (soft_target uses it as it is, the other losses its dense reconstruction)
    or a Sampled (soft_target only: its unbiased estimate). target [B] classes (dkd, nkd)."""
    if isinstance(teacher, Sampled):  # a few drawn classes: only soft_target has an unbiased estimate from them
        if name != "soft_target":
            raise ValueError("sampled targets estimate soft_target's loss only; use --loss soft_target")
        return soft_target_sampled(student_logits, teacher, T)
    if isinstance(teacher, TopK):
        if name == "soft_target":
            return soft_target_topk(student_logits, teacher, T, reconstruction=reconstruction)
        teacher = teacher.dense()
    if name == "soft_target":
        return soft_target(student_logits, teacher, T)
    if name == "dkd":
        return dkd(student_logits, teacher, target, T=T)  # the paper's CIFAR recipe: alpha=1, beta=8
    if name == "nkd":
        return dkd(student_logits, teacher, target, beta=1.5, T=T, normalize=True)  # the paper's gamma=1.5
    if name not in LOGIT_LOSSES:
        raise ValueError(f"unknown logit loss {name!r}; use one of {', '.join(KD_LOSSES)}")
    return LOGIT_LOSSES[name](student_logits, teacher)


def kd_objective(student_logits, teacher, target, alpha, T, *, loss="soft_target", reconstruction="sparse",
                 feature_losses=None, feature_weight=0.0):
    """The KD objective, the one train-student and the integrations use:

        loss = (1 - alpha) * CE(s, target) + alpha * KD(s, t) + feature_weight * sum(feature_losses),

    KD = logit_kd_loss(`loss`) at temperature T (Hinton's soft_target by default), as in fasterai's
    KnowledgeDistillationCallback. `teacher` is logits [B, C] or what a compact cache decodes to
    (TopK, Sampled). target [B] class indices, or [B, C] mixed labels (with soft_target).
    feature_losses: {pair: scalar}, already computed (features.FeatureKD).
    Returns {"loss", "task_loss", "kd_loss"} (+ "feature_loss", their unweighted sum), each a scalar,
    so the trainer can log the parts.
    """
    task_loss = F.cross_entropy(student_logits, target)
    kd_loss = logit_kd_loss(loss, student_logits, teacher, target, T, reconstruction)
    parts = {"loss": (1 - alpha) * task_loss + alpha * kd_loss, "task_loss": task_loss, "kd_loss": kd_loss}
    if feature_losses:
        parts["feature_loss"] = sum(feature_losses.values())
        parts["loss"] = parts["loss"] + feature_weight * parts["feature_loss"]
    return parts


# ---------------------------------------------------------------------------------------------
# Shape checks: errors name both shapes and what to do
# ---------------------------------------------------------------------------------------------


def _same_shape(loss, s, t):
    if s.shape != t.shape:
        raise ValueError(
            f"{loss}: student {tuple(s.shape)} and teacher {tuple(t.shape)} shapes differ; "
            f"add an adapter (or interpolate) so the student matches the teacher"
        )


def _flat_pair(loss, fs, ft):
    if fs.shape[0] != ft.shape[0]:
        raise ValueError(
            f"{loss}: student batch {fs.shape[0]} and teacher batch {ft.shape[0]} differ; "
            f"the loss compares the same samples under both networks"
        )
    f_s = fs.reshape(fs.shape[0], -1)
    return f_s, ft.reshape(ft.shape[0], -1).to(f_s.dtype)


# ---------------------------------------------------------------------------------------------
# Top-K teachers: a cache that kept only the K largest logits per row (kdcache.encodings.TopK)
# ---------------------------------------------------------------------------------------------


def soft_target_topk(student_logits, teacher, T=4.0, reconstruction="sparse"):
    """Soft-target KD from a top-K teacher: K values, their classes and the row's logsumexp.

    The tail's total mass at T = 1 is known exactly (TopK.log_tail, computed before the values were
    rounded); how it splits over the C - K other classes is not, and at T != 1 that split matters. What is known: every
    tail logit is at most v_K, the K-th largest.

    reconstruction="dense" -- FKD's choice (Shen & Xing, "A Fast Knowledge Distillation Framework
    for Visual Recognition", ECCV 2022): soft_target(s, teacher.dense(), T), plain KD against
    logits where every tail class holds the even-split logit l_tail = lse + log(m / (C - K))
    (TopK.tail_logit). The student is pulled to a flat tail.

    reconstruction="sparse" -- KL over K + 1 bins, the teacher's K classes and one tail bucket:
        teacher  softmax([log q_1 / T, ..., log q_K / T, log m - (1 - 1/T) log q_K]), q = TopK.log_probs()
                 exponentiated: the tail's mass m packed into as few classes as its T = 1 mass allows,
                 m / q_K, each at the largest probability a tail class can have, q_K,
        student  [log p^s_k for the K classes, logsumexp over the other classes of log p^s_j],
                 p^s = softmax(s / T) over all C classes,
        loss = T^2 * mean_batch KL(teacher bins || student bins).
    With K == C there is no bucket and both forms equal soft_target.

    Bias. At T = 1 both are exact in the teacher's bins. At T != 1 the tail's tempered mass is
    exp(lse / T) * sum_{j in tail} q_j^(1/T), q_j = exp(l_j - lse) <= q_K, sum_j q_j = m. For T > 1
    x^(1/T) is concave, so that sum is largest when the q_j are equal (the even split of "dense")
    and smallest when they are packed at q_K (the bound "sparse" uses). So for T > 1 "dense" gives
    the tail too much tempered mass (a teacher softer than the real one: measured on digit-pairs
    at T = 4, the even tail of top-8 puts about half the mass in the tail and ruins KD), and
    "sparse" too little (a sharper teacher, whose top-K classes keep their true relative weights);
    for T < 1 both inequalities flip. The error vanishes at T = 1 or K = C and grows with how
    uneven the real tail is. The sparse form also says nothing about how the student spreads its
    mass inside the tail: by the chain rule of KL,
        KL(p || q) = KL(p_bins || q_bins) + p_tail * KL(p(. | tail) || q(. | tail)),
    so the merged-bin KL is a lower bound of the full KL and the tail's inner shape gets no
    gradient (where "dense" pushes it towards flat).

    Shapes: student_logits [B, C]; teacher a TopK with values, indices [B, K], logsumexp, log_tail
    [B], num_classes C. Returns a scalar.
    """
    if reconstruction == "dense":
        return soft_target(student_logits, teacher.dense().to(student_logits.dtype), T)
    if reconstruction != "sparse":
        raise ValueError(f"soft_target_topk: reconstruction={reconstruction!r} is not known; use 'sparse' or 'dense'")
    b, c = student_logits.shape
    k = teacher.values.shape[-1]
    if teacher.num_classes != c or teacher.values.shape != (b, k):
        raise ValueError(
            f"soft_target_topk: student {tuple(student_logits.shape)} but teacher top-{k} "
            f"{tuple(teacher.values.shape)} of {teacher.num_classes} classes; the student needs the "
            f"teacher's classes and the batch's rows (gather the TopK with the same indices)"
        )
    log_pt_bins, log_ps_bins = _topk_bins(student_logits, teacher, T)
    # a bin of teacher probability 0 (an empty tail, a ruled-out class) adds 0 to KL, not 0 * -inf = NaN
    return T * T * _kl_rows(log_pt_bins, log_ps_bins).mean()


def _tempered(s, T, normalized=False):
    """log_softmax(s / T); s itself when it is already log-probabilities at T = 1."""
    return s if normalized and T == 1 else F.log_softmax(s / T, dim=1)


def _topk_bins(student_logits, teacher, T, normalized=False):
    """(teacher, student) log-probabilities over the same bins, each [B, K + 1] ([B, K] at K == C):
    topk_teacher_bins, and log softmax(s / T) at the K classes plus the logsumexp of the others.
    student_logits [B, C]; teacher a TopK of B rows over the same C classes."""
    log_ps = _tempered(student_logits, T, normalized)
    log_ps_bins = log_ps.gather(1, teacher.indices)
    if teacher.k < teacher.num_classes:
        log_ps_bins = torch.cat([log_ps_bins, _student_tail(log_ps, log_ps_bins, teacher.indices)], dim=1)
    return topk_teacher_bins(teacher, T).to(student_logits.dtype), log_ps_bins


STUDENT_TAIL_EXACT_BELOW = 1e-2  # a student tail this small is summed class by class (see _student_tail)


def _student_tail(log_ps, log_ps_top, indices):
    """log of the student's mass outside the K kept classes, [B, 1], from its log-probabilities [B, C].

    log(1 - sum_k p_k) costs K exps per row instead of a pass over all C classes (at a 2k or 150k
    vocabulary that pass is most of what KD adds to a step), but it cancels as the tail shrinks:
    float32 sums the K probabilities to ~1e-7, so a tail below STUDENT_TAIL_EXACT_BELOW would lose
    more than 1e-5 of itself. Those rows are summed over their other classes (a logsumexp), exactly.
    """
    top_mass = log_ps_top.exp().sum(dim=1, keepdim=True)
    tail = torch.log1p(-top_mass.clamp(max=1.0))
    small = (1.0 - top_mass.detach()).squeeze(1) < STUDENT_TAIL_EXACT_BELOW
    if bool(small.any()):
        rows = small.nonzero().squeeze(1)
        exact = torch.logsumexp(log_ps[rows].scatter(1, indices[rows], float("-inf")), dim=1, keepdim=True)
        tail = tail.index_put((rows,), exact)
    return tail


def topk_teacher_bins(teacher, T=4.0):
    """The sparse reconstruction's teacher distribution: log-probabilities [B, K + 1] (or [B, C] at K == C).

    Bins: the K kept classes, then the tail bucket (omitted when K == C), at temperature T:
        softmax([log q_1 / T, ..., log q_K / T, log m - (1 - 1/T) log q_K]),
    with log q = TopK.log_probs() (the top K rescaled to 1 - m) and m the stored tail mass: the
    row's logsumexp cancels, and rounded values cannot eat the tail. An empty tail (m = 0) is a bin
    of probability 0 (-inf), also when q_K is 0 too.
    """
    log_q = teacher.log_probs()
    bins = log_q / T
    if teacher.k < teacher.num_classes:
        log_m = teacher.log_tail
        tail = torch.where(torch.isinf(log_m), log_m, log_m - (1 - 1 / T) * log_q[..., -1])
        bins = torch.cat([bins, tail.unsqueeze(-1)], dim=-1)
    return F.log_softmax(bins, dim=-1)


# ---------------------------------------------------------------------------------------------
# Sampled teachers: S classes drawn per row from the tempered teacher (kdcache.encodings.Sampled)
# ---------------------------------------------------------------------------------------------


def soft_target_sampled(student_logits, teacher, T=4.0):
    """Random-sampling KD: an unbiased estimate of soft_target's T^2 * KL(p_T || softmax(s / T)).

    Anshumann et al., "Sparse Logit Sampling: Accelerating Knowledge Distillation in LLMs", ACL 2025.
    The teacher row is S classes j_1 .. j_S drawn with replacement from the proposal q = p_T (the
    teacher's tempered distribution, stored with each class's log q_j), kept as distinct classes i
    with counts c_i. Since KL(p || p^s) = E_{j ~ p}[log p_j - log p^s_j],
        loss = T^2 * mean_batch sum_i (c_i / S) * (log q_i - log p^s_i),   p^s = softmax(s / T),
    has expectation T^2 * KL exactly, and its gradient, -T^2 * sum_i (c_i / S) * d log p^s_i / ds,
    has expectation -T^2 * sum_j p_j * d log p^s_j / ds, the full loss's gradient (the log q term
    is a constant). Unbiased only at the proposal's temperature: at another T the tempered target
    needs its normaliser, which S draws do not give; so T must be the one the targets were drawn at.
    Where top-K targets bias every step the same way, these are noisy around the truth: with S ~ 12
    the student matches full KD (the paper's finding on LLM pre-training).

    Shapes: student_logits [B, C]; teacher a Sampled with indices, counts, log_q [B, S] and
    num_classes C. Returns a scalar.
    """
    b, c = student_logits.shape
    s = teacher.indices.shape[-1]
    if teacher.num_classes != c or teacher.indices.shape != (b, s):
        raise ValueError(
            f"soft_target_sampled: student {tuple(student_logits.shape)} but teacher's {s} sampled classes "
            f"{tuple(teacher.indices.shape)} of {teacher.num_classes}; the student needs the teacher's classes "
            f"and the batch's rows (gather the Sampled with the same indices)"
        )
    if not math.isclose(T, teacher.temperature, rel_tol=1e-6):
        raise ValueError(
            f"the sampled targets were drawn at temperature {teacher.temperature:g} and give an unbiased KD "
            f"loss only there, not at {T:g}; train with --temperature {teacher.temperature:g}, or convert "
            f"the full-precision store again with --sample-temperature {T:g}"
        )
    log_ps = F.log_softmax(student_logits / T, dim=1).gather(1, teacher.indices)
    weights = teacher.weights().to(student_logits.dtype)  # 0 in unused slots: their log q of 0 adds nothing
    per_row = (weights * (teacher.log_q.to(student_logits.dtype) - log_ps)).sum(dim=1)
    return T * T * per_row.mean()


# ---------------------------------------------------------------------------------------------
# Token-level losses: student_logits [..., C] (e.g. [B, L, C]), a teacher per position
# ---------------------------------------------------------------------------------------------

TOKEN_LOSSES = ("soft_target", "reverse_kl", "gjsd")

# reverse_kl and gjsd read the teacher's log-probabilities where the student puts mass: a class the
# teacher rules out (probability 0) would cost +inf in reverse KL, and give the mixture log(0 + 0) =
# -inf, whose gradient is NaN, where the student's probability is 0 too; they read it as this floor
LOG_P_FLOOR = math.log(torch.finfo(torch.float32).tiny)  # log of float32's smallest normal, ~ -87.34


def token_kd(student_logits, teacher, *, loss="soft_target", T=1.0, beta=0.5, mask=None, log_probs=False):
    """Mean over target positions of T^2 * D(p_t, p_s), p_t = softmax(t / T), p_s = softmax(s / T):

        "soft_target"  KL(p_t || p_s), forward KL: Hinton, Vinyals & Dean 2015 (mean-seeking),
        "reverse_kl"   KL(p_s || p_t): MiniLLM, Gu, Dong, Wei & Huang, ICLR 2024 (mode-seeking),
        "gjsd"         beta * KL(p_t || m) + (1 - beta) * KL(p_s || m), m = beta * p_t + (1 - beta) * p_s,
                       the generalised JSD of GKD (Agarwal et al., "On-Policy Distillation of
                       Language Models", ICLR 2024) and DistiLLM (Ko et al., ICML 2024); beta = 0.5
                       is the symmetric JSD, beta in (0, 1); m is taken in log space.
    T^2 keeps the gradient's size independent of T, as in soft_target.

    teacher: raw logits [..., C], or a TopK with values, indices [..., K] and logsumexp, log_tail
    [...]: then both sides are the K + 1 bins of soft_target_topk's sparse form (the K classes and
    one tail bucket; see there for its bias at T != 1), and with K == C this equals the dense loss.
    mask [...] bool: the positions that carry a target (None: all). Only those rows are gathered and
    computed, so the cost follows the targets; the others are never read (padding may hold
    anything) and get zero gradient. With no target the result is 0, still a graph for backward.

    A teacher probability of 0 (a -inf logit, an empty tail) adds 0 to KL(p_t || .), also in the
    gradient. reverse_kl and gjsd clamp the teacher's log-probabilities from below at LOG_P_FLOOR
    (log of float32's smallest normal, ~ -87.3) where they read them, so a student mass p on a
    ruled-out class costs p * (log p + 87.3) in reverse KL, not +inf. A dense teacher row with no
    distribution (all -inf, NaN or +inf) raises ValueError, as in soft_target.
    log_probs=True: student_logits are already log_softmax(s), as a caller computing the next-token
    CE from them has (the same distribution, since softmax ignores a row's shift); at T = 1 the
    softmax over the vocabulary is then not computed again.
    Returns a scalar.
    """
    if loss not in TOKEN_LOSSES:
        raise ValueError(f"token_kd: loss {loss!r} is not known; use one of {', '.join(TOKEN_LOSSES)}")
    if loss == "gjsd" and not 0 < beta < 1:
        raise ValueError(f"token_kd: gjsd needs 0 < beta < 1, got {beta!r}; at 0 or 1 the divergence is 0 "
                         f"whatever the student (use 0.5 for the symmetric JSD)")
    _token_shapes(student_logits, teacher, mask)
    n_lead, c = student_logits.dim() - 1, student_logits.shape[-1]
    rows = None if mask is None else mask.reshape(-1)
    s = _target_rows(student_logits, n_lead, rows)  # [N, C]
    if isinstance(teacher, TopK):
        t = TopK(*(_target_rows(x, n_lead, rows) for x in (teacher.values, teacher.indices, teacher.logsumexp,
                                                          teacher.log_tail)), c)
        log_pt, log_ps = _topk_bins(s, t, T, normalized=log_probs)
    else:
        t = _checked_teacher("token_kd", _target_rows(teacher, n_lead, rows).to(s.dtype))
        log_pt, log_ps = F.log_softmax(t / T, dim=1), _tempered(s, T, log_probs)
    if loss == "soft_target":
        per_position = _kl_rows(log_pt, log_ps)
    elif loss == "reverse_kl":
        per_position = _kl_rows(log_ps, log_pt.clamp(min=LOG_P_FLOOR))
    else:
        per_position = _gjsd_rows(log_pt, log_ps, beta)
    # a sum over no positions is 0 with a graph; .mean() of none would be NaN
    return T * T * per_position.sum() / max(per_position.numel(), 1)


def _gjsd_rows(log_pt, log_ps, beta):
    """beta * KL(p_t || m) + (1 - beta) * KL(p_s || m) per row [N], from log-probabilities [N, M]."""
    # the floor keeps log m finite where both sides are 0; it moves m by beta * 1e-38 at most
    log_m = torch.logaddexp(math.log(beta) + log_pt.clamp(min=LOG_P_FLOOR), math.log1p(-beta) + log_ps)
    return beta * _kl_rows(log_pt, log_m) + (1 - beta) * _kl_rows(log_ps, log_m)


def _target_rows(x, n_lead, rows):
    """x [..., *rest] with n_lead leading dims -> [N, *rest]: flattened, then the rows selected."""
    x = x.reshape(-1, *x.shape[n_lead:])
    return x if rows is None else x[rows]


def _token_shapes(student_logits, teacher, mask):
    lead, c = tuple(student_logits.shape[:-1]), student_logits.shape[-1]
    if isinstance(teacher, TopK):
        k = teacher.values.shape[-1]
        if (teacher.num_classes != c or tuple(teacher.values.shape) != (*lead, k)
                or teacher.indices.shape != teacher.values.shape
                or tuple(teacher.logsumexp.shape) != lead or tuple(teacher.log_tail.shape) != lead):
            raise ValueError(
                f"token_kd: student {tuple(student_logits.shape)} but teacher top-{k} values "
                f"{tuple(teacher.values.shape)}, indices {tuple(teacher.indices.shape)}, logsumexp "
                f"{tuple(teacher.logsumexp.shape)}, log_tail {tuple(teacher.log_tail.shape)} of "
                f"{teacher.num_classes} classes; the teacher needs the student's positions {lead} and classes {c}"
            )
    elif teacher.shape != student_logits.shape:
        raise ValueError(
            f"token_kd: student {tuple(student_logits.shape)} and teacher {tuple(teacher.shape)} logits differ; "
            f"both need the same positions and vocabulary (align the tokenizers, or slice the padded vocabulary)"
        )
    if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != lead):
        raise ValueError(
            f"token_kd: mask {tuple(mask.shape)} of {mask.dtype} but the student's positions are {lead}; "
            f"pass a bool mask of that shape (e.g. labels != -100)"
        )
