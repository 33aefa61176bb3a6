"""Rotary embeddings (RoPE) on torch.export: q and k rotated per position leave only
permutations of whole key/value groups, each moving the group's k/v row blocks with the q row
blocks and o column blocks of its query heads. The tracer exposes that one space per attention
(scaled_dot_product_attention, with or without ``enable_gqa``, or written out with matmul);
it must be exact (randomly_permuted keeps the logits, check_spec passes) and a merge with a
permuted twin must find the permutation back, by activation matching and by CCA."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import accord
from _hf_models import VOCAB, Logits, transformers
from accord import AxisRef, FeatureSpace, Observation, Spec
from accord.match import block_correlation
from accord.statistics import SpaceStatistics


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RotaryAttention(nn.Module):
    """A hand-written RoPE attention block (grouped-query, biases, ``enable_gqa``)."""

    def __init__(self, heads: int = 4, kv_heads: int = 2, head_dim: int = 4, width: int = 12):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.embed = nn.Linear(5, width)
        self.q = nn.Linear(width, heads * head_dim)
        self.k = nn.Linear(width, kv_heads * head_dim)
        self.v = nn.Linear(width, kv_heads * head_dim)
        self.o = nn.Linear(heads * head_dim, width)
        self.head = nn.Linear(width, 3)
        inv_freq = 1.0 / 100 ** (torch.arange(0, head_dim, 2).float() / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        batch, length, _ = h.shape
        q = self.q(h).view(batch, length, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(h).view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(h).view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
        angles = torch.outer(torch.arange(length, dtype=torch.float32), self.inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos(), angles.sin()
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        out = out.transpose(1, 2).reshape(batch, length, self.heads * self.head_dim)
        return self.head(torch.relu(h + self.o(out)))


def _llama(kv_heads: int, attention: str = "sdpa") -> nn.Module:
    config = transformers.LlamaConfig(
        attn_implementation=attention,
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
    )
    return Logits(transformers.LlamaForCausalLM(config)).eval()


def _qwen3() -> nn.Module:
    """Qwen3: an RMSNorm over each head's dimension (one gain for every head) before RoPE."""
    config = transformers.Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    return Logits(transformers.Qwen3ForCausalLM(config)).eval()


def _tokens(batch: int) -> torch.Tensor:
    return torch.randint(2, VOCAB, (batch, 7))


CASES = {
    "llama": (lambda: _llama(4), _tokens, "model.model.layers.{}.self_attn.{}_proj", 2),
    "llama-gqa": (lambda: _llama(2), _tokens, "model.model.layers.{}.self_attn.{}_proj", 2),
    # attention written out: q @ kᵀ, softmax, @ v, with repeat_kv
    "llama-gqa-eager": (
        lambda: _llama(2, "eager"),
        _tokens,
        "model.model.layers.{}.self_attn.{}_proj",
        2,
    ),
    "qwen3-qk-norm": (_qwen3, _tokens, "model.model.layers.{}.self_attn.{}_proj", 2),
    "hand-written": (RotaryAttention, lambda b: torch.randn(b, 6, 5), "{}{}", 1),
}


@pytest.fixture(scope="module")
def traced() -> dict[str, tuple[nn.Module, Spec]]:
    found = {}
    for name, (build, inputs, _, _) in CASES.items():
        torch.manual_seed(0)
        model = build().eval()
        found[name] = (model, accord.trace(model, inputs(2)))
    return found


def _projection(name: str, layer: int, part: str) -> str:
    pattern = CASES[name][2]
    return pattern.format(layer, part) if "{}.self_attn" in pattern else part


def _head_space(spec: Spec, weight: str) -> FeatureSpace:
    """The space that moves ``weight``'s rows."""
    return next(s for s in spec if any((r.tensor, r.axis) == (weight, 0) for r in s.refs))


