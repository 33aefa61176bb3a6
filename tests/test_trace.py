"""Tests of accord.trace: every zoo model and a set of hand-written architectures.

Each traced spec must pass ``Spec.check`` (random maps of every free space keep the outputs)
and its structure is pinned: which spaces exist, which are fixed and why, which axes they
move, the map kinds, head groups and observation points.
"""

from __future__ import annotations

import copy
import dataclasses
import re

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from accord.check import FALLBACK_RTOL, check_spec, randomly_permuted
from accord.errors import ConfigError, SpecError, TraceError
from accord.spec import AxisRef, FeatureSpace, FoldedNorm, Observation, Spec
from accord.trace import trace
from accord.trace.observe import traced_module
from accord.trace.tracer import trace_fx
from accord.zoo import build_model

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _random_norms(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics, so that a wrong fold or permutation shows."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            nn.init.uniform_(module.weight, 0.5, 2)
            nn.init.uniform_(module.bias, -1, 1)
    return model


def _names(spec: Spec) -> list[str]:
    return [space.name for space in spec]


# Zoo models ----------------------------------------------------------------------------------


def test_mlp(assert_preserved) -> None:
    model = build_model("mlp", image_size=8, width=12, depth=2)
    x = torch.randn(4, 3, 8, 8)
    spec = trace(model, x)
    assert _names(spec) == ["input", "layers.1", "layers.3", "output"]
    assert spec.model == "MLP" and spec.observation == "post"
    assert spec["input"].readers == (AxisRef("layers.1.weight", 1, 64),)
    assert (spec["input"].free, spec["input"].reason) == (False, "input")
    hidden = spec["layers.1"]
    assert hidden.free and hidden.maps == "dense"
    assert hidden.writers == (AxisRef("layers.1.weight", 0), AxisRef("layers.1.bias", 0))
    assert hidden.readers == (AxisRef("layers.3.weight", 1),)
    assert hidden.observe == (Observation("layers_2", 1),)
    assert (spec["output"].free, spec["output"].reason) == (False, "output")
    assert_preserved(model, x, spec)


def test_vgg11_classifier_reads_blocks_of_the_last_conv(assert_preserved) -> None:
    # 96 px and five pools leave a 3x3 map: each channel owns 9 classifier columns.
    model = build_model("vgg11", image_size=96, width=1 / 16)
    x = torch.randn(2, 3, 96, 96)
    spec = trace(model, x)
    convs = [s for s in spec if s.name.startswith("features.")]
    assert len(convs) == 8 and len(spec) == 10
    assert all(s.free and s.maps == "dense" and not s.batchnorms for s in convs)
    assert convs[-1].readers == (AxisRef("classifier.1.weight", 1, 9),)
    assert convs[0].observe == (Observation("features_1", 1),)
    assert_preserved(model, x, spec)


@pytest.mark.parametrize("name, width", [("vgg11", 1 / 8), ("vgg16", 1 / 16)])
def test_vgg_with_batchnorm_folds_every_norm(assert_preserved, name: str, width: float) -> None:
    model = _random_norms(build_model(name, image_size=8, width=width, batch_norm=True))
    x = torch.randn(2, 3, 8, 8)
    spec = trace(model, x)
    convs = [s for s in spec if s.free]
    assert len(convs) == (8 if name == "vgg11" else 13)
    for space in convs:
        index = int(space.name.split(".")[1])
        assert space.batchnorms == (FoldedNorm(f"features.{index + 1}", space.name),)
        assert {r.tensor for r in space.elementwise} == {
            f"features.{index + 1}.{p}" for p in ("weight", "bias", "running_mean", "running_var")
        }
        assert space.maps == "dense"
        assert space.observe == (Observation(f"features_{index + 2}", 1),)
    assert_preserved(model, x, spec)


def test_resnet20_has_three_streams(assert_preserved) -> None:
    model = _random_norms(build_model("resnet20", image_size=8, width=1))
    x = torch.randn(2, 3, 8, 8)
    spec = trace(model, x)
    streams = [s for s in spec if s.name.startswith("stream:")]
    assert [s.name for s in streams] == [
        "stream:conv1",
        "stream:layer2.0.conv2",
        "stream:layer3.0.conv2",
    ]
    assert [s.size for s in streams] == [16, 32, 64]
    assert {r.tensor for r in streams[1].writers} == {
        "layer2.0.conv2.weight",
        "layer2.0.shortcut.0.weight",
        "layer2.1.conv2.weight",
        "layer2.2.conv2.weight",
    }
    assert all(len(s.writers) == 4 and len(s.batchnorms) == 4 for s in streams)
    assert AxisRef("fc.weight", 1) in streams[2].readers
    inner = [s for s in spec if s.name.endswith(".conv1") and s.name.startswith("layer")]
    assert len(inner) == 9 and all(len(s.writers) == 1 for s in inner)
    assert len(spec) == 14 and [s.name for s in spec if not s.free] == ["input", "output"]
    assert all(s.maps == "dense" for s in spec.free_spaces)
    assert [o.node for o in streams[0].observe] == ["relu"] + [
        f"layer1_{i}_relu2" for i in range(3)
    ]
    assert_preserved(model, x, spec)


def test_vit_stream_heads_and_notes(assert_preserved) -> None:
    model = build_model("vit", image_size=8, patch_size=4, dim=16, depth=2, heads=4)
    x = torch.randn(2, 3, 8, 8)
    spec = trace(model, x)
    assert _names(spec) == [
        "input",
        "stream:patch_embed",
        *[f"blocks.{i}.{p}" for i in range(2) for p in ("attn.qk", "attn.v", "mlp.0")],
        "output",
    ]
    stream = spec["stream:patch_embed"]
    assert stream.maps == "permutation" and stream.free
    assert AxisRef("cls_token", 2) in stream.writers and AxisRef("pos_embed", 2) in stream.writers
    assert AxisRef("blocks.1.attn.proj.weight", 0) in stream.writers
    assert AxisRef("norm.weight", 0) in stream.elementwise
    assert AxisRef("head.weight", 1) in stream.readers
    assert stream.observe[0] == Observation("blocks_0_norm1", 2)
    qk, v = spec["blocks.0.attn.qk"], spec["blocks.0.attn.v"]
    assert (qk.maps, qk.groups, v.maps, v.groups) == ("orthogonal", 4, "linear", 4)
    assert qk.writers == (AxisRef("blocks.0.attn.q.weight", 0), AxisRef("blocks.0.attn.q.bias", 0))
    assert qk.readers == (AxisRef("blocks.0.attn.k.weight", 0), AxisRef("blocks.0.attn.k.bias", 0))
    assert v.readers == (AxisRef("blocks.0.attn.proj.weight", 1),)
    assert qk.observe == (Observation("blocks_0_attn_q", 2),) and v.observe
    assert spec["blocks.0.mlp.0"].maps == "dense"
    assert_preserved(model, x, spec)


def test_pre_activation_observes_the_inputs_of_activations() -> None:
    model = build_model("vgg11", image_size=8, width=1 / 8, batch_norm=True)
    x = torch.randn(2, 3, 8, 8)
    post, pre = trace(model, x), trace(model, x, observe="pre")
    assert pre.observation == "pre"
    assert post["features.0"].observe == (Observation("features_2", 1),)
    assert pre["features.0"].observe == (Observation("features_1", 1),)
    resnet = build_model("resnet20", image_size=8)
    stream = trace(resnet, x, observe="pre")["stream:conv1"]
    # the residual sums, named after the blocks whose forward adds them
    adds = ["layer1_0_add", "layer1_1_add", "layer1_2_add"]
    assert [o.node for o in stream.observe] == ["bn1", *adds]


# Hand-written architectures ------------------------------------------------------------------


class BasicBlock(nn.Module):
    """torchvision's ResNet18 block: in-place ReLU, downsample = conv1x1 + BN."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """ResNet50's block: 1x1 reduce, 3x3, 1x1 expand (x4)."""

    def __init__(self, cin: int, mid: int, stride: int) -> None:
        super().__init__()
        cout = 4 * mid
        self.reduce = nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid))
        self.conv = nn.Sequential(
            nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid)
        )
        self.expand = nn.Sequential(nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.downsample = nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.reduce(x))
        out = F.relu(self.conv(out))
        return F.relu(self.expand(out) + self.downsample(x))


