"""kdcache checkpoints: what a trained student or teacher is saved as, how one is read back (plain
data only: torch.load(weights_only=True)), and how a teacher is built from a name, weights or a checkpoint."""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from kdcache.errors import KDCacheError
from kdcache.models.registry import _hub_name, create_model
from kdcache.modules import weights_sha256

CHECKPOINT_FORMAT = 1  # bump when the checkpoint dict changes in a way old readers cannot follow

_PLAIN = (str, int, float, bool, type(None))


def _check_plain(obj, where: str) -> None:
    """Refuse what torch.load(weights_only=True) would refuse, at save time, naming the key."""
    if isinstance(obj, _PLAIN) or isinstance(obj, torch.Tensor):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise KDCacheError(f"checkpoint {where} has a key of type {type(k).__name__}; use str keys")
            _check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    raise KDCacheError(
        f"checkpoint {where} is a {type(obj).__module__}.{type(obj).__name__}; only str, int, float, bool, "
        "None, list, dict and tensors can be saved: convert it (float(x), str(path), ...)"
    )


def save_checkpoint(
    path,
    model: nn.Module,
    *,
    arch: str,
    arch_kwargs: dict,
    num_classes: int,
    in_chans: int,
    config: dict,
    metrics: dict,
    extra: dict | None = None,
) -> None:
    """Write a kdcache checkpoint: everything model_from_checkpoint needs, plus how it was made.

    Written to `path.partial`, then renamed into place, so a crash never leaves half a checkpoint.
    """
    ckpt = {
        "kdcache_checkpoint": CHECKPOINT_FORMAT,
        "arch": arch,
        "arch_kwargs": dict(arch_kwargs),
        "num_classes": int(num_classes),
        "in_chans": int(in_chans),
        # On CPU so a checkpoint from a GPU run loads on any machine.
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": config,
        "metrics": metrics,
        "extra": extra,
    }
    for key in ("arch_kwargs", "config", "metrics", "extra"):
        _check_plain(ckpt[key], key)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".partial"
    try:
        with open(tmp, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())  # the rename must not land before the bytes do
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _torch_load(path: str, what: str):
    # weights_only=True: a checkpoint is plain data, so loading one never runs code from the file.
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights only" not in str(e).lower() and "weights_only" not in str(e):  # not objects refused, but bytes
            raise KDCacheError(f"{what} {path} is damaged or not a torch.save file ({first}); save or copy it "
                               "again") from None
        raise KDCacheError(
            f"{what} {path} cannot be read by torch.load(weights_only=True) ({first}); "
            "save plain data, e.g. torch.save(model.state_dict(), path)"
        ) from None