@pytest.mark.parametrize("name", list(CASES))
def test_rotary_attention_has_one_space_of_whole_key_value_groups(
    name: str, traced: dict[str, tuple[nn.Module, Spec]]
) -> None:
    model, spec = traced[name]
    hf = name != "hand-written"
    module = model.model.model.layers[0].self_attn if hf else model
    heads = 4
    kv_heads = module.config.num_key_value_heads if hf else 2
    head_dim = module.head_dim
    group = heads // kv_heads * head_dim
    for layer in range(CASES[name][3]):
        q, k, v, o = (_projection(name, layer, p) for p in "qkvo")
        space = _head_space(spec, f"{q}.weight")
        assert space.free and space.maps == "permutation" and space.size == kv_heads
        assert space.name.endswith(".heads")
        writers = {(r.tensor, r.axis, r.block, r.offset) for r in space.writers}
        assert {(f"{q}.weight", 0, group, 0), (f"{k}.weight", 0, head_dim, 0)} <= writers
        assert (f"{v}.weight", 0, head_dim, 0) in writers
        assert space.readers == (AxisRef(f"{o}.weight", 1, group),)
        if name == "hand-written":
            assert {(f"{q}.bias", 0, group, 0), (f"{v}.bias", 0, head_dim, 0)} <= writers
        # observed where o_proj reads the heads: every output feature of the group's heads
        assert space.observe and space.observed_block == group
        # the value heads move only with their group: no other space claims v's rows
        assert _head_space(spec, f"{v}.weight") == space


@pytest.mark.parametrize("name", list(CASES))
def test_permuted_twin_is_exact_and_merges_back(
    name: str, traced: dict[str, tuple[nn.Module, Spec]]
) -> None:
    model, spec = traced[name]
    inputs = CASES[name][1]
    x = inputs(3)
    accord.check_spec(spec, model, x)
    q = f"{_projection(name, 0, 'q')}.weight"
    # two groups: half the seeds swap them; the first that does
    twin = next(
        t
        for t in (accord.randomly_permuted(model, spec, seed=s).eval() for s in range(20))
        if not torch.equal(t.state_dict()[q], model.state_dict()[q])
    )
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(twin(x), expected, rtol=1e-5, atol=1e-5)
    data = [(inputs(16),) for _ in range(3)]
    head = _head_space(spec, q).name
    for method in ("permutation", "cca"):
        result = accord.merge([model, twin], data, method=method, repair="none", progress=False)
        assert result.report["spaces"][head]["method"] == "permutation"
        with torch.no_grad():
            torch.testing.assert_close(result.model.eval()(x), expected, rtol=1e-5, atol=1e-6)
        merged = result.model.state_dict()
        for key, value in model.state_dict().items():
            torch.testing.assert_close(merged[key], value, rtol=1e-5, atol=1e-6)


def test_head_spaces_keep_block_times_fewer_statistics(
    traced: dict[str, tuple[nn.Module, Spec]],
) -> None:
    """A head space's statistics are, per pair of models, the covariances of entries at one
    position of two key/value groups, (block, n_kv, n_kv), not the full (n_kv·block)² that
    observing its entries one by one keeps: for the tiny grouped-query Llama (2 groups of 2
    heads of 8), 3 × 16·2² = 192 values per space instead of 3 × 32² = 3,072, and the same
    block correlations."""
    model, spec = traced["llama-gqa"]
    twin = accord.randomly_permuted(model, spec, seed=0).eval()
    head_spaces = [s for s in spec.free_spaces if s.observed_block > 1]
    assert len(head_spaces) == 2  # one per layer
    names = [s.name for s in head_spaces]
    # the same spaces observed entry by entry: the full covariances statistics kept before
    whole = spec
    for space in head_spaces:
        entries = tuple(replace(o, block=1) for o in space.observe)
        width = space.size * space.observed_block
        whole = whole.replace_space(space.name, size=width, observe=entries)
    data = [(_tokens(8),)]  # 56 tokens for 32 entries
    kept, full = (
        accord.collect_statistics(
            [model, twin], data, s, progress=False, spaces=names, precision="float64"
        )
        for s in (spec, whole)
    )
    for space in head_spaces:
        reduced, before = kept.spaces[space.name], full.spaces[space.name]
        kv, block = space.size, space.observed_block
        assert (kv, block, reduced.block, len(reduced.blocks)) == (2, 16, 16, 3)
        assert all(b.shape == (block, kv, kv) for b in reduced.blocks.values())
        stored = sum(b.numel() for b in reduced.blocks.values())
        assert sum(b.numel() for b in before.blocks.values()) == 3 * (kv * block) ** 2
        assert (stored, 3 * (kv * block) ** 2) == (192, 3072)
        torch.testing.assert_close(
            block_correlation(reduced, 0, 1, space),
            block_correlation(before, 0, 1, space),
            rtol=0,
            atol=1e-10,
        )


