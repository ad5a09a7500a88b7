"""Feature KD: which student layer learns from which teacher activation, by which loss, and the
small adapters that bring a student feature to its teacher's shape (trained, never saved).

A pair is written `S_LAYER=T_ACT[:LOSS]`, e.g. `--feature layer3=layer3:attention`:
  S_LAYER  a dotted module path of the student (`kdcache layers MODEL` lists them);
  T_ACT    from a cache, the name of a stored activation, whose form (full, attention, pool) the
           store records; online (`--teacher CKPT`), a module path of the teacher, which is run
           in the cheapest form that gives the loss its full information (ONLINE_FORM);
  LOSS     a name in kdcache.losses.FEATURE_LOSSES; fitnet when left out.
The part after `:` is always a loss, never a form: a form is chosen when dumping, not when training.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdcache import losses
from kdcache.errors import KDCacheError, closest
from kdcache.hooks import REDUCTIONS
from kdcache.modules import get_module

DEFAULT_LOSS = "fitnet"  # the original hint loss (Romero et al. 2015), and it trains from a full or pooled cache

# Online there is no store to say which form a teacher activation has. The attention loss needs
# only the [B, H, W] map (the same loss as from the full map, at 1/C of the copy); every other
# loss gets the full map, so online KD gives what a cache of the full map gives.
ONLINE_FORM = {name: "attention" if name == "attention" else "full" for name in losses.FEATURE_LOSSES}

# Losses that compare student and teacher element by element: the adapter must reproduce the
# teacher's shape exactly. attention needs equal spatial sizes only; similarity, pkt and rkd
# compare samples within the batch, so any feature size works and they get no adapter.
ELEMENTWISE = frozenset({"fitnet", "activation_boundaries"})


@dataclass(frozen=True)
class FeaturePair:
    """One `--feature`: student module `student` matched to teacher activation `teacher` by `loss`."""

    spec: str  # as the user wrote it: names the pair in messages
    student: str  # dotted module path in the student
    teacher: str  # cached activation name, or teacher module path online
    loss: str  # a name in losses.FEATURE_LOSSES
    form: str  # the teacher tensor's form: full [B, C, H, W], attention [B, H, W] or pool [B, C]


# --- parsing and checking, before any training ---------------------------------------------

def parse_feature(spec: str) -> tuple[str, str, str]:
    """'layer3=layer3.1:attention' -> ('layer3', 'layer3.1', 'attention'); the loss defaults to fitnet."""
    student, eq, rest = spec.partition("=")
    teacher, _, loss = rest.partition(":")
    student, teacher, loss = student.strip(), teacher.strip(), loss.strip() or DEFAULT_LOSS
    if not eq or not student or not teacher:
        raise KDCacheError(f"--feature '{spec}' is not S_LAYER=T_ACT[:LOSS]; write e.g. --feature layer3=layer3:attention")
    if loss in REDUCTIONS and loss not in losses.FEATURE_LOSSES:
        raise KDCacheError(f"--feature '{spec}': '{loss}' is a form, chosen at dump time (--activation NAME:{loss}); "
                           f"after ':' give a loss: {', '.join(losses.FEATURE_LOSSES)}")
    if loss not in losses.FEATURE_LOSSES:
        raise KDCacheError(f"--feature '{spec}': unknown loss '{loss}'; choose one of {', '.join(losses.FEATURE_LOSSES)} "
                           f"(closest: {closest(loss, losses.FEATURE_LOSSES)})")
    return student, teacher, loss


def parse_features(specs) -> list[tuple[str, str, str, str]]:
    """[(spec, student, teacher, loss)] for every `--feature`; a pair given twice is refused."""
    parsed = [(spec, *parse_feature(spec)) for spec in specs]
    seen = set()
    for spec, *key in parsed:
        if tuple(key) in seen:
            raise KDCacheError(f"--feature '{spec}' repeats a pair; give each pair once and raise --feature-weight instead")
        seen.add(tuple(key))
    return parsed


def pairs_from_cache(specs, forms: dict) -> list[FeaturePair]:
    """Pairs against a cache holding activations `forms` {name: form}: each T_ACT must be stored,
    in a form its loss can use (losses.FEATURE_LOSS_FORMS)."""
    pairs = []
    for spec, student, teacher, loss in parse_features(specs):
        if teacher not in forms:
            held = f"it holds {', '.join(forms)}" if forms else "it holds none"
            suffix = "" if ONLINE_FORM[loss] == "full" else f":{ONLINE_FORM[loss]}"
            raise KDCacheError(f"--feature '{spec}': the cache has no activation '{teacher}' ({held}); "
                               f"dump it with kdcache dump-teacher --activation {teacher}{suffix}, or name a cached one")
        form, usable = forms[teacher], losses.FEATURE_LOSS_FORMS[loss]
        if form not in usable:
            others = [name for name, ok in losses.FEATURE_LOSS_FORMS.items() if form in ok]
            raise KDCacheError(f"--feature '{spec}': '{teacher}' is cached as '{form}', which {loss} cannot use "
                               f"(it takes {' or '.join(sorted(usable))}); dump --activation {teacher}:{ONLINE_FORM[loss]}, "
                               f"or use a loss that takes '{form}': {', '.join(others)}")
        pairs.append(FeaturePair(spec, student, teacher, loss, form))
    return pairs


def pairs_for_teacher(specs, teacher: nn.Module) -> list[FeaturePair]:
    """Pairs against a live teacher: each T_ACT must be one of its modules. Where pairs share a
    module and one of them needs the full map, all get the full map (attention accepts it too)."""
    parsed = parse_features(specs)
    for spec, _, name, _ in parsed:
        _module(teacher, name, spec, "teacher")
    needs = {}
    for _, _, name, loss in parsed:
        needs.setdefault(name, set()).add(ONLINE_FORM[loss])
    form = {name: forms.pop() if len(forms) == 1 else "full" for name, forms in needs.items()}
    return [FeaturePair(spec, s, t, loss, form[t]) for spec, s, t, loss in parsed]


def teacher_forms(pairs) -> dict:
    """{teacher module: form} for OnlineTeacher, the same mapping a cache records in its attrs."""
    return {p.teacher: p.form for p in pairs}


def _module(model: nn.Module, name: str, spec: str, whose: str) -> nn.Module:
    try:
        return get_module(model, name)
    except KDCacheError as e:
        raise KDCacheError(f"--feature '{spec}': {whose} {e}") from None


# --- adapters ------------------------------------------------------------------------------

def resize(x: torch.Tensor, size) -> torch.Tensor:
    """[B, C, H, W] or [B, H, W] to spatial `size`: average pooling to shrink (each output is the
    mean of the positions it covers), bilinear interpolation to grow."""
    flat = x.dim() == 3
    if flat:
        x = x.unsqueeze(1)
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        x = F.adaptive_avg_pool2d(x, size)
    else:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x.squeeze(1) if flat else x


class Adapter(nn.Module):
    """A student feature in the shape its loss compares with the teacher's target.

    1. reduce it as the teacher's target was reduced (`reduce`: full, attention, pool); the
       attention loss always takes the student's attention map, so every teacher form agrees;
    2. resize it to the teacher's spatial size (`size`), where the loss compares positions;
    3. project its channels (`project`: 1x1 conv for maps, linear for vectors), where the loss
       compares elements: the FitNets regressor.
    Steps the shapes do not need are left out; without a projection it has no parameters.
    A 1x1 conv commutes with pooling, so resizing first costs the least when shrinking.
    """

    def __init__(self, reduce: str = "full", size: tuple | None = None, project: nn.Module | None = None):
        super().__init__()
        self.reduce, self.size, self.project = reduce, size, project

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = REDUCTIONS[self.reduce](x)
        if self.size is not None:
            x = resize(x, self.size)
        return self.project(x) if self.project is not None else x

    def extra_repr(self) -> str:
        return f"reduce={self.reduce}, size={self.size}"


def make_adapter(pair: FeaturePair, student: torch.Tensor, teacher: torch.Tensor) -> Adapter:
    """The adapter from a student feature [B, ...] to teacher target [B, ...] (probe tensors)."""
    def cannot(why):
        return KDCacheError(f"--feature '{pair.spec}': student {pair.student} gives {list(student.shape[1:])}, "
                            f"teacher {pair.teacher} ({pair.form}) {list(teacher.shape[1:])}: {why}; "
                            "pick layers of the same kind (`kdcache layers MODEL` shows shapes)")

    if pair.loss == "attention":
        if student.dim() != 4:
            raise cannot("attention needs a [C, H, W] student map")
        size = tuple(teacher.shape[-2:])
        return Adapter("attention", size if tuple(student.shape[-2:]) != size else None)
    reduce = pair.form
    if pair.loss not in ELEMENTWISE:
        return Adapter(reduce)
    if student.dim() == 4 and teacher.dim() == 2:
        reduce = "pool"  # a map against a vector (say, a teacher's pooled head): pool, then project
    s = REDUCTIONS[reduce](student)
    if s.dim() != teacher.dim() or s.dim() not in (2, 4):
        raise cannot(f"{pair.loss} compares element by element and no 1x1 conv or linear maps one to the other")
    size = tuple(teacher.shape[-2:]) if s.dim() == 4 and s.shape[-2:] != teacher.shape[-2:] else None
    c_s, c_t = s.shape[1], teacher.shape[1]
    project = None
    # activation boundaries always get the paper's connector (Heo et al. 2019 train one even when the
    # channels match): the student's own pre-ReLU signs are not the teacher's neurons
    if c_s != c_t or pair.loss == "activation_boundaries":
        project = nn.Conv2d(c_s, c_t, kernel_size=1) if s.dim() == 4 else nn.Linear(c_s, c_t)
    return Adapter(reduce, size, project)


class FeatureKD(nn.Module):
    """The feature pairs of one student, with their adapters: (student features, teacher activations)
    -> {pair spec: loss}. Trained with the student, and kept out of its checkpoint."""

    def __init__(self, pairs, adapters):
        super().__init__()
        self.pairs = list(pairs)
        self.adapters = nn.ModuleList(adapters)

    @property
    def student_layers(self) -> list[str]:
        """The student modules to hook, each once."""
        return list(dict.fromkeys(p.student for p in self.pairs))

    def forward(self, student: dict, teacher: dict) -> dict:
        """student {layer: [B, ...]} from hooks, teacher {activation: [B, ...]} -> {spec: scalar loss}."""
        return {p.spec: losses.FEATURE_LOSSES[p.loss](adapter(student[p.student]), teacher[p.teacher])
                for p, adapter in zip(self.pairs, self.adapters)}


def probe_batch(dataset, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(x [2, ...], index [2]): the dataset's first two samples, to learn real shapes from.
    Two, since rkd compares samples within a batch and refuses one."""
    n = min(2, len(dataset))
    return torch.stack([dataset[i][0] for i in range(n)]).to(device), torch.arange(n)