class ResNet(nn.Module):
    def __init__(self, blocks: list[nn.Module], stem: int, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, stem, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.maxpool = nn.MaxPool2d(2)
        self.layers = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        x = self.avgpool(self.layers(x))
        return self.fc(torch.flatten(x, 1))


def test_resnet18_style(assert_preserved) -> None:
    blocks = [BasicBlock(4, 4, 1), BasicBlock(4, 4, 1), BasicBlock(4, 6, 2), BasicBlock(6, 6, 1)]
    model = _random_norms(ResNet(blocks, 4, 6))
    x = torch.randn(2, 3, 8, 8)
    spec = trace(model, x)
    streams = [s for s in spec if s.name.startswith("stream:")]
    # The downsample runs first in forward, so it names the second stream.
    assert [s.name for s in streams] == ["stream:conv1", "stream:layers.2.downsample.0"]
    assert {r.tensor for r in streams[1].writers} == {
        "layers.2.conv2.weight",
        "layers.2.downsample.0.weight",
        "layers.3.conv2.weight",
    }
    assert len(spec.free_spaces) == 2 + 4
    assert_preserved(model, x, spec)


def test_resnet50_style(assert_preserved) -> None:
    model = _random_norms(ResNet([Bottleneck(4, 2, 1), Bottleneck(8, 3, 2)], 4, 12))
    x = torch.randn(2, 3, 8, 8)
    spec = trace(model, x)
    # Every block's output is a new stream (projection shortcuts); two inner spaces each.
    assert [s.name for s in spec.free_spaces] == [
        "conv1",
        "layers.0.reduce.0",
        "layers.0.conv.0",
        "stream:layers.0.expand.0",
        "layers.1.reduce.0",
        "layers.1.conv.0",
        "stream:layers.1.expand.0",
    ]
    assert len(spec["stream:layers.0.expand.0"].batchnorms) == 2
    assert_preserved(model, x, spec)


class DenseNet(nn.Module):
    """Two BN-ReLU-conv dense layers, each concatenating its output to the stream."""

    def __init__(self, stem: int = 4, growth: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, stem, 3, padding=1)
        self.norms = nn.ModuleList([nn.BatchNorm2d(stem), nn.BatchNorm2d(stem + growth)])
        self.convs = nn.ModuleList(
            [nn.Conv2d(stem, growth, 3, padding=1), nn.Conv2d(stem + growth, growth, 3, padding=1)]
        )
        self.head = nn.Linear((stem + 2 * growth) * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for norm, conv in zip(self.norms, self.convs, strict=True):
            x = torch.cat([x, conv(F.relu(norm(x)))], dim=1)
        return self.head(F.avg_pool2d(x, 4).flatten(1))


def test_densenet_concatenation_gives_offsets(assert_preserved) -> None:
    model = _random_norms(DenseNet())
    x = torch.randn(2, 3, 8, 8)
    spec = trace(model, x)
    assert [s.name for s in spec.free_spaces] == ["stem", "convs.0", "convs.1"]
    # BatchNorms over the concatenation tie the first two; the last goes linearly to the head.
    assert [s.maps for s in spec.free_spaces] == ["permutation", "permutation", "linear"]
    assert spec["convs.0"].readers == (
        AxisRef("convs.1.weight", 1, 1, 4),
        AxisRef("head.weight", 1, 4, 16),
    )
    assert AxisRef("norms.1.running_mean", 0, 1, 4) in spec["convs.0"].elementwise
    assert spec["convs.1"].readers == (AxisRef("head.weight", 1, 4, 28),)
    assert spec["convs.1"].observe == (Observation("convs_1", 1),)
    assert_preserved(model, x, spec)


class MobileNet(nn.Module):
    """Depthwise-separable blocks (depth multiplier 1 and 2), ReLU6, a grouped conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.BatchNorm2d(4))
        self.pw = nn.Sequential(nn.Conv2d(4, 6, 1), nn.BatchNorm2d(6), nn.ReLU6())
        self.dw2 = nn.Conv2d(6, 12, 3, padding=1, groups=6)
        self.grouped = nn.Conv2d(12, 8, 1, groups=2)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pw(F.relu6(self.dw(self.stem(x))))
        x = self.grouped(F.relu(self.dw2(x)))
        return self.head(x.mean((2, 3)))


def test_mobilenet_depthwise_ties_channels(assert_preserved) -> None:
    model = _random_norms(MobileNet())
    x = torch.randn(2, 3, 8, 8)
    spec = trace(model, x)
    stem = spec["stem.0"]
    assert stem.maps == "permutation" and stem.free
    assert (
        AxisRef("dw.0.weight", 0) in stem.elementwise
        and AxisRef("dw.1.bias", 0) in stem.elementwise
    )
    assert AxisRef("pw.0.weight", 1) in stem.readers
    # Depth multiplier 2: each of pw's channels owns two dw2 channels; the grouped conv
    # reads its two groups of three with the same columns: one permutation for both groups
    pw = spec["pw.0"]
    assert pw.free and pw.size == 3 and pw.maps == "permutation"
    assert AxisRef("dw2.weight", 0, 2) in pw.elementwise
    assert AxisRef("dw2.weight", 0, 2, 6) in pw.elementwise
    assert AxisRef("pw.0.weight", 0, 1, 3) in pw.writers
    assert pw.readers == (AxisRef("grouped.weight", 1, 2),)
    grouped = spec["grouped"]
    assert grouped.free and grouped.groups == 2 and grouped.maps == "linear"
    assert_preserved(model, x, spec)


class ResNeXtBlock(nn.Module):
    """conv → BN → ReLU → grouped conv (4 groups) → BN → ReLU → head."""

    def __init__(self) -> None:
        super().__init__()
        self.reduce, self.bn = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)
        self.grouped, self.bn2 = nn.Conv2d(8, 12, 3, padding=1, groups=4), nn.BatchNorm2d(12)
        self.head = nn.Linear(12, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.reduce(x)))
        return self.head(torch.relu(self.bn2(self.grouped(h))).mean((2, 3)))


def test_grouped_convolution_shares_one_map_across_its_input_groups(assert_preserved) -> None:
    model = _random_norms(ResNeXtBlock())
    x = torch.randn(2, 3, 8, 8)
    spec = trace(model, x)
    # the 8 input channels are 4 groups of 2, read by the same 2 columns of every group
    reduce = spec["reduce"]
    assert reduce.free and reduce.size == 2 and reduce.maps == "dense"
    assert {r.offset for r in reduce.writers if r.tensor == "reduce.weight"} == {0, 2, 4, 6}
    assert reduce.readers == (AxisRef("grouped.weight", 1),)
    assert reduce.batchnorms == (FoldedNorm("bn", "reduce"),)
    assert len(reduce.observe) == 4  # each group's channels are samples of the same features
    # the output moves within its groups
    assert spec["grouped"].free and spec["grouped"].groups == 4
    assert_preserved(model, x, spec)


class FunctionalMLP(nn.Module):
    """F.relu, torch.add residual, F.linear with parameters, a shared layer used twice."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 8)
        self.weight = nn.Parameter(torch.randn(5, 8))
        self.bias = nn.Parameter(torch.randn(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc1(x))
        h = torch.add(h, F.relu(self.fc2(h)))
        h = h + 0.5 * torch.tanh(self.fc2(h))
        return F.linear(h, self.weight, self.bias)


def test_functional_mlp_and_shared_layer(assert_preserved) -> None:
    model = FunctionalMLP()
    x = torch.randn(8, 6)
    spec = trace(model, x)
    # fc2 reads and writes the stream twice: all of it is one space.
    assert _names(spec) == ["input", "stream:fc1", "output"]
    stream = spec["stream:fc1"]
    assert stream.readers == (AxisRef("fc2.weight", 1), AxisRef("weight", 1))
    assert AxisRef("fc2.weight", 0) in stream.writers and stream.maps == "dense"
    assert spec["output"].writers == (AxisRef("weight", 0), AxisRef("bias", 0))
    assert_preserved(model, x, spec)


class SelfAttention(nn.Module):
    """accord.zoo.vit.Attention's code in a class that accord.trace.fx traces through."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length = x.shape[0], x.shape[1]
        split = (batch, length, self.heads, self.head_dim)
        q = self.q(x).reshape(split).transpose(1, 2)
        k = self.k(x).reshape(split).transpose(1, 2)
        v = self.v(x).reshape(split).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, length, self.heads * self.head_dim))


class Encoder(nn.Module):
    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        self.embed, self.norm, self.attn = nn.Linear(5, 8), nn.LayerNorm(8), attention
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h + self.attn(self.norm(h))
        return self.head(h.mean(1))


def test_attention_written_out_in_the_graph(assert_preserved) -> None:
    model = Encoder(SelfAttention(8, 2))
    x = torch.randn(2, 4, 5)
    spec = trace(model, x)
    assert _names(spec) == ["input", "stream:embed", "attn.qk", "attn.v", "output"]
    qk, v = spec["attn.qk"], spec["attn.v"]
    assert (qk.maps, qk.groups, v.maps, v.groups) == ("orthogonal", 2, "linear", 2)
    assert qk.writers == (AxisRef("attn.q.weight", 0), AxisRef("attn.q.bias", 0))
    assert qk.readers == (AxisRef("attn.k.weight", 0), AxisRef("attn.k.bias", 0))
    # The query projection's output and the heads joined again are observed.
    assert qk.observe == (Observation("attn_q", 2),)
    assert v.observe == (Observation("attn_reshape_3", 2),)
    assert not spec.notes
    assert_preserved(model, x, spec)


class FusedPerHead(nn.Module):
    """q, k and v of each head in a row of one projection, without rotary embeddings (the
    layout of GPT-NeoX, chunked per head)."""

    def __init__(self, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, self.heads, -1).transpose(1, 2).chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


def test_heads_fused_in_a_row_are_one_qk_and_one_value_space_each(assert_preserved) -> None:
    """Each head's 12 rows: q (writes its qk space), k (reads it), v (read by the head's 4
    output columns); no space reaches across heads."""
    model, x = Encoder(FusedPerHead()), torch.randn(2, 4, 5)
    spec = trace(model, x)
    for head in range(2):
        start = 12 * head
        qk = next(s for s in spec if AxisRef("attn.qkv.weight", 0, 1, start) in s.writers)
        assert (qk.free, qk.maps, qk.size) == (True, "orthogonal", 4)
        assert AxisRef("attn.qkv.weight", 0, 1, start + 4) in qk.readers
        v = next(s for s in spec if AxisRef("attn.qkv.weight", 0, 1, start + 8) in s.writers)
        assert (v.free, v.maps, v.size) == (True, "linear", 4)
        assert v.readers == (AxisRef("attn.proj.weight", 1, 1, 4 * head),)
    assert len(spec.free_spaces) == len(list(spec)) - 2  # all but the input and the output
    assert_preserved(model, x, spec)


class RelativeBias(nn.Module):
    """Attention with a learned relative-position bias gathered from a table (Swin V2's
    continuous position bias): the table's space is fixed where it meets the scores, which
    must not fix the values."""

    def __init__(self, length: int = 5, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads, self.length = heads, length
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.table = nn.Linear(1, heads)
        offsets = torch.arange(length)[:, None] - torch.arange(length)[None, :]
        self.register_buffer("index", (offsets + length - 1).flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (
            f(x).view(b, n, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v)
        )
        coords = torch.arange(2 * n - 1.0)[:, None]
        bias = self.table(coords)[self.index].view(n, n, self.heads).permute(2, 0, 1)
        scores = q @ k.transpose(-2, -1) + bias
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
        return self.o(out)


def test_fixed_bias_mixed_into_scores_leaves_values_free(assert_preserved) -> None:
    model, x = RelativeBias(), torch.randn(3, 5, 8)
    spec = trace(model, x)
    assert not spec["table"].free and "combined at node" in spec["table"].reason
    assert spec["v"].free and spec["v"].readers == (AxisRef("o.weight", 1),)
    assert_preserved(model, x, spec)


def test_keys_used_elsewhere_fix_the_attention() -> None:
    class Leaky(SelfAttention):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            k = self.k(x)
            heads = (x.shape[0], x.shape[1], self.heads, self.head_dim)
            q, kh, v = (t.reshape(heads).transpose(1, 2) for t in (self.q(x), k, self.v(x)))
            out = F.scaled_dot_product_attention(q, kh, v).transpose(1, 2).reshape(x.shape)
            return self.proj(out) + k

    model, x = Encoder(Leaky(8, 2)), torch.randn(2, 4, 5)
    spec = trace(model, x)
    assert not spec["attn.q"].free
    assert "scaled_dot_product_attention" in spec["attn.q"].reason
    # the values do not depend on how q and k are used
    assert spec["attn.v"].free
    check_spec(spec, model, x)


class MatmulLinear(nn.Module):
    """A Linear of user code: ``x @ W.T + b`` (or ``x @ W`` with W stored as (in, out))."""

    def __init__(self, inputs: int, outputs: int, bias: bool, stored_out_in: bool) -> None:
        super().__init__()
        shape = (outputs, inputs) if stored_out_in else (inputs, outputs)
        self.stored_out_in = stored_out_in
        self.weight = nn.Parameter(torch.randn(shape) / inputs**0.5)
        self.bias = nn.Parameter(torch.randn(outputs)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight.T if self.stored_out_in else x @ self.weight
        return y if self.bias is None else self.bias + y


class MatmulMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = MatmulLinear(4, 6, bias=True, stored_out_in=True)
        self.b = MatmulLinear(6, 5, bias=True, stored_out_in=False)
        self.c = MatmulLinear(5, 8, bias=False, stored_out_in=True)
        self.d = nn.Parameter(torch.randn(3, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.b(torch.relu(self.a(x))))
        h = self.c(h)  # observed where it is read: no activation follows
        return torch.mm(h.flatten(0, 1), self.d.mT)


def test_linear_written_as_a_matrix_product(assert_preserved) -> None:
    """``x @ W.T + b``, ``x @ W``, ``torch.mm(x, W.mT)``: writers and readers as aten.linear's."""
    model, x = MatmulMLP(), torch.randn(2, 7, 4)
    spec = trace(model, x)
    assert spec.graph == "export" and _names(spec) == ["input", "a", "b", "c", "output"]
    assert spec["input"].readers == (AxisRef("a.weight", 1),)
    assert spec["a"].writers == (AxisRef("a.weight", 0), AxisRef("a.bias", 0))
    assert spec["a"].readers == (AxisRef("b.weight", 0),)
    assert spec["b"].writers == (AxisRef("b.weight", 1), AxisRef("b.bias", 0))
    assert spec["b"].readers == (AxisRef("c.weight", 1),)
    assert spec["c"].writers == (AxisRef("c.weight", 0),)
    assert spec["c"].readers == (AxisRef("d", 1),)
    assert spec["output"].writers == (AxisRef("d", 0),)
    assert all(spec[name].free and spec[name].maps == "dense" for name in "ab")
    assert spec["c"].free and spec["c"].maps == "linear"
    assert_preserved(model, x, spec)


class HandWrittenNorms(nn.Module):
    """Norms written out with var and std, whose keepdim sits at another place in each ATen
    overload: var.correction (keyword-only), std.dim and var.dim (argument 3, after unbiased)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 5), nn.Linear(5, 3)
        self.gain = nn.Parameter(torch.rand(6) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        # a LayerNorm over the features
        var = h.var(-1, correction=0, keepdim=True)
        h = (h - h.mean(-1, keepdim=True)) / torch.sqrt(var + 1e-5) * self.gain
        g = self.b(h)
        # an instance norm over the tokens, each feature alone
        g = (g - g.mean(1, keepdim=True)) / torch.std(g, 1, False, True)
        # pooled over the tokens by their spread
        return self.c(torch.var(g, 1, True, False))


def test_var_and_std_keep_their_dims_by_the_operator_schema(assert_preserved) -> None:
    model, x = HandWrittenNorms(), torch.randn(2, 7, 4)
    spec = trace(model, x)
    assert spec.graph == "export" and _names(spec) == ["input", "a", "b", "output"]
    assert spec["a"].free and spec["a"].maps == "permutation"
    assert spec["a"].elementwise == (AxisRef("gain", 0),)
    assert spec["a"].readers == (AxisRef("b.weight", 1),)
    # over the tokens each feature is normalised alone, but divided by a feature tensor
    assert spec["b"].free and spec["b"].maps == "permutation"
    assert spec["b"].readers == (AxisRef("c.weight", 1),)
    assert_preserved(model, x, spec)


def test_linear_written_as_an_einsum(assert_preserved) -> None:
    class Einsum(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(6, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.tanh(torch.einsum("...i,oi->...o", x, self.a))
            return torch.einsum("bti,io->bto", h, self.b)

    model, x = Einsum(), torch.randn(2, 5, 4)
    spec = trace(model, x)
    assert _names(spec) == ["input", "a", "output"]
    assert spec["input"].readers == (AxisRef("a", 1),)
    assert spec["a"].free and spec["a"].maps == "dense"
    assert spec["a"].writers == (AxisRef("a", 0),) and spec["a"].readers == (AxisRef("b", 0),)
    assert spec["output"].writers == (AxisRef("b", 1),)
    assert_preserved(model, x, spec)


def test_bias_added_after_a_matrix_product_is_observed_with_it() -> None:
    """The writer's output is observed after its bias, as an aten.linear's is (where it is
    seen whole: its reader reads it concatenated with another space)."""

    class Concatenated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = MatmulLinear(4, 6, bias=True, stored_out_in=True)
            self.z = nn.Linear(4, 2)
            self.b = MatmulLinear(8, 3, bias=False, stored_out_in=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.cat([self.a(x), self.z(x)], dim=-1))

    model, x = Concatenated(), torch.randn(5, 4)
    spec = trace(model, x)
    (point,) = spec["a"].observe
    graph = traced_module(model, x).graph
    node = next(n for n in graph.nodes if n.name == point.node)
    assert node.target is torch.ops.aten.add.Tensor


class Transformer(nn.Module):
    """Pre-norm blocks around nn.MultiheadAttention (packed or separate key/value dims)."""

    def __init__(
        self, dim: int = 8, heads: int = 2, memory: int | None = None, weights: bool = False
    ) -> None:
        super().__init__()
        self.weights = weights
        self.embed = nn.Linear(5, dim)
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(
            dim, heads, batch_first=True, kdim=memory, vdim=memory, add_bias_kv=memory is None
        )
        self.memory = nn.Linear(5, memory) if memory else None
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        q = self.norm(h)
        kv = self.memory(x) if self.memory is not None else q
        out, weights = self.attn(q, kv, kv, need_weights=self.weights)
        logits = self.head((h + out).mean(1))
        # the weights averaged over heads hold no features: they change nothing
        return logits if weights is None else logits + weights.mean((1, 2))[:, None]


@pytest.mark.parametrize("weights", [False, True])
@pytest.mark.parametrize("memory", [None, 6])
def test_multihead_attention(assert_preserved, memory: int | None, weights: bool) -> None:
    model = Transformer(memory=memory, weights=weights)
    x = torch.randn(2, 4, 5)
    spec = trace(model, x)
    qk, v = spec["attn.qk"], spec["attn.v"]
    assert (qk.maps, qk.groups, v.maps, v.groups) == ("orthogonal", 2, "linear", 2)
    if memory is None:
        assert qk.writers == (AxisRef("attn.in_proj_weight", 0), AxisRef("attn.in_proj_bias", 0))
        assert AxisRef("attn.in_proj_weight", 0, 1, 8) in qk.readers
        assert AxisRef("attn.bias_k", 2) in qk.readers
        assert AxisRef("attn.in_proj_weight", 0, 1, 16) in v.writers
        assert AxisRef("attn.in_proj_weight", 1) in spec["stream:embed"].readers
    else:
        assert AxisRef("attn.k_proj_weight", 0) in qk.readers
        assert spec["memory"].readers == (
            AxisRef("attn.k_proj_weight", 1),
            AxisRef("attn.v_proj_weight", 1),
        )
    assert v.readers == (AxisRef("attn.out_proj.weight", 1),)
    assert spec["stream:embed"].maps == "permutation"
    assert_preserved(model, x, spec)


class ConvNeXtBlock(nn.Module):
    """Depthwise conv, channels-last LayerNorm and MLP, layer scale, residual."""

    def __init__(self, dim: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 2, stride=2)
        self.dw = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 2 * dim)
        self.down = nn.Linear(2 * dim, dim)
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        y = self.gamma * self.down(F.gelu(self.up(y)))
        x = x + y.permute(0, 3, 1, 2)
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_channels_last_block_with_layer_scale(assert_preserved) -> None:
    model = ConvNeXtBlock()
    x = torch.randn(2, 3, 8, 8)
    spec = trace(model, x)
    stream = spec["stream:stem"]
    assert stream.maps == "permutation"
    assert {AxisRef("gamma", 0), AxisRef("norm.weight", 0), AxisRef("dw.weight", 0)} <= set(
        stream.elementwise
    )
    assert spec["up"].observe == (Observation("gelu", 3),)
    assert_preserved(model, x, spec)


class Gated(nn.Module):
    """GroupNorm and a squeeze-and-excitation gate."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.squeeze = nn.Linear(8, 3)
        self.excite = nn.Linear(3, 8)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.gn(self.conv(x)))
        s = torch.sigmoid(self.excite(F.relu(self.squeeze(x.mean((2, 3))))))
        x = x * s[:, :, None, None]
        return self.head(x.amax(dim=(2, 3)))


def test_group_norm_and_gating(assert_preserved) -> None:
    model = Gated()
    x = torch.randn(2, 3, 6, 6)
    spec = trace(model, x)
    gated = spec["conv"]
    assert gated.groups == 2 and gated.maps == "permutation" and gated.free
    assert AxisRef("excite.weight", 0) in gated.writers
    assert spec["squeeze"].maps == "dense"
    assert_preserved(model, x, spec)


class Sorted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 6)
        self.fc3 = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.sort(torch.relu(self.fc1(x)), dim=1).values
        return self.fc3(torch.relu(self.fc2(h)))


