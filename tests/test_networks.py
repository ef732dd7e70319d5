"""The image networks on their own: sizes, state-dict names, the quirks that matter for released weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from realtime.models.arcface import IBasicBlock, iresnet100
from realtime.models.detail import DetailGenerator, detail_condition
from realtime.models.emica import EmicaEncoder
from realtime.models.encoders import DecaEncoder, ResnetEncoder, split_code
from realtime.models.mica import MICA, MappingNetwork, MicaEncoder, arcface_input_from_crop
from realtime.models.resnet import resnet50
from tests.fakes import ConstantNet


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts_match_the_released_networks():
    assert n_params(resnet50()) == 23_508_032
    assert n_params(iresnet100()) == 65_156_160
    assert n_params(MicaEncoder()) == 65_156_160 + 515_100
    assert n_params(ResnetEncoder(86)) == 23_508_032 + 2_098_176 + 88_150
    assert n_params(DetailGenerator()) == 1_773_345
    # MICA + DECA branch (86 outputs) + expression branch (100 outputs): spec §7
    assert n_params(EmicaEncoder(86, 100)) == 117_074_326


def test_resnet_keys_follow_torchvision_and_have_no_fc():
    keys = list(resnet50().state_dict())
    assert keys[:6] == ["conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
                        "bn1.num_batches_tracked"]
    assert "layer1.0.downsample.0.weight" in keys and "layer4.2.conv3.weight" in keys
    assert not any(k.startswith("fc.") for k in keys)
    # stride on the 3x3 (ResNet v1.5), as torchvision and DECA
    net = resnet50()
    assert net.layer2[0].conv2.stride == (2, 2) and net.layer2[0].conv1.stride == (1, 1)


def test_resnet_encoder_maps_224_images_to_raw_codes():
    enc = ResnetEncoder(7).eval()
    with torch.no_grad():
        out = enc(torch.rand(2, 3, 224, 224))
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    assert [type(m) for m in enc.layers] == [nn.Linear, nn.ReLU, nn.Linear]
    with pytest.raises(RuntimeError):  # fixed AvgPool2d(7): other sizes cannot reach the 2048-d head
        enc(torch.rand(1, 3, 256, 256))


def test_deca_encoder_wraps_a_resnet_encoder_under_encoder():
    keys = list(DecaEncoder(86).state_dict())
    assert keys[0] == "encoder.encoder.conv1.weight"
    assert keys[-4:] == ["encoder.layers.0.weight", "encoder.layers.0.bias", "encoder.layers.2.weight",
                         "encoder.layers.2.bias"]


def test_split_code_cuts_named_slices_in_order():
    code = torch.arange(2 * 10, dtype=torch.float32).view(2, 10)
    parts = split_code(code, {"a": 3, "b": 2, "c": 5})
    assert list(parts) == ["a", "b", "c"]
    assert torch.equal(parts["a"], code[:, 0:3]) and torch.equal(parts["b"], code[:, 3:5])
    assert torch.equal(parts["c"], code[:, 5:10])
    with pytest.raises(ValueError, match="needs 9"):
        split_code(code, {"a": 4, "b": 5})


def test_iresnet_block_layout_and_eps():
    net = iresnet100()
    block = net.layer2[3]
    assert isinstance(block, IBasicBlock)
    assert list(dict(block.named_children())) == ["bn1", "conv1", "bn2", "prelu", "conv2", "bn3"]
    assert [len(net.layer1), len(net.layer2), len(net.layer3), len(net.layer4)] == [3, 13, 30, 3]
    # every stage starts with stride 2 and a projection, so 112 → 7
    assert all(stage[0].conv2.stride == (2, 2) and stage[0].downsample is not None
               for stage in (net.layer1, net.layer2, net.layer3, net.layer4))
    assert all(m.eps == 1e-5 for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    assert net.fc.in_features == 512 * 7 * 7 and isinstance(net.features, nn.BatchNorm1d)


def test_iresnet_block_has_no_activation_after_the_residual_add():
    block = IBasicBlock(4, 4).eval()
    # Make the residual branch output exactly -1 everywhere: bn3 with zero weight and bias -1.
    with torch.no_grad():
        block.bn3.weight.zero_()
        block.bn3.bias.fill_(-1.0)
        out = block(torch.zeros(1, 4, 5, 5))
    assert torch.allclose(out, torch.full_like(out, -1.0))  # a ReLU/PReLU after the add would change this


def test_mapping_network_is_four_leaky_layers_then_a_linear_output():
    net = MappingNetwork(z_dim=3, hidden_dim=3, out_dim=3, hidden=3)
    assert len(net.network) == 4
    with torch.no_grad():
        for layer in [*net.network, net.output]:
            layer.weight.copy_(torch.eye(3))
            layer.bias.zero_()
        out = net(torch.tensor([[-1.0, 2.0, 0.0]]))
    assert torch.allclose(out, torch.tensor([[-(0.2**4), 2.0, 0.0]]))


def test_mica_regressor_names_and_shape_output():
    keys = list(MicaEncoder().state_dict())
    assert keys[0] == "E_mica.arcface.conv1.weight"
    assert keys[-10:] == [f"E_mica.flameModel.regressor.{n}.{p}" for n in
                          ("network.0", "network.1", "network.2", "network.3", "output") for p in ("weight", "bias")]


def test_mica_l2_normalises_the_arcface_embedding():
    mica = MICA().eval()
    seen = {}
    mica.arcface.register_forward_hook(lambda m, args, out: seen.__setitem__("raw", out))
    mica.flameModel.regressor.register_forward_pre_hook(lambda m, args: seen.__setitem__("unit", args[0]))
    with torch.no_grad():
        for m in mica.arcface.modules():  # untrained weights with unit BN statistics would overflow 49 blocks
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(0.05)
        shape = mica(torch.rand(1, 3, 112, 112) * 2 - 1)
    raw, unit = seen["raw"], seen["unit"]
    assert shape.shape == (1, 300) and raw.shape == (1, 512)
    assert torch.allclose(unit.norm(dim=1), torch.ones(1), atol=1e-5)
    assert torch.allclose(unit, raw / raw.norm(dim=1, keepdim=True), atol=1e-6)
    # eps 1e-12 like F.normalize: an all-zero embedding stays finite (zeros), not NaN; a tiny one is scaled up
    mica.arcface = ConstantNet(torch.zeros(1, 512))
    assert torch.equal(mica.identity(torch.zeros(2, 3, 112, 112)), torch.zeros(2, 512))
    tiny = torch.zeros(1, 512)
    tiny[0, 0] = 1e-9
    mica.arcface = ConstantNet(tiny)
    assert torch.allclose(mica.identity(torch.zeros(1, 3, 112, 112))[0, 0], torch.tensor(1.0))


def test_fallback_arcface_input_is_a_2x2_average_scaled_to_minus_one_one():
    image = torch.zeros(1, 3, 224, 224)
    image[:, :, 0, 0] = 1.0  # one white pixel → a quarter of it in output pixel (0, 0)
    out = arcface_input_from_crop(image)
    assert out.shape == (1, 3, 112, 112)
    assert torch.allclose(out[0, :, 0, 0], torch.full((3,), 0.25 * 2 - 1))
    assert torch.allclose(out[0, :, 1:, 1:], torch.full((3, 111, 111), -1.0))


def test_detail_generator_keys_and_batchnorm_eps():
    gen = DetailGenerator()
    keys = [k for k in gen.state_dict() if k.endswith("weight")]
    assert keys == ["l1.0.weight"] + [f"conv_blocks.{i}.weight" for i in (0, 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 21)]
    bns = [m for m in gen.conv_blocks if isinstance(m, nn.BatchNorm2d)]
    assert [bn.eps for bn in bns] == [1e-5, 0.8, 0.8, 0.8, 0.8, 0.8]  # DECA's BatchNorm2d(c, 0.8)
    assert [m.mode for m in gen.conv_blocks if isinstance(m, nn.Upsample)] == ["bilinear"] * 5
    assert gen.l1[0].in_features == 181  # jaw 3 + expression 50 + detail 128


def test_detail_generator_output_is_a_small_256_displacement_map():
    gen = DetailGenerator().eval()
    with torch.no_grad():
        gen.conv_blocks[21].bias.fill_(100.0)  # saturate tanh: the 0.01 output scale shows directly
        out = gen(torch.randn(2, 181))
    assert out.shape == (2, 1, 256, 256)
    assert torch.allclose(out, torch.full_like(out, 0.01))


def test_detail_condition_order_is_jaw_expression_detail():
    jaw, exp, det = torch.full((1, 3), 1.0), torch.full((1, 50), 2.0), torch.full((1, 128), 3.0)
    cond = detail_condition(jaw, exp, det)
    assert cond.shape == (1, 181)
    assert torch.equal(cond[0, :3], jaw[0]) and torch.equal(cond[0, 3:53], exp[0]) and torch.equal(cond[0, 53:], det[0])


def test_batchnorm_eps_08_changes_the_numbers():
    """The eps=0.8 quirk is not cosmetic: with unit running variance it scales activations by 1/sqrt(1.8)."""
    gen = DetailGenerator().eval()
    bn = gen.conv_blocks[3]
    x = torch.randn(1, 128, 4, 4)
    with torch.no_grad():
        assert torch.allclose(bn(x), x / (1.8**0.5), atol=1e-6)
        assert not torch.allclose(bn(x), F.batch_norm(x, bn.running_mean, bn.running_var, eps=1e-5), atol=1e-3)