def build_feature_kd(pairs, student: nn.Module, teacher, probe) -> FeatureKD:
    """FeatureKD for `student`, its adapters sized by one forward of the probe batch through the
    student (in eval mode, so BN statistics stay as they were) and the teacher (`teacher(x, index)`,
    a CachedTeacher or OnlineTeacher); every loss is tried once on the result, so a pair that
    cannot work fails here, before training. Adapter weights come from torch's global RNG."""
    from kdcache.hooks import capture

    for p in pairs:
        _module(student, p.student, p.spec, "student")
    x, index = probe
    modes = {m: m.training for m in student.modules()}
    try:
        student.eval()
        with torch.no_grad(), capture(student, list(dict.fromkeys(p.student for p in pairs))) as feats:
            student(x)
            targets = teacher(x, index)["activations"]
            for p in pairs:
                if not isinstance(feats.get(p.student), torch.Tensor):
                    raise KDCacheError(f"--feature '{p.spec}': student module {p.student} does not output one tensor; "
                                       "choose a module that does (`kdcache layers MODEL`)")
            adapters = [make_adapter(p, feats[p.student], targets[p.teacher]) for p in pairs]
            kd = FeatureKD(pairs, adapters).to(x.device)
            for p, adapter in zip(kd.pairs, kd.adapters):
                try:
                    losses.FEATURE_LOSSES[p.loss](adapter(feats[p.student]), targets[p.teacher])
                except ValueError as e:  # the loss's own message names both shapes
                    raise KDCacheError(f"--feature '{p.spec}': {str(e).splitlines()[0]}") from None
    finally:
        for m, mode in modes.items():
            m.training = mode
    return kd
