"""timm and Hugging Face models as teachers and students: weights from local files by the path a user
with network takes, the teacher fed and recorded with its own preprocessing, dotted layers on both."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub is imported: nothing here may reach the network

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from timm.data import create_transform, resolve_data_config  # noqa: E402
from transformers import ConvNextImageProcessor, ResNetConfig, ResNetForImageClassification  # noqa: E402

from kdcache import dump_teacher, open_cache, train_student  # noqa: E402
from kdcache.errors import KDCacheError  # noqa: E402
from kdcache.models import build_teacher, create_model, layers_model, list_layers  # noqa: E402
from kdcache.store import open_store  # noqa: E402
from helpers.cli import run


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # also if it was imported earlier


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
    """imagefolder: 3 classes of 4 train and 2 test PNGs each, 40x30, colours by class plus noise."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("test", 2)):
        for c in range(3):
            os.makedirs(root / split / f"c{c}")
            for i in range(n):
                pixels = np.clip(rng.normal(60 + 60 * c, 30, size=(30, 40, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / f"c{c}" / f"{i}.png")
    return str(root)


@pytest.fixture(scope="module")
def timm_weights(tmp_path_factory) -> str:
    """A randomly initialised 3-class timm test_resnet, saved as a user would save a fine-tuned one."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("timm") / "test_resnet.pth"
    torch.save(timm.create_model("test_resnet", num_classes=3).state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> str:
    """A small random transformers ResNet and its image processor, written with save_pretrained."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("hf") / "tiny-resnet"
    config = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                          num_labels=3)
    ResNetForImageClassification(config).save_pretrained(folder)
    ConvNextImageProcessor(size={"shortest_edge": 48}, crop_pct=0.875).save_pretrained(folder)
    return str(folder)


def first_image(images, split="train"):
    return Image.open(os.path.join(images, split, "c0", "0.png")).convert("RGB")


def test_a_timm_teacher_loads_local_weights_through_timms_pretrained_path(timm_weights):
    model, info = build_teacher("timm:test_resnet", num_classes=3, weights=timm_weights)
    saved = torch.load(timm_weights)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())  # the trained head too, not a new one
    expected = resolve_data_config({}, model=model)
    assert info["preprocessing"]["input_size"] == list(expected["input_size"]) == [3, 160, 160]
    assert info["preprocessing"]["mean"] == list(expected["mean"]) and info["arch"] == "timm:test_resnet"


def test_a_timm_dump_feeds_the_teachers_own_preprocessing_and_records_it(images, timm_weights, tmp_path):
    out = dump_teacher(teacher="timm:test_resnet", weights=timm_weights, dataset=f"imagefolder:{images}",
                       activations=["layer1"], dtype="float32", out=str(tmp_path / "c.zarr"))
    model, info = build_teacher("timm:test_resnet", num_classes=3, weights=timm_weights)
    x = create_transform(**resolve_data_config({}, model=model))(first_image(images))[None]
    with torch.no_grad():
        expected = model(x)
    cache = open_cache(out)
    torch.testing.assert_close(cache["train"][torch.tensor([0])]["logits"], expected, rtol=1e-5, atol=1e-5)
    assert cache.teacher["preprocessing"]["crop_pct"] == 0.95
    with open_store(out) as store:
        assert store.get_attrs("train")["transform"].startswith("teacher's: Compose( Resize(size=168")
    # a student at another resolution and normalisation trains from it: the data, not the transform, is checked
    rows = train_student(cache=out, dataset=f"imagefolder:{images},image=32", students=["timm:test_vit"], epochs=1,
                         batch_size=6, out=str(tmp_path / "s"))
    assert rows[0]["kind"] == "kd" and os.path.exists(os.path.join(rows[0]["folder"], "model.pt"))


def test_an_hf_teacher_runs_on_its_saved_image_processor(images, hf_dir, tmp_path):
    model, info = build_teacher(f"hf:{hf_dir}", num_classes=3)
    assert info["num_classes"] == 3 and info["preprocessing"]["image_processor"] == "ConvNextImageProcessor"
    names = [layer["name"] for layer in list_layers(layers_model(f"hf:{hf_dir}", num_classes=3)[0])]
    assert "resnet.encoder.stages.1" in names and "classifier" in names  # transformers' own dotted names
    out = dump_teacher(teacher=f"hf:{hf_dir}", dataset=f"imagefolder:{images}", dtype="float32",
                       activations=["resnet.encoder.stages.1:attention"], out=str(tmp_path / "h.zarr"))
    pixels = ConvNextImageProcessor.from_pretrained(hf_dir)(images=first_image(images, "test"), return_tensors="pt")
    with torch.no_grad():
        expected = model(pixels["pixel_values"])
    torch.testing.assert_close(open_cache(out)["test"][torch.tensor([0])]["logits"], expected, rtol=1e-5, atol=1e-5)
    assert "resnet.encoder.stages.1" in open_cache(out).attrs["activations"]


def test_hub_students_are_fresh_models_with_the_asked_classes(hf_dir):
    assert create_model("timm:test_resnet", num_classes=7).eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 7)
    assert create_model(f"hf:{hf_dir}", num_classes=5).eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 5)


def test_hub_names_that_cannot_be_used_are_one_line_errors(hf_dir, tmp_path):
    with pytest.raises(KDCacheError, match="unknown timm model 'resnet5O'"):
        build_teacher("timm:resnet5O", num_classes=3)
    with pytest.raises(KDCacheError, match="timm model test_resnet has no weights here.*--weights FILE"):
        build_teacher("timm:test_resnet", num_classes=3)  # offline, nothing in the local cache
    with pytest.raises(KDCacheError, match="no such model here.*save_pretrained"):
        build_teacher(f"hf:{tmp_path / 'absent'}", num_classes=3)
    bare = tmp_path / "no-processor"
    ResNetForImageClassification.from_pretrained(hf_dir).save_pretrained(bare)
    with pytest.raises(KDCacheError, match="preprocessing cannot be resolved.*processor.save_pretrained"):
        build_teacher(f"hf:{bare}", num_classes=3)


def test_kdcache_layers_lists_timm_modules_and_refuses_unknown_names(capsys):
    code, out, _ = run(capsys, "layers", "timm:test_resnet", "--num-classes", "3")
    assert code == 0 and "layer1.0.conv1" in out
    code, _, err = run(capsys, "layers", "timm:resnet5O")
    assert code == 2 and err.count("\n") == 1 and "unknown timm model 'resnet5O'; did you mean resnet50" in err
