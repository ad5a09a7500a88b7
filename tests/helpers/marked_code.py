"""Code that leaves a mark: a module written into a test's folder that records, in a marker file,
being imported and each of its callables being called. What a crafted store or checkpoint names,
so a test can tell whether kdcache ran it."""
import uuid

TEMPLATE = '''"""Written by a test: importing this module or calling anything in it writes {mark}."""
import pathlib

MARK = pathlib.Path({mark!r})


def _mark(what):
    with MARK.open("a") as f:
        f.write(what + "\\n")


_mark("imported")


def digits(split, root=None):
    """The digits split as a user's dataset: the registry's images and labels, so its fingerprint."""
    _mark("dataset")
    from kdcache.data import TensorDataset, digits_tensors

    data = TensorDataset(*digits_tensors(split))
    data.targets = data.labels.numpy()
    return data


def views():
    """The `digits` preset's transform for digits' 32x32 images padded with their black (-1)."""
    _mark("augment")
    from kdcache.augment import PRESETS

    return PRESETS["digits"]((32, 32), -1.0)


def net(num_classes, in_chans=3):
    """cnn_small, built through module:callable."""
    _mark("model")
    from kdcache.models import create_model

    return create_model("cnn_small", num_classes=num_classes, in_chans=in_chans)
'''

HUBCONF = '''"""Written by a test: a torch.hub entry point whose import writes {mark}."""
import pathlib

pathlib.Path({mark!r}).write_text("hubconf ran\\n")


def teacher(**kwargs):
    raise RuntimeError("never reached: the import above is the harm")
'''


def marker_module(folder, monkeypatch) -> tuple:
    """(module name, marker path): a fresh module in `folder`/code, importable for this test only
    (a new name each time, so an import by an earlier test cannot hide one by this test)."""
    name = f"kdmark_{uuid.uuid4().hex[:12]}"
    code = folder / "code"
    code.mkdir(exist_ok=True)
    mark = folder / f"{name}.ran"
    (code / f"{name}.py").write_text(TEMPLATE.format(mark=str(mark)))
    monkeypatch.syspath_prepend(str(code))
    return name, mark


def hub_repo(folder) -> tuple:
    """(repo folder, marker path): a local torch.hub repository whose hubconf.py writes the marker."""
    repo, mark = folder / "hubrepo", folder / "hubconf.ran"
    repo.mkdir(exist_ok=True)
    (repo / "hubconf.py").write_text(HUBCONF.format(mark=str(mark)))
    return repo, mark