def test_rotation_that_differs_per_head_fixes_query_and_key() -> None:
    """A per-position factor that also varies across heads makes heads unequal: no
    permutation of them is proven to keep the attention, so the spaces stay fixed."""

    class PerHead(RotaryAttention):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.embed(x)
            batch, length, _ = h.shape
            q = self.q(h).view(batch, length, 4, 4).transpose(1, 2)
            k = self.k(h).view(batch, length, 2, 4).transpose(1, 2)
            v = self.v(h).view(batch, length, 2, 4).transpose(1, 2)
            scale = torch.arange(4 * length * 4, dtype=torch.float32).reshape(4, length, 4)
            out = F.scaled_dot_product_attention(q * scale, k, v, enable_gqa=True)
            return self.head(self.o(out.transpose(1, 2).reshape(batch, length, 16)))

    spec = accord.trace(PerHead().eval(), torch.randn(2, 6, 5))
    query = _head_space(spec, "q.weight")
    assert not query.free and "rotary" in query.reason


def test_block_observations_round_trip_and_old_observations_load(tmp_path: object) -> None:
    points = (Observation("a", 2, None, 16), Observation("b", 1), Observation("c", 1, 8))
    spec = Spec([FeatureSpace("h", 2, observe=points)], graph="export")
    spec.save(tmp_path / "spec.json")  # type: ignore[operator]
    assert Spec.load(tmp_path / "spec.json") == spec  # type: ignore[operator]
    data = spec.to_dict()
    assert data["spaces"][0]["observe"] == [["a", 2, None, 16], ["b", 1], ["c", 1, 8]]


def test_block_correlation_averages_entrywise_correlations_over_the_blocks() -> None:
    torch.manual_seed(0)
    size, block = 3, 4
    x = torch.randn(500, size * block, dtype=torch.float64)
    order = torch.tensor([2, 0, 1]).repeat_interleave(block) * block
    y = x[:, order + torch.arange(block).repeat(size)]
    y = y + 0.3 * torch.randn_like(y)
    both = torch.cat([x, y], dim=1)
    cov = torch.cov(both.T)
    n = size * block
    blocks = {(0, 0): cov[:n, :n], (1, 1): cov[n:, n:], (0, 1): cov[:n, n:]}
    stats = SpaceStatistics(500, both.mean(0).reshape(2, n), blocks)
    space = FeatureSpace("h", size, observe=(Observation("a", 1, None, block),))
    got = block_correlation(stats, 0, 1, space)
    corr = torch.corrcoef(both.T)[:n, n:]
    for c in range(size):
        for d in range(size):
            entries = [corr[c * block + j, d * block + j] for j in range(block)]
            assert got[c, d] == pytest.approx(float(sum(entries) / block), abs=1e-12)
    # new feature c of y is x's feature c: the matching columns are the permutation's inverse
    assert got.argmax(dim=1).tolist() == [1, 2, 0]


def test_query_written_by_a_grouped_convolution_keeps_its_groups_in_place() -> None:
    """Whole groups of a grouped convolution's output cannot move without its input groups,
    so rotated heads that are those groups stay fixed."""

    class GroupedQuery(RotaryAttention):
        def __init__(self) -> None:
            super().__init__(heads=2, kv_heads=2, head_dim=4, width=8)
            self.q = nn.Conv1d(8, 8, 1, groups=2)  # type: ignore[assignment]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.embed(x)
            batch, length, _ = h.shape
            q = self.q(h.transpose(1, 2)).transpose(1, 2)
            q = q.reshape(batch, length, 2, 4).transpose(1, 2)
            k = self.k(h).view(batch, length, 2, 4).transpose(1, 2)
            v = self.v(h).view(batch, length, 2, 4).transpose(1, 2)
            angles = torch.outer(torch.arange(length, dtype=torch.float32), self.inv_freq)
            angles = torch.cat((angles, angles), dim=-1)
            q = q * angles.cos() + _rotate_half(q) * angles.sin()
            k = k * angles.cos() + _rotate_half(k) * angles.sin()
            out = F.scaled_dot_product_attention(q, k, v)
            return self.head(self.o(out.transpose(1, 2).reshape(batch, length, 8)))

    model = GroupedQuery().eval()
    spec = accord.trace(model, torch.randn(2, 6, 5))
    query = _head_space(spec, "q.weight")
    assert not query.free and "rotary" in query.reason
    accord.check_spec(spec, model, torch.randn(2, 6, 5))