def load_checkpoint(path) -> dict:
    """Read a kdcache checkpoint (on CPU) as the dict save_checkpoint wrote."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise KDCacheError(f"checkpoint {path} does not exist; give the model.pt written by train-student")
    return _checked(_torch_load(path, "checkpoint"), path)


_FIELDS = {"kdcache_checkpoint": int, "arch": str, "arch_kwargs": dict, "num_classes": int, "in_chans": int,
           "state_dict": dict}  # what model_from_checkpoint reads, and the type it must be


def _checked(ckpt, path: str) -> dict:
    """`ckpt` if it is a kdcache checkpoint this version reads, with every field it builds from well-typed."""
    if not isinstance(ckpt, dict) or "kdcache_checkpoint" not in ckpt:
        raise KDCacheError(
            f"{path} is not a kdcache checkpoint (no 'kdcache_checkpoint' key); "
            "for a plain state dict give a model name and --weights instead"
        )
    for key, kind in _FIELDS.items():
        value = ckpt.get(key)
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 1):
            raise KDCacheError(f"checkpoint {path} is malformed: {key} is {_brief(value)}, expected "
                               f"{'a positive int' if kind is int else f'a {kind.__name__}'}; "
                               "give a model.pt written by kdcache train-student")
    if not all(isinstance(k, str) for k in ckpt["arch_kwargs"]):
        raise KDCacheError(f"checkpoint {path} is malformed: arch_kwargs is {_brief(ckpt['arch_kwargs'])}, expected "
                           "keyword arguments by name; give a model.pt written by kdcache train-student")
    if ckpt["kdcache_checkpoint"] > CHECKPOINT_FORMAT:
        raise KDCacheError(
            f"checkpoint {path} has format {ckpt['kdcache_checkpoint']}, newer than this kdcache reads "
            f"({CHECKPOINT_FORMAT}); upgrade kdcache"
        )
    return ckpt


def _brief(value) -> str:
    """A value for a message: its repr when short, else its type."""
    text = repr(value)
    return text if len(text) <= 40 else f"a {type(value).__name__}"


def _fmt_shape(shape) -> str:
    return "[" + ",".join(str(s) for s in shape) + "]"


def _load_fitting(model: nn.Module, state: dict, *, source: str, arch: str) -> None:
    """load_state_dict, but a misfit is one line saying what does not fit, not a wall of keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        k for k in own if k in state and (not isinstance(state[k], torch.Tensor) or state[k].shape != own[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = [
            f"{len(missing)} missing keys" + (f" (e.g. {missing[0]})" if missing else ""),
            f"{len(unexpected)} unexpected" + (f" (e.g. {unexpected[0]})" if unexpected else ""),
            f"{len(mismatched)} shape mismatches",
        ]
        if mismatched:
            k = mismatched[0]
            theirs = _fmt_shape(state[k].shape) if isinstance(state[k], torch.Tensor) else type(state[k]).__name__
            parts[-1] += f" (e.g. {k} {theirs} in the weights vs {_fmt_shape(own[k].shape)} in the model)"
        raise KDCacheError(
            f"weights {source} do not fit model {arch}: {', '.join(parts)}; check the model name and num_classes"
        )
    model.load_state_dict(state)


def names_code(arch: str) -> bool:
    """Whether a model name imports code (module:callable) rather than naming a registered or torchvision model."""
    return ":" in arch and not _hub_name(arch)


def model_from_checkpoint(ckpt: dict, *, arch: str | None = None, path: str | None = None) -> nn.Module:
    """Rebuild the model a checkpoint describes and load its weights (left in train mode).

    A checkpoint is a file, not the user: its arch may name a registered or torchvision model, and
    code (module:callable, torch.hub:load, ...) only when that is `arch`, the name the user gave for
    this file (the --student it is the model.pt of). `path` names the file in messages.
    """
    where = f"checkpoint {path}" if path else "the checkpoint"
    if names_code(ckpt["arch"]) and ckpt["arch"] != arch:
        fix = (f"this run names it {arch}: pass --overwrite to train {arch} again" if arch is not None
               else f"if you trust that code, name it yourself: --teacher {ckpt['arch']} --weights {path or 'FILE'}")
        raise KDCacheError(f"{where} names its model as code ({ckpt['arch']}), and kdcache runs code only when you "
                           f"name it, never because a file does; {fix}")
    model = create_model(
        ckpt["arch"], num_classes=ckpt["num_classes"], in_chans=ckpt["in_chans"], **ckpt["arch_kwargs"]
    )
    _load_fitting(model, ckpt["state_dict"], source=f"in {where}", arch=ckpt["arch"])
    return model


def _state_dict_from(obj, path: str) -> dict:
    """The state dict inside what a weights file holds: raw, {'state_dict': ...}, {'model': ...} or ours."""
    if isinstance(obj, dict):
        if "kdcache_checkpoint" in obj:
            obj = obj["state_dict"]
        elif isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        elif isinstance(obj.get("model"), dict):  # CRD and torchvision-reference checkpoints
            obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise KDCacheError(
            f"weights {path} hold no state dict (expected tensors by name, or a dict with a 'state_dict' "
            "or 'model' key); save them with torch.save(model.state_dict(), path)"
        )
    keys = list(obj)
    # nn.DataParallel / DistributedDataParallel prefix every key with "module."
    if keys and all(k.startswith("module.") for k in keys):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _looks_like_path(spec: str) -> bool:
    return os.sep in spec or "/" in spec or spec.endswith((".pt", ".pth", ".ckpt", ".bin"))


def build_teacher(
    spec: str, *, num_classes: int | None, in_chans: int = 3, weights: str | None = None, random_ok: bool = False
) -> tuple[nn.Module, dict]:
    """A teacher in eval mode, and what identifies it: {arch, arch_kwargs, num_classes, in_chans, weights_sha256}.

    `spec` is a kdcache checkpoint file (which brings its own arch, num_classes and in_chans), or
    a model name for create_model, with an optional `weights` file (a raw state dict, a dict with a
    'state_dict' or 'model' key, or a kdcache checkpoint). A name without weights is a random
    network: refused unless `random_ok` (--random-teacher, for benchmarks); its weights_sha256 is None.
    """
    if os.path.isfile(spec):
        if weights is not None:
            raise KDCacheError(
                f"teacher {spec} is a checkpoint and carries its weights; drop --weights {weights}, "
                "or give a model name with --weights"
            )
        ckpt = load_checkpoint(spec)
        if num_classes is not None and num_classes != ckpt["num_classes"]:
            raise KDCacheError(
                f"teacher checkpoint {spec} has {ckpt['num_classes']} classes, but num_classes={num_classes} "
                "was given; drop --num-classes or use a teacher trained on this dataset"
            )
        model = model_from_checkpoint(ckpt, path=spec)
        info = {
            "arch": ckpt["arch"],
            "arch_kwargs": dict(ckpt["arch_kwargs"]),
            "num_classes": ckpt["num_classes"],
            "in_chans": ckpt["in_chans"],
            "weights_sha256": weights_sha256(model),
        }
        return model.eval(), info

    if _hub_name(spec):  # before the path test: hf:DIR names a directory
        from kdcache import hub

        return hub.build_teacher(spec, num_classes=num_classes, in_chans=in_chans, weights=weights)
    if _looks_like_path(spec):
        raise KDCacheError(f"teacher checkpoint {spec} does not exist; give an existing model.pt or a model name")
    if num_classes is None:
        raise KDCacheError(
            f"teacher '{spec}' is a model name, so num_classes is needed; give --num-classes or a checkpoint"
        )
    if weights is None and not random_ok:
        raise KDCacheError(f"teacher '{spec}' is a model name without --weights, so it would be a randomly "
                           "initialised network; pass --weights FILE, a kdcache checkpoint (model.pt), or "
                           "--random-teacher if a random teacher is what you want (benchmarks)")
    obj, arch_kwargs, sha = None, {}, None
    if weights is not None:
        weights = os.fspath(weights)
        if not os.path.isfile(weights):
            raise KDCacheError(f"weights file {weights} does not exist")
        obj = _torch_load(weights, "weights")
        if isinstance(obj, dict) and "kdcache_checkpoint" in obj and obj.get("arch") == spec:
            # a checkpoint of this very model (--teacher mymod:net --weights its model.pt): built as it was trained
            ckpt = _checked(obj, weights)
            in_chans, arch_kwargs = ckpt["in_chans"], dict(ckpt["arch_kwargs"])
    model = create_model(spec, num_classes=num_classes, in_chans=in_chans, **arch_kwargs)
    if obj is not None:
        _load_fitting(model, _state_dict_from(obj, weights), source=weights, arch=spec)
        sha = weights_sha256(model)
    info = {
        "arch": spec, "arch_kwargs": arch_kwargs, "num_classes": num_classes, "in_chans": in_chans, "weights_sha256": sha
    }
    return model.eval(), info