def test_unknown_operation_fixes_its_spaces(assert_preserved) -> None:
    model = Sorted()
    x = torch.randn(4, 4)
    spec = trace(model, x)
    assert not spec["fc1"].free
    assert spec["fc1"].reason == "consumed by aten.sort, which accord cannot prove safe"
    assert spec["fc2"].free
    assert_preserved(model, x, spec)


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) if x.sum() > 0 else -self.fc(x)


class MLP3(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = (
            nn.Linear(n, m) for n, m in ((3, 4), (4, 5), (5, 6), (6, 2))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.d(F.relu(self.c(F.relu(self.b(F.relu(self.a(x)))))))


class WithBranchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.gate = Branchy()
        self.out = nn.Linear(4, 2)
        self.hidden = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hidden(F.relu(self.out(self.gate(F.relu(self.inp(x))))))


class MaskOnlyWhenEager(nn.Module):
    """Builds its mask only outside the exporter (as transformers' LongT5 does with
    ``is_torchdynamo_compiling``), then reads the mask's shape; torch.fx stops at the branch
    on a size."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = None if torch.compiler.is_exporting() else torch.ones_like(x)
        scale = _mask_rows(mask) if x.shape[0] > 1 else 1
        return self.fc(x) * scale


def _mask_rows(mask: torch.Tensor) -> int:
    return mask.shape[0]


def test_export_error_of_the_models_own_python_names_its_line() -> None:
    with pytest.raises(
        TraceError, match=r"torch\.export could not export MaskOnlyWhenEager"
    ) as info:
        trace(MaskOnlyWhenEager(), torch.randn(4, 3))
    # the exporter's message names no line: the innermost frame outside torch does
    message = str(info.value).splitlines()[0]
    assert "'NoneType' object has no attribute 'shape'" in message
    assert "raised by 'return mask.shape[0]' in _mask_rows" in message
    assert "test_trace.py" in message


def test_export_error_of_an_input_the_model_does_not_take_names_no_library_line() -> None:
    # the exporter binds the input to forward's signature in Python's inspect: no line of
    # the model's code is at fault, so none is named (not inspect's, torch's or accord's)
    with pytest.raises(TraceError, match=r"missing a required argument: 'x'") as info:
        trace(MaskOnlyWhenEager(), {"y": torch.randn(4, 3)})
    message = str(info.value).splitlines()[0]
    assert "raised by" not in message and "Pass an input the model accepts" in message


def test_untraceable_model_and_leaf_modules(assert_preserved) -> None:
    model = WithBranchy()
    x = torch.randn(4, 3)
    with pytest.raises(TraceError, match="leaf_modules") as info:
        trace(model, x)
    # the exporter's reason names the user's line; torch.fx's reason follows
    message = str(info.value)
    assert "torch.export could not export WithBranchy" in message
    assert "self.fc(x) if x.sum() > 0" in message and "torch.fx could not trace" in message
    # torch.export cannot export the branch even opaque: torch.fx traces around the leaf
    spec = trace(model, x, leaf_modules=["gate"])
    assert spec.graph == "fx"
    assert not spec["inp"].free and "Branchy 'gate'" in spec["inp"].reason
    assert spec.leaf_modules == ("gate",)
    assert Spec.from_dict(spec.to_dict()).leaf_modules == ("gate",)
    # The leaf's parameters are claimed by nobody; its output starts a fresh chain.
    assert all(ref.tensor.split(".")[0] != "gate" for s in spec for ref in s.refs)
    assert spec["out"].free and spec["out"].readers == (AxisRef("hidden.weight", 1),)
    assert_preserved(model, x, spec)


def test_leaf_modules_on_the_exported_graph(assert_preserved) -> None:
    model, x = MLP3(), torch.randn(4, 3)
    spec = trace(model, x, leaf_modules=["b"])
    assert spec.graph == "export" and spec.leaf_modules == ("b",)
    # what enters the leaf is fixed, its parameters move with no space, its output is fresh
    assert (
        not spec["a"].free
        and spec["a"].reason == "consumed by leaf module 'b', which is kept opaque"
    )
    assert all(not ref.tensor.startswith("b.") for s in spec for ref in s.refs)
    assert spec["c"].free
    assert_preserved(model, x, spec)
    with pytest.raises(ConfigError, match=r"leaf_modules \['bb'\].*did you mean 'b'"):
        trace(model, x, leaf_modules=["bb"])


def test_opaque_use_of_a_parameter_fixes_its_space() -> None:
    class Peek(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(F.relu(self.fc1(x))) + torch.sort(self.fc1.weight[:, 0]).values[:2]

    spec = trace(Peek(), torch.randn(2, 3))
    assert not spec["fc1"].free and "fc1.weight is also used by" in spec["fc1"].reason


def test_reshapes_that_scramble_features_are_fixed() -> None:
    class Scramble(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.tokens = nn.Linear(4, 6), nn.Linear(4, 6)

        def forward(self, x: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
            interleaved = self.fc(x).reshape(2, 2, 3).transpose(1, 2).reshape(2, 6)
            return interleaved + self.tokens(seq).reshape(2, 18)[:, :6]

    spec = trace(Scramble(), (torch.randn(2, 4), torch.randn(2, 3, 4)))
    assert not spec["fc"].free and "mixes heads" in spec["fc"].reason
    assert "splits or interleaves the features" in spec["tokens"].reason


class FunctionalCNN(nn.Module):
    """Functional pools, a per-channel scale viewed as (1, C, 1, 1), view-flatten, upsampling."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.scale = nn.Parameter(torch.rand(4) + 0.5)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        self.fc = nn.Linear(5 * 4, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(self.conv1(x)), 2) * self.scale.view(1, -1, 1, 1)
        h = F.interpolate(F.pad(h, (1, 1, 1, 1)), scale_factor=2.0)
        h = F.avg_pool2d(self.conv2(h), 6)
        return self.out(torch.tanh(self.fc(h.view(h.size(0), -1))))


def test_functional_cnn(assert_preserved) -> None:
    model = FunctionalCNN()
    x = torch.randn(2, 3, 8, 8)
    spec = trace(model, x)
    assert spec["conv1"].maps == "permutation" and AxisRef("scale", 0) in spec["conv1"].elementwise
    # Pad, upsampling and average pools are linear: conv2 reaches fc with 2x2 blocks.
    assert spec["conv2"].maps == "linear"
    assert spec["conv2"].readers == (AxisRef("fc.weight", 1, 4),)
    assert spec["conv2"].observe == (Observation("conv2", 1),)
    assert_preserved(model, x, spec)


class Sequence(nn.Module):
    """(N, C, L) into a Conv1d, token embeddings, keyword inputs, a dict of outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3)
        self.bn = nn.BatchNorm1d(4)
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 2)
        self.glu = nn.Linear(4, 6)

    def forward(self, signal: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        h = F.relu(self.bn(self.conv(signal))).mean(-1) + self.embed(tokens).mean(1)
        a, b = self.glu(h).chunk(2, dim=-1)
        return {"logits": self.head(h), "gated": a * torch.sigmoid(b)}


def test_sequence_model_with_dict_input_and_outputs() -> None:
    model = _random_norms(Sequence())
    x = {"signal": torch.randn(2, 3, 7), "tokens": torch.randint(0, 10, (2, 5))}
    spec = trace(model, x)
    assert spec["input"].readers == (AxisRef("conv.weight", 1),)
    stream = spec["stream:conv"]
    assert AxisRef("embed.weight", 1) in stream.writers
    assert stream.batchnorms == (FoldedNorm("bn", "conv"),)
    # a · sigmoid(b) gates feature i of one half with feature i of the other: one space for
    # both halves (fixed here, being an output)
    gated = spec["output:glu"]
    assert gated.size == 3 and not gated.free and gated.maps == "permutation"
    assert AxisRef("glu.weight", 0, 1, 3) in gated.writers
    check_spec(spec, model, x)


def test_tied_embedding_moves_once_as_a_writer(assert_preserved) -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.norm = nn.Embedding(10, 4), nn.LayerNorm(4)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return F.linear(self.norm(self.embed(tokens)), self.embed.weight)

    model, tokens = Tied(), torch.randint(0, 10, (2, 5))
    spec = trace(model, tokens)
    # The embedding's columns write the stream and read it back: a writer gets T, a reader
    # T⁻ᵀ, one and the same for orthogonal maps (here permutations, for the LayerNorm).
    stream = spec["embed"]
    assert stream.free and stream.maps == "permutation"
    assert stream.writers == (AxisRef("embed.weight", 1),) and not stream.readers
    assert_preserved(model, tokens, spec)


def test_scaled_positional_embedding_is_a_writer(assert_preserved) -> None:
    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.out = nn.Linear(3, 4), nn.Linear(4, 2)
            self.pos = nn.Parameter(torch.randn(1, 5, 4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.relu(self.embed(x) + 0.5 * self.pos))

    model, x = Tokens(), torch.randn(2, 5, 3)
    spec = trace(model, x)
    assert AxisRef("pos", 2) in spec["embed"].writers and spec["embed"].free
    assert spec["embed"].observe == (Observation("relu", 2),)
    assert_preserved(model, x, spec)


def test_position_embeddings_resized_to_the_grid_write_the_stream(assert_preserved) -> None:
    """YOLOS / DPT: the class token's row of the position embeddings, the patches' rows
    resized by interpolation and put back together are still the parameter's feature axis."""

    class Resized(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.patch, self.out = nn.Conv2d(3, 4, 2, stride=2), nn.Linear(4, 2)
            self.cls = nn.Parameter(torch.randn(1, 1, 4))
            self.pos = nn.Parameter(torch.randn(1, 5, 4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            patches = self.patch(x).flatten(2).transpose(1, 2)
            tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), patches], dim=1)
            grid = self.pos[:, 1:].transpose(1, 2).reshape(1, 4, 2, 2)
            grid = F.interpolate(grid, size=(3, 3), mode="bicubic").flatten(2).transpose(1, 2)
            pos = torch.cat([self.pos[:, 0].unsqueeze(1), grid], dim=1)
            return self.out(torch.relu(tokens + pos)).mean(1)

    model, x = Resized(), torch.randn(2, 3, 6, 6)
    spec = trace(model, x)
    stream = spec["patch"]
    assert stream.free and {AxisRef("pos", 2), AxisRef("cls", 2)} <= set(stream.writers)
    assert_preserved(model, x, spec)


def test_tensor_split_cuts_a_fused_projection(assert_preserved) -> None:
    """``tensor_split`` (Mamba's reference scan) cuts like ``split``: two pieces of a fresh
    space, each its own."""

    class Gated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up, self.down = nn.Linear(3, 8), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a, b = torch.tensor_split(self.up(x), [4], dim=-1)
            return self.down(torch.relu(a) * b)

    model, x = Gated(), torch.randn(2, 3)
    spec = trace(model, x)
    assert spec["up"].free and spec["up"].size == 4
    assert AxisRef("up.weight", 0, 1, 4) in spec["up"].writers
    assert_preserved(model, x, spec)


def test_experts_in_a_loop_summed_back_by_index_add(assert_preserved) -> None:
    """JetMoE's experts: ``F.linear(x_i, W[i])`` for each expert's rows, the outputs summed
    back into zeros by ``index_add``: every expert reads and writes the stream, and its own
    hidden units, a space of its slices of the packed parameters."""

    class Experts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.head = nn.Linear(3, 4), nn.Linear(4, 2)
            self.up = nn.Parameter(torch.randn(2, 6, 4))
            self.down = nn.Parameter(torch.randn(2, 4, 6))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.embed(x)
            order = torch.tensor([3, 0, 2, 1])
            rows = h[order].split([2, 2], dim=0)
            out = torch.cat(
                [
                    F.linear(torch.relu(F.linear(r, self.up[i])), self.down[i])
                    for i, r in enumerate(rows)
                ]
            )
            return self.head(torch.relu(h + torch.zeros_like(h).index_add(0, order, out)))

    model, x = Experts(), torch.randn(4, 3)
    spec = trace(model, x)
    stream = spec["stream:embed"]
    assert stream.free and {AxisRef("up", 2), AxisRef("down", 1)} <= {
        *stream.readers,
        *stream.writers,
    }
    for expert in range(2):
        hidden = spec[f"up[{expert}]"]
        assert hidden.free and hidden.writers == (AxisRef("up", 1, at=(0, expert)),)
        assert hidden.readers == (AxisRef("down", 2, at=(0, expert)),)
    assert_preserved(model, x, spec)


@pytest.mark.parametrize("part", ["select", "slice"])
def test_part_of_a_weight_picked_by_position_fixes_that_axis(part: str) -> None:
    """``W[0]`` / ``W[0:1]`` of a Linear's weight used elsewhere: a map of W's rows would
    change which row is picked, so the space of those rows is fixed, naming the node."""

    class Picked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            gain = self.a.weight[0] if part == "select" else self.a.weight[0:1]
            return self.b(torch.relu(self.a(x))).sum(-1) + self.c(x * gain).sum(-1)

    model, x = Picked().eval(), torch.randn(5, 3)
    spec = trace(model, x)
    done = {"select": "selected", "slice": "sliced"}[part]
    assert not spec["a"].free and f"a.weight is {done} at node" in spec["a"].reason
    assert spec["b"].free and spec["c"].free
    for seed in range(4):
        with torch.no_grad():
            permuted = randomly_permuted(model, spec, seed=seed).eval()
            torch.testing.assert_close(permuted(x), model(x), rtol=1e-5, atol=1e-5)


def test_activation_written_with_where_and_comparisons(assert_preserved) -> None:
    """xIELU-like: ``where(x > 0, a x², (expm1(min(x, eps)) - x) b)`` with learned scalars
    is entry by entry of x: its units permute. A mask that differs per feature and is not a
    feature of any space fixes them."""

    class Where(nn.Module):
        def __init__(self, per_feature: bool) -> None:
            super().__init__()
            self.up, self.down = nn.Linear(3, 5), nn.Linear(5, 2)
            self.alpha, self.beta = nn.Parameter(torch.ones(1)), nn.Parameter(torch.ones(1))
            self.eps = nn.Buffer(torch.tensor(-1e-6))
            self.mask = nn.Buffer(torch.arange(5) % 2 == 0)
            self.per_feature = per_feature

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.up(x)
            negative = (torch.expm1(torch.min(h, self.eps)) - h) * F.softplus(self.beta)
            keep = self.mask if self.per_feature else h > 0
            return self.down(torch.where(keep, F.softplus(self.alpha) * h * h, negative))

    model, x = Where(per_feature=False), torch.randn(4, 3)
    spec = trace(model, x)
    assert spec["up"].free and spec["up"].maps == "permutation"
    assert_preserved(model, x, spec)
    spec = trace(Where(per_feature=True), x)
    assert not spec["up"].free and "cannot map" in spec["up"].reason


def test_transposed_convolution_reads_axis_0_and_writes_axis_1(assert_preserved) -> None:
    """ConvTranspose2d's weight is (in, out, kh, kw); a BatchNorm after it is not folded
    (folding scales a convolution's axis 0)."""

    class Upsampling(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.up = nn.Conv2d(3, 5, 3), nn.ConvTranspose2d(5, 6, 2, stride=2)
            self.norm, self.head = nn.BatchNorm2d(6), nn.Conv2d(6, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.norm(self.up(torch.relu(self.conv(x))))))

    model, x = Upsampling().eval(), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        model.norm.running_mean.uniform_(-1, 1)
        model.norm.running_var.uniform_(0.5, 2)
    spec = trace(model, x)
    assert spec["conv"].free and AxisRef("up.weight", 0) in spec["conv"].readers
    up = spec["up"]
    assert up.free and {AxisRef("up.weight", 1), AxisRef("up.bias", 0)} <= set(up.writers)
    assert not up.batchnorms and up.maps == "permutation"
    assert_preserved(model, x, spec)


# The spec itself --------------------------------------------------------------------------


def test_dropping_a_reader_is_caught_by_check() -> None:
    model = _random_norms(build_model("resnet20", image_size=8))
    x = torch.randn(2, 3, 8, 8)
    spec = trace(model, x)
    stream = spec["stream:layer2.0.conv2"]
    broken = dataclasses.replace(stream, readers=stream.readers[1:])
    spaces = [broken if s.name == stream.name else s for s in spec]
    with pytest.raises(SpecError, match=re.escape("stream:layer2.0.conv2")):
        check_spec(Spec(spaces, spec.model, spec.observation), model, x)


class StandardizedConv(nn.Conv2d):
    """Weight standardization as BiT and timm's StdConv2d write it: a batch norm of the
    weight, one channel per output channel, computed at every call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = self.weight.reshape(1, self.out_channels, -1)
        weight = F.batch_norm(flat, None, None, training=True, momentum=0.0, eps=1e-6)
        return self._conv_forward(x, weight.reshape_as(self.weight), self.bias)


class ManualStandardizedConv(nn.Conv2d):
    """Weight standardization written out: ``(w - mean) / sqrt(var + eps)`` per output
    channel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, axes = self.weight, (1, 2, 3)
        var = w.var(dim=axes, keepdim=True, unbiased=False)
        weight = (w - w.mean(dim=axes, keepdim=True)) / torch.sqrt(var + 1e-6)
        return self._conv_forward(x, weight, self.bias)


class StandardizedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = StandardizedConv(3, 6, 3, padding=1)
        self.conv2 = ManualStandardizedConv(6, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(torch.relu(self.conv1(x)))
        return self.fc(h.mean(dim=(2, 3)))  # no activation: conv2 would be linear


def test_weights_computed_from_parameters_allow_permutations_only(assert_preserved) -> None:
    """Standardized convolution weights (by batch_norm, or written out with mean and var)
    commute with permutations of the parameter, not with other maps."""
    model, x = StandardizedNet(), torch.randn(2, 3, 6, 6)
    spec = trace(model, x)
    assert spec["conv1"].free and spec["conv1"].maps == "permutation"
    assert spec["conv1"].readers == (AxisRef("conv2.weight", 1),)
    conv2 = spec["conv2"]
    assert conv2.free and conv2.maps == "permutation"
    assert conv2.writers == (AxisRef("conv2.weight", 0), AxisRef("conv2.bias", 0))
    assert conv2.readers == (AxisRef("fc.weight", 1),)
    assert_preserved(model, x, spec)


def test_weight_combined_with_a_part_of_itself_is_opaque(assert_preserved) -> None:
    """``w - w[:, :1]`` does not commute with permutations of w's columns: its spaces are
    fixed (a reduction over the whole axis would be kept)."""

    class FirstColumn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.weight = nn.Linear(3, 4), nn.Parameter(torch.randn(5, 4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(torch.relu(self.fc(x)), self.weight - self.weight[:, :1])

    model, x = FirstColumn(), torch.randn(6, 3)
    spec = trace(model, x)
    assert not spec["fc"].free and "aten.linear" in spec["fc"].reason
    assert_preserved(model, x, spec)


def test_exp_of_a_weight_writes_permutations_only(assert_preserved) -> None:
    class Exp(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight, self.out = nn.Parameter(torch.randn(6, 4)), nn.Linear(6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(F.linear(x, torch.exp(self.weight)))

    model, x = Exp(), torch.randn(5, 4)
    spec = trace(model, x)
    # without an activation the space would be linear, were the weight the parameter
    assert spec["weight"].free and spec["weight"].maps == "permutation"
    assert_preserved(model, x, spec)


class GroupedExperts(nn.Module):
    """Two experts applied with ``torch._grouped_mm`` (no float64 kernel), as transformers'
    mixture-of-experts layers do: tokens 0-1 go to expert 0, the rest to expert 1."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 5), nn.Linear(5, 8)
        self.experts = nn.Parameter(torch.randn(2, 8, 4))
        self.register_buffer("offsets", torch.tensor([2, 6], dtype=torch.int32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc2(torch.relu(self.fc1(x)))
        return torch._grouped_mm(h, self.experts, offs=self.offsets)


def test_check_falls_back_to_the_model_dtype_without_float64_kernels() -> None:
    model, x = GroupedExperts(), torch.randn(6, 3)
    with pytest.raises(RuntimeError, match="Double"):
        copy.deepcopy(model).double()(x.double())
    spec = trace(model, x)
    assert spec["fc1"].free
    with pytest.warns(UserWarning, match=r"does not run in float64.*checked in torch\.float32"):
        result = check_spec(spec, model, x)
    assert result.dtype == torch.float32 and result.rtol == FALLBACK_RTOL[torch.float32]
    assert "Double" in result.note
    # the tolerance still catches a wrong spec
    fc1 = spec["fc1"]
    broken = dataclasses.replace(fc1, readers=())
    spaces = [broken if s.name == "fc1" else s for s in spec]
    with (
        pytest.warns(UserWarning),
        pytest.raises(SpecError, match=r"'fc1'.*checked in torch\.float32"),
    ):
        check_spec(Spec(spaces, spec.model, spec.observation), model, x)


def test_grouped_experts_and_gathered_tokens() -> None:
    """Tokens gathered by an index tensor keep their features; ``torch._grouped_mm`` reads
    them with every expert's input axis and writes one space with their output axes. (It
    exports in bfloat16 only, so the model is bfloat16 and checked in it.)"""

    class Routed(GroupedExperts):
        def __init__(self) -> None:
            super().__init__()
            # strides of 16 bytes in bfloat16
            self.experts, self.out = nn.Parameter(torch.randn(2, 8, 8)), nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            order = torch.argsort(x[:, 0])  # indices computed from the data
            h = self.fc2(torch.relu(self.fc1(x)))[order]
            return self.out(torch._grouped_mm(h, self.experts, offs=self.offsets))

    model, x = Routed().to(torch.bfloat16).eval(), torch.randn(6, 3, dtype=torch.bfloat16)
    spec = trace(model, x)
    assert spec.graph == "export" and spec["fc2"].readers == (AxisRef("experts", 1),)
    assert spec["experts"].free and spec["experts"].writers == (AxisRef("experts", 2),)
    assert spec["experts"].readers == (AxisRef("out.weight", 1),)
    assert spec["fc1"].free and spec["fc2"].free and not spec["input"].free
    with pytest.warns(UserWarning, match="float64"):
        assert check_spec(spec, model, x).dtype == torch.bfloat16
    twin = randomly_permuted(model, spec, seed=1).eval()
    with torch.no_grad():
        # a permutation reorders no sum: bfloat16 rounds alike
        torch.testing.assert_close(twin(x), model(x), rtol=0, atol=0)


def test_check_runs_in_float64_where_it_can() -> None:
    model, x = FunctionalMLP(), torch.randn(8, 6)
    result = check_spec(trace(model, x), model, x)
    assert (result.dtype, result.rtol, result.note) == (torch.float64, 1e-5, "")


def test_save_load_round_trip_and_validation(tmp_path) -> None:
    model = build_model("mlp", image_size=8, width=8, depth=2)
    spec = trace(model, torch.randn(2, 3, 8, 8))
    path = tmp_path / "spec.json"
    spec.save(path)
    assert Spec.load(path, model) == spec
    model.layers[3] = nn.Linear(8, 8, bias=False)
    with pytest.raises(SpecError, match=re.escape("layers.3.bias")):
        Spec.load(path, model)


def _structure(spec: Spec) -> list[tuple]:
    """Everything about the spaces except the names of the graph nodes observed."""
    return [
        (s.name, s.size, s.refs, s.batchnorms, s.maps, s.groups, s.free, s.reason, len(s.observe))
        for s in spec
    ]


@pytest.mark.parametrize("name", ["mlp", "resnet20", "vgg11", "vit"])
def test_export_finds_the_spaces_torch_fx_found(name: str) -> None:
    extra = {"patch_size": 4} if name == "vit" else {}
    model = build_model(name, image_size=8, **extra)
    x = torch.randn(2, 3, 8, 8)
    exported, fx = trace(model, x), trace_fx(model, x, "post", set())
    assert (exported.graph, fx.graph) == ("export", "fx")
    assert _structure(exported) == _structure(fx)


def test_spec_files_of_the_torch_fx_graph_still_load_and_merge(tmp_path) -> None:
    from accord.merge import merge
    from accord.statistics import collect_statistics

    models = [build_model("resnet20", image_size=8, width=1) for _ in range(2)]
    data = [(torch.randn(6, 3, 8, 8),) for _ in range(2)]
    x = data[0][0]
    # a file written before torch.export traced every model: fx node names, no "graph" key
    old = trace_fx(models[0], x, "pre", set()).to_dict()
    del old["graph"]
    path = tmp_path / "spec.json"
    path.write_text(__import__("json").dumps(old), encoding="utf-8")
    loaded, exported = Spec.load(path, models[0]), trace(models[0], x, observe="pre")
    # the residual sums: torch.fx names them by function, torch.export by block
    assert loaded.graph == "fx" and "add" in {o.node for s in loaded for o in s.observe}
    assert "layer1_0_add" in {o.node for s in exported for o in s.observe}
    stats = [collect_statistics(models, data, spec, progress=False) for spec in (loaded, exported)]
    for space, got in stats[0].spaces.items():
        torch.testing.assert_close(got.covariance(1, 0), stats[1].spaces[space].covariance(1, 0))
    merged = [
        merge(models, data, method="permutation", spec=spec, progress=False).model.state_dict()
        for spec in (loaded, exported)
    ]
    for key, value in merged[0].items():
        torch.testing.assert_close(value, merged[1][key])


def test_bad_observe_option_and_bad_input() -> None:
    model = build_model("mlp", image_size=8, width=8, depth=1)
    with pytest.raises(ConfigError, match="observe"):
        trace(model, torch.randn(2, 3, 8, 8), observe="middle")
    with pytest.raises(TraceError, match="example_input"):
        trace(model, torch.randn(2, 3, 5, 5))


def test_tracing_keeps_training_flags() -> None:
    model = build_model("vgg11", image_size=8, width=1 / 8, batch_norm=True).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trace(model, torch.randn(2, 3, 8, 8))
    assert all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class GroupedMLP(nn.Module):
    """A mixture of experts' MLP as transformers computes it: tokens sorted by expert (rows
    0-5 go to expert 0, 6-11 to expert 1), ``torch._grouped_mm`` into each expert's hidden
    units and back. ``mix_rows`` reverses the hidden rows between the two products, so that
    expert 1 reads what expert 0 wrote. (It exports in bfloat16 only, with strides of 16
    bytes.)"""

    def __init__(self, mix_rows: bool = False) -> None:
        super().__init__()
        self.embed, self.head = nn.Linear(3, 8), nn.Linear(8, 2)
        self.up = nn.Parameter(torch.randn(2, 8, 16) / 3)  # (experts, in, out)
        self.down = nn.Parameter(torch.randn(2, 16, 8) / 3)
        self.register_buffer("offsets", torch.tensor([6, 12], dtype=torch.int32))
        self.mix_rows = mix_rows
        self.to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        hidden = torch.relu(torch._grouped_mm(h, self.up, offs=self.offsets))
        if self.mix_rows:
            hidden = hidden[torch.arange(hidden.shape[0] - 1, -1, -1)]
        return self.head(h + torch._grouped_mm(hidden, self.down, offs=self.offsets))


def test_grouped_experts_get_one_space_each(tmp_path) -> None:
    """Each expert's hidden units are read by that expert alone: one space per expert, moving
    its slice of the packed parameters and observed on its rows; the stream stays one space
    that every expert reads and writes whole."""
    model, x = GroupedMLP().eval(), _tokens()
    spec = trace(model, x)
    stream = spec["stream:embed"]
    assert AxisRef("up", 1) in stream.readers and AxisRef("down", 2) in stream.writers
    for expert in range(2):
        space = spec[f"up[{expert}]"]
        assert space.free and space.maps == "dense" and space.size == 16
        assert space.writers == (AxisRef("up", 2, at=(0, expert)),)
        assert space.readers == (AxisRef("down", 1, at=(0, expert)),)
        assert [point.rows for point in space.observe] == [("offsets", expert)]
    assert "up" not in {s.name for s in spec}
    spec.save(tmp_path / "spec.json")
    assert Spec.load(tmp_path / "spec.json", model) == spec
    with pytest.warns(UserWarning, match="float64"):
        check_spec(spec, model, x)
    twin = randomly_permuted(model, spec, seed=1).eval()
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x))
    # each expert's slice moves on its own: the twin's experts are permuted differently
    stream = _nearest_rows(twin.embed.weight, model.embed.weight)
    hidden = [_nearest_rows(twin.up[e].T, model.up[e][stream].T) for e in range(2)]
    assert not torch.equal(hidden[0], hidden[1])


def _nearest_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row of ``a``, the index of the nearest row of ``b``."""
    return torch.cdist(a.float(), b.float()).argmin(1)


def _tokens() -> torch.Tensor:
    return torch.randn(12, 3, dtype=torch.bfloat16)


def test_grouped_experts_whose_rows_mix_share_one_space() -> None:
    """Hidden rows reordered between the products reach another expert: one space for all."""
    model, x = GroupedMLP(mix_rows=True).eval(), _tokens()
    spec = trace(model, x)
    assert spec["up"].free and spec["up"].writers == (AxisRef("up", 2),)
    assert not any(s.name.startswith("up[") for s in spec)
    with pytest.warns(UserWarning, match="float64"):
        check_spec(spec, model, x)


@pytest.mark.parametrize("method", ["permutation", "cca", "weight_matching"])
def test_grouped_experts_merge_back_from_a_permuted_twin(method: str) -> None:
    from accord.merge import merge

    model = GroupedMLP().eval()
    spec = trace(model, _tokens())
    twin = randomly_permuted(model, spec, seed=2).eval()
    data = [(_tokens(),) for _ in range(6)]
    result = merge([model, twin], data, method=method, spec=spec, repair="none", progress=False)
    with torch.no_grad():
        torch.testing.assert_close(result.model.eval()(data[0][0]), model(data[0][0]))


class ListedExperts(nn.Module):
    """Mixtral before transformers 5: experts in a ModuleList, each a gated MLP of its own
    Linear layers applied to the tokens routed to it, summed back one after another by
    ``index_add_``."""

    def __init__(self, experts: int = 3, top_k: int = 2) -> None:
        super().__init__()
        self.embed, self.gate, self.head = nn.Linear(5, 8), nn.Linear(8, experts), nn.Linear(8, 3)
        self.experts = nn.ModuleList(
            nn.ModuleDict({"w1": nn.Linear(8, 12), "w3": nn.Linear(8, 12), "w2": nn.Linear(12, 8)})
            for _ in range(experts)
        )
        self.top_k = top_k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        weights, chosen = torch.topk(F.softmax(self.gate(h), dim=-1), self.top_k, dim=-1)
        mask = F.one_hot(chosen, len(self.experts)).permute(2, 1, 0)
        out = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            slot, token = torch.where(mask[e])
            rows = h[token]
            y = expert["w2"](F.silu(expert["w1"](rows)) * expert["w3"](rows))
            out.index_add_(0, token, y * weights[token, slot, None])
        return self.head(h + out)


def test_experts_of_a_module_list_get_one_space_each(assert_preserved) -> None:
    model, x = ListedExperts().eval(), torch.randn(10, 5)
    spec = trace(model, x)
    stream = spec["stream:embed"]
    assert stream.free and {f"experts.{e}.w2.weight" for e in range(3)} <= {
        r.tensor for r in stream.writers
    }
    for e in range(3):
        hidden = spec[f"experts.{e}.w1"]
        assert hidden.free and hidden.observe
        assert {r.tensor for r in hidden.writers} == {
            f"experts.{e}.{w}.{p}" for w in ("w1", "w3") for p in ("weight", "bias")
        }
        assert hidden.readers == (AxisRef(f"experts.{e}.w2.weight", 1),)
    assert not spec["gate"].free
    assert_preserved(model, x, spec)


@pytest.mark.parametrize("method", ["permutation", "cca"])
def test_experts_of_a_module_list_merge_back_from_a_permuted_twin(method: str) -> None:
    from accord.merge import merge

    model = ListedExperts().eval()
    spec = trace(model, torch.randn(10, 5))
    twin = randomly_permuted(model, spec, seed=2).eval()
    data = [(torch.randn(16, 5),) for _ in range(6)]
    result = merge([model, twin], data, method=method, spec=spec, repair="none", progress=False)
    with torch.no_grad():
        torch.testing.assert_close(result.model.eval()(data[0][0]), model(data[0][0]))


def test_slices_of_another_axis_validate_and_move_alone() -> None:
    from accord.apply import permute_axis
    from accord.spec import FeatureSpace

    model = GroupedMLP()
    good = [FeatureSpace(f"e{e}", 16, writers=(AxisRef("up", 2, at=(0, e)),)) for e in range(2)]
    Spec(good).validate(model)
    for bad, message in (
        (AxisRef("up", 2, at=(2, 0)), "not an entry of another axis"),
        (AxisRef("up", 2, at=(0, 2)), "not an entry of another axis"),
    ):
        with pytest.raises(SpecError, match=message):
            Spec([FeatureSpace("e", 16, writers=(bad,))]).validate(model)
    whole = FeatureSpace("all", 16, readers=(AxisRef("up", 2),))
    with pytest.raises(SpecError, match="claimed by spaces 'e0' and 'all'"):
        Spec([*good, whole]).validate(model)
    perm = torch.randperm(16)
    moved = permute_axis(model.up.data, AxisRef("up", 2, at=(0, 1)), 16, perm)
    torch.testing.assert_close(moved[0], model.up.data[0], rtol=0, atol=0)
    torch.testing.assert_close(moved[1], model.up.data[1][:, perm], rtol=0, atol=0)


def test_an_expert_sent_no_tokens_gets_no_statistics() -> None:
    """A batch may send an expert no tokens (it adds nothing); an expert sent fewer than two
    in the whole data gets no statistics, with a warning, and activation-based methods leave
    it as it is. Here it never runs, so the merge still gives the model's outputs."""
    from accord.merge import merge
    from accord.statistics import collect_statistics

    model = GroupedMLP().eval()
    model.offsets.copy_(torch.tensor([12, 12], dtype=torch.int32))
    spec = trace(model, _tokens())
    twin = randomly_permuted(model, spec, seed=1).eval()
    data = [(_tokens(),) for _ in range(4)]
    with pytest.warns(UserWarning, match=r"experts' spaces \['up\[1\]'\] were sent fewer"):
        stats = collect_statistics([model, twin], data, spec, progress=False)
    assert stats.spaces["up[0]"].count == 48 and "up[1]" not in stats.spaces
    with pytest.warns(UserWarning, match="fewer than 2 tokens"):
        result = merge([model, twin], data, method="cca", spec=spec, repair="none", progress=False)
    with torch.no_grad():
        torch.testing.assert_close(result.model.eval()(data[0][0]), model(data[0][0]))


class InterleavedGLU(nn.Module):
    """Gate and up units written in turn by one projection (GPT-OSS's packed experts):
    ``gate = h[..., ::2]``, ``up = h[..., 1::2]``."""

    def __init__(self, interleaved: bool = True) -> None:
        super().__init__()
        # not interleaved: every third entry is left out, so no slice holds a space's features
        self.step = 2 if interleaved else 3
        self.up, self.down = nn.Linear(4, 6 * self.step), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        gate, up = h[..., :: self.step], h[..., 1 :: self.step]
        return self.down(torch.sigmoid(gate.clamp(max=7.0)) * (up.clamp(-7.0, 7.0) + 1))


def test_units_written_interleaved_own_a_block_of_entries_each(assert_preserved) -> None:
    """Unit c owns entries 2c and 2c + 1 of the projection (a block of 2): the units permute,
    each moving its gate and up rows together; slices that leave entries out stay fixed."""
    model, x = InterleavedGLU(), torch.randn(2, 5, 4)
    spec = trace(model, x)
    units = _with_ref(spec, "down.weight")
    assert units.free and units.size == 6 and units.maps == "permutation"
    assert units.writers == (AxisRef("up.weight", 0, 2), AxisRef("up.bias", 0, 2))
    assert units.readers == (AxisRef("down.weight", 1),)
    assert_preserved(model, x, spec)
    other = InterleavedGLU(interleaved=False)
    spec = trace(other, x)
    assert not spec.free_spaces or all("up" not in s.name for s in spec.free_spaces)
    assert_preserved(other, x, spec)


def _with_ref(spec: Spec, tensor: str) -> FeatureSpace:
    return next(s for s in spec if any(r.tensor == tensor for r in s.refs))


class _SortedCounts(nn.Module):
    def __init__(self, descending: bool, top: int) -> None:
        super().__init__()
        self.descending, self.top = descending, top

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids, _ = torch.sort(ids, descending=self.descending)
        counts = torch.histc(ids.float(), bins=4, min=0, max=self.top)
        return torch.cumsum(counts, dim=0) + ids.sum()


@pytest.mark.parametrize(
    ("descending", "top", "proved"), [(False, 3, True), (True, 3, False), (False, 4, False)]
)
def test_offsets_are_proved_to_count_sorted_expert_ids(
    descending: bool, top: int, proved: bool
) -> None:
    """Row s of rows sorted by expert id lies in group ids[s] of the end offsets
    ``cumsum(histc(ids, bins=E, min=0, max=E-1))`` of ascending ids (each token's expert
    bias picked by those ids then moves with its expert); histc over another range, or ids
    sorted the other way, prove nothing."""
    from accord.trace.experts import _sorted_ids
    from accord.trace.state import Routed

    model = _SortedCounts(descending, top)
    graph = torch.export.export(model, (torch.randint(0, 4, (9,)),)).graph
    offsets = next(n for n in graph.nodes if n.target == torch.ops.aten.cumsum.default)
    ids = next(n for n in graph.nodes if n.op == "call_function" and "getitem" in n.name)
    found = _sorted_ids(graph, Routed(offsets.name, 4))
    assert found == (ids.name if proved else None)