class LatentAttention(nn.Module):
    """DeepSeek's way, written out: each query head a part without positions beside a
    rotated part, each key head its part without positions (cut from the value's projection)
    beside one rotated part shared by every head, written into an empty tensor in place."""

    def __init__(self, heads: int = 2, nope: int = 4, rope: int = 2, value: int = 4) -> None:
        super().__init__()
        self.heads, self.nope, self.rope, self.value = heads, nope, rope, value
        self.embed = nn.Linear(5, 12)
        self.q = nn.Linear(12, heads * (nope + rope))
        self.kv = nn.Linear(12, heads * (nope + value))
        self.k_rot = nn.Linear(12, rope)
        self.o = nn.Linear(heads * value, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        b, n, _ = h.shape
        cos, sin = (
            torch.linspace(0.1, 1.0, n).cos()[:, None],
            torch.linspace(0.1, 1.0, n).sin()[:, None],
        )
        q = self.q(h).view(b, n, self.heads, -1).transpose(1, 2)
        q_pass, q_rot = q.split([self.nope, self.rope], dim=-1)
        q_rot = q_rot * cos + _rotate_half(q_rot) * sin
        kv = self.kv(h).view(b, n, self.heads, -1).transpose(1, 2)
        k_pass, v = kv.split([self.nope, self.value], dim=-1)
        k_rot = self.k_rot(h).view(b, 1, n, self.rope)
        k_rot = (k_rot * cos + _rotate_half(k_rot) * sin).expand(-1, self.heads, -1, -1)
        key = kv.new_empty(b, self.heads, n, self.nope + self.rope)
        key[..., : self.nope].copy_(k_pass)
        key[..., self.nope :].copy_(k_rot)
        query = torch.cat((q_pass, q_rot), dim=-1)
        out = F.scaled_dot_product_attention(query, key, v)
        h = h + self.o(out.transpose(1, 2).reshape(b, n, -1))
        return self.head(h.mean(1))


def test_latent_attention_maps_each_heads_part_without_positions() -> None:
    """The rotated parts stay in place, so do the heads; each head's parts without positions
    are one q·k space (q rows write it, the key's rows read it: orthogonal maps), each value
    head maps with its output columns; exact, and a permuted twin comes back by activation
    matching and by CCA."""
    torch.manual_seed(0)
    model = LatentAttention().eval()
    x = torch.randn(2, 6, 5)
    spec = accord.trace(model, x)
    for head in range(2):
        qk = next(s for s in spec if AxisRef("q.weight", 0, 1, 6 * head) in s.writers)
        assert qk.free and qk.maps == "orthogonal" and qk.size == 4, qk
        assert qk.readers == (
            AxisRef("kv.weight", 0, 1, 8 * head),
            AxisRef("kv.bias", 0, 1, 8 * head),
        )
        rotated = next(s for s in spec if AxisRef("q.weight", 0, 1, 6 * head + 4) in s.writers)
        assert not rotated.free
        value = next(s for s in spec if AxisRef("kv.weight", 0, 1, 8 * head + 4) in s.writers)
        assert value.free and value.maps == "linear"
    accord.check_spec(spec, model, x)
    twin = accord.randomly_permuted(model, spec, seed=1).eval()
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x), rtol=1e-5, atol=1e-5)
    data = [(torch.randn(32, 6, 5),) for _ in range(2)]
    for method in ("permutation", "cca"):
        merged = accord.merge([model, twin], data, method=method, repair="none", progress=False)
        with torch.no_grad():
            got = merged.model.eval()(data[0][0])
            torch.testing.assert_close(got, model(data[0][0]), rtol=1e-4, atol=1e-5)


class _CopyIntoFeatures(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(5, 8), nn.Linear(5, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x).clone()
        h[:, :4].copy_(self.b(x)[:, :4])
        return self.c(h)


def test_copy_into_features_fixes_both() -> None:
    """copy_ into part of a tensor that holds features (not a fresh one) overwrites some of
    them: the spaces of both stay fixed."""
    spec = accord.trace(_CopyIntoFeatures().eval(), torch.randn(2, 5))
    for name in ("a", "b"):
        space = next(s for s in spec if any(r.tensor == f"{name}.weight" for r in s.writers))
        assert not space.free, space.name
