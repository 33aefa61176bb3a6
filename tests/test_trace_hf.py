"""Hugging Face model classes, as users bring them: tiny random configs wrapped as
``x -> model(x).logits``. torch.fx cannot trace any of them; accord traces them on
torch.export. Each must pass check_spec, expose the spaces a careful person would mark, survive
randomly_permuted exactly and come back from a merge with its permuted twin (permutation and
CCA)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import accord
from _hf_models import (
    BUILDERS,
    FURTHER_BUILDERS,
    FURTHER_SLOW,
    MORE_BUILDERS,
    SLOW_FAMILIES,
    SURVEY_BUILDERS,
    SURVEY_SLOW,
    Logits,
    _falcon,
    transformers,
)
from accord import AxisRef, FeatureSpace, Spec
from accord.errors import TraceError

# the families of the README's list: the tests' own and those the surveys added
FAMILIES = {**BUILDERS, **MORE_BUILDERS, **FURTHER_BUILDERS, **SURVEY_BUILDERS}


@pytest.fixture(scope="module")
def traced() -> Callable[[str], tuple[nn.Module, torch.Tensor, Spec]]:
    """Per family, once: the wrapped model (eval), an example input and its spec."""
    cache: dict[str, tuple[nn.Module, torch.Tensor, Spec]] = {}

    def get(name: str) -> tuple[nn.Module, torch.Tensor, Spec]:
        if name not in cache:
            torch.manual_seed(0)
            model, inputs = FAMILIES[name]()
            wrapped = Logits(model).eval()
            x = inputs(2)
            cache[name] = (wrapped, x, accord.trace(wrapped, x))
        return cache[name]

    return get


def _with(spec: Spec, tensor: str, axis: int, offset: int = 0) -> FeatureSpace:
    """The space that moves ``tensor``'s ``axis`` from ``offset`` (any role)."""
    for space in spec:
        if any((r.tensor, r.axis, r.offset) == (tensor, axis, offset) for r in space.refs):
            return space
    raise AssertionError(f"no space moves {tensor}[{axis}] from {offset}")


def _free(spec: Spec, tensor: str, axis: int, offset: int = 0, maps: str | None = None) -> None:
    space = _with(spec, tensor, axis, offset)
    assert space.free, f"{space.name}: {space.reason}"
    assert space.observe, f"{space.name} has no observation points"
    assert maps is None or space.maps == maps, (space.name, space.maps)


def _has(space: FeatureSpace, role: str, *refs: tuple[str, int]) -> None:
    found = {(r.tensor, r.axis) for r in getattr(space, role)}
    assert set(refs) <= found, (space.name, role, set(refs) - found)


def _assert_carries_the_input(name: str, logits: torch.Tensor) -> None:
    """Logits near zero, or the same for every input, make every comparison pass: a builder
    whose class initialisation shrinks them so needs ``_default_init``."""
    largest = logits.abs().max().item()
    spread = logits.std(dim=0).max().item()
    assert largest > 1e-3 and spread > 1e-4, (
        f"{name}: logits carry nothing of the input (max |logit| {largest:.3g}, largest "
        f"std over the batch {spread:.3g}); restore the default initialisation in its builder"
    )


def _marks(name: str) -> list[Any]:
    return [pytest.mark.slow] if name in (*SLOW_FAMILIES, *FURTHER_SLOW, *SURVEY_SLOW) else []


@pytest.mark.parametrize("name", [pytest.param(name, marks=_marks(name)) for name in FAMILIES])
def test_hf_model_traces_and_merges_back(name: str, traced: Any) -> None:
    model, x, spec = traced(name)
    assert spec.graph == "export"
    accord.check_spec(spec, model, x)
    twin = accord.randomly_permuted(model, spec, seed=3).eval()
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x), rtol=1e-5, atol=1e-5)
    before, after = model.state_dict(), twin.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    inputs = FAMILIES[name]()[1]
    data = [(inputs(16),) for _ in range(3)]
    with torch.no_grad():
        expected = model(data[0][0])
    _assert_carries_the_input(name, expected)
    for method in ("permutation", "cca"):
        # repair="none": REPAIR and BatchNorm resets fit statistics of the data, which these
        # random models were never trained on
        result = accord.merge([model, twin], data, method=method, repair="none", progress=False)
        with torch.no_grad():
            got = result.model.eval()(data[0][0])
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("name", "groups", "per_group"), [("olmo2", 4, 8), ("olmo3", 2, 16)])
def test_one_norm_across_heads_moves_with_whole_heads(
    name: str, groups: int, per_group: int, traced: Any
) -> None:
    """OLMo 2 and 3 RMS-normalise q (and k) over all the heads' features at once, then apply
    rotary embeddings per head: the mean of squares over every head is kept by any permutation
    of the features, so whole key/value groups permute (as under per-head norms), each norm's
    gain moving with its group; one space of the groups' q, k and v rows, their output columns
    and both gains, and every space but the output's free."""
    model, x, spec = traced(name)
    attn = "model.model.layers.0.self_attn"
    heads = _with(spec, f"{attn}.q_proj.weight", 0)
    _free(spec, f"{attn}.q_proj.weight", 0, maps="permutation")
    assert heads.size == groups
    assert set(heads.writers) == {
        AxisRef(f"{attn}.q_proj.weight", 0, per_group),
        AxisRef(f"{attn}.k_proj.weight", 0, 8),
        AxisRef(f"{attn}.v_proj.weight", 0, 8),
    }
    assert heads.readers == (AxisRef(f"{attn}.o_proj.weight", 1, per_group),)
    assert set(heads.elementwise) == {
        AxisRef(f"{attn}.q_norm.weight", 0, per_group),
        AxisRef(f"{attn}.k_norm.weight", 0, 8),
    }
    assert len(spec.free_spaces) == len(list(spec)) - 1
    # the twin's gains are the model's, moved group by group with the rows of q (found by
    # their norms, which the stream's permutation of the columns keeps)
    twin = accord.randomly_permuted(model, spec, seed=3).eval()
    before, after = model.state_dict(), twin.state_dict()
    rows, moved = (
        state[f"{attn}.q_proj.weight"].norm(dim=1).reshape(groups, per_group)
        for state in (before, after)
    )
    order = [int((rows - moved[h]).abs().sum(1).argmin()) for h in range(groups)]
    assert sorted(order) == list(range(groups)) and order != list(range(groups))
    gain = before[f"{attn}.q_norm.weight"].reshape(groups, per_group)
    torch.testing.assert_close(after[f"{attn}.q_norm.weight"].reshape(groups, -1), gain[order])
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_repair_brings_an_exact_twin_back_from_several_batches(name: str, traced: Any) -> None:
    """REPAIR's targets are each model's own statistics carried by its map, so for an exact
    twin they are the merged model's: repairing changes nothing, since each layer is measured
    over the whole data (here three batches) with the layers before it repaired."""
    model, _, spec = traced(name)
    twin = accord.randomly_permuted(model, spec, seed=3).eval()
    data = [(BUILDERS[name]()[1](16),) for _ in range(3)]
    with torch.no_grad():
        expected = model(data[0][0])
    result = accord.merge([model, twin], data, method="cca", repair="repair", progress=False)
    with torch.no_grad():
        got = result.model.eval()(data[0][0])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_llama_spaces(traced: Any) -> None:
    _, _, spec = traced("llama")
    layer = "model.model.layers.0"
    stream = _with(spec, "model.model.embed_tokens.weight", 1)
    _free(spec, "model.model.embed_tokens.weight", 1, maps="permutation")
    _has(
        stream,
        "elementwise",
        (f"{layer}.input_layernorm.weight", 0),
        ("model.model.norm.weight", 0),
    )
    _has(stream, "readers", ("model.lm_head.weight", 1), (f"{layer}.mlp.gate_proj.weight", 1))
    _has(
        stream,
        "writers",
        (f"{layer}.self_attn.o_proj.weight", 0),
        (f"{layer}.mlp.down_proj.weight", 0),
    )
    # SwiGLU: gate and up rows are one permutable space, read by down's columns
    mlp = _with(spec, f"{layer}.mlp.gate_proj.weight", 0)
    _free(spec, f"{layer}.mlp.gate_proj.weight", 0, maps="permutation")
    _has(mlp, "writers", (f"{layer}.mlp.up_proj.weight", 0))
    # rotary embeddings with grouped-query attention: one permutation space of the 2
    # key/value groups; each moves its k and v rows (8) with the q rows and o columns of its
    # two query heads (16), observed where o_proj reads them
    heads = _with(spec, f"{layer}.self_attn.v_proj.weight", 0)
    _free(spec, f"{layer}.self_attn.v_proj.weight", 0, maps="permutation")
    assert heads.size == 2 and heads.observed_block == 16
    for part, block in (("q_proj", 16), ("k_proj", 8), ("v_proj", 8)):
        assert AxisRef(f"{layer}.self_attn.{part}.weight", 0, block) in heads.writers
    assert heads.readers == (AxisRef(f"{layer}.self_attn.o_proj.weight", 1, 16),)


def test_gpt2_spaces(traced: Any) -> None:
    _, _, spec = traced("gpt2")
    attn = "model.transformer.h.0.attn"
    stream = _with(spec, "model.transformer.wte.weight", 1)
    _free(spec, "model.transformer.wte.weight", 1, maps="permutation")
    # tied: the output layer is the embedding, listed under both state-dict keys
    _has(stream, "writers", ("model.lm_head.weight", 1), ("model.transformer.wpe.weight", 1))
    _has(
        stream,
        "elementwise",
        ("model.transformer.h.0.ln_1.weight", 0),
        ("model.transformer.ln_f.bias", 0),
    )
    # Conv1D's transposed weight, q, k and v fused in c_attn and split along the features
    _has(stream, "readers", (f"{attn}.c_attn.weight", 0))
    qk = _with(spec, f"{attn}.c_attn.weight", 1, 0)
    _free(spec, f"{attn}.c_attn.weight", 1, 0, maps="orthogonal")
    assert qk.groups == 4 and AxisRef(f"{attn}.c_attn.weight", 1, 1, 32) in qk.readers
    # the query varies with the input: observed there (its piece of c_attn's output)
    assert [p.node for p in qk.observe] == ["model_transformer_h_0_attn_getitem"]
    value = _with(spec, f"{attn}.c_attn.weight", 1, 64)
    _free(spec, f"{attn}.c_attn.weight", 1, 64)
    assert value.groups == 4 and AxisRef(f"{attn}.c_attn.bias", 0, 1, 64) in value.writers
    _has(value, "readers", (f"{attn}.c_proj.weight", 0))
    _free(spec, "model.transformer.h.0.mlp.c_fc.weight", 1)


def test_bert_spaces(traced: Any) -> None:
    _, _, spec = traced("bert")
    emb, layer = "model.bert.embeddings", "model.bert.encoder.layer.0"
    stream = _with(spec, f"{emb}.word_embeddings.weight", 1)
    _free(spec, f"{emb}.word_embeddings.weight", 1, maps="permutation")
    _has(
        stream,
        "writers",
        (f"{emb}.position_embeddings.weight", 1),
        (f"{emb}.token_type_embeddings.weight", 1),
    )
    _has(
        stream, "elementwise", (f"{emb}.LayerNorm.weight", 0), (f"{layer}.output.LayerNorm.bias", 0)
    )
    qk = _with(spec, f"{layer}.attention.self.query.weight", 0)
    _free(spec, f"{layer}.attention.self.query.weight", 0, maps="orthogonal")
    _has(
        qk,
        "readers",
        (f"{layer}.attention.self.key.weight", 0),
        (f"{layer}.attention.self.key.bias", 0),
    )
    assert _with(spec, f"{layer}.attention.self.value.weight", 0).groups == 4
    _free(spec, f"{layer}.attention.self.value.weight", 0, maps="linear")
    _free(spec, f"{layer}.intermediate.dense.weight", 0, maps="dense")
    _free(spec, "model.bert.pooler.dense.weight", 0, maps="dense")


def test_vit_spaces(traced: Any) -> None:
    _, _, spec = traced("vit")
    emb = "model.vit.embeddings"
    stream = _with(spec, f"{emb}.patch_embeddings.projection.weight", 0)
    _free(spec, f"{emb}.patch_embeddings.projection.weight", 0, maps="permutation")
    # the class token and the position embeddings write the stream along their last axis
    _has(stream, "writers", (f"{emb}.cls_token", 2), (f"{emb}.position_embeddings", 2))
    _has(stream, "readers", ("model.classifier.weight", 1))
    layer = "model.vit.layers.0"
    _free(spec, f"{layer}.attention.q_proj.weight", 0, maps="orthogonal")
    _free(spec, f"{layer}.attention.v_proj.weight", 0, maps="linear")
    _free(spec, f"{layer}.mlp.fc1.weight", 0, maps="dense")


def test_convnext_spaces(traced: Any) -> None:
    _, _, spec = traced("convnext")
    layer = "model.convnext.encoder.stages.0.layers.0"
    stream = _with(spec, "model.convnext.embeddings.patch_embeddings.weight", 0)
    _free(spec, "model.convnext.embeddings.patch_embeddings.weight", 0, maps="permutation")
    # the depthwise convolution and the layer scale move with the stream's permutation
    _has(
        stream, "elementwise", (f"{layer}.dwconv.weight", 0), (f"{layer}.layer_scale_parameter", 0)
    )
    _has(stream, "writers", (f"{layer}.pwconv2.weight", 0))
    _free(spec, f"{layer}.pwconv1.weight", 0, maps="dense")


@pytest.mark.parametrize("name", ["resnet-basic", "resnet-bottleneck"])
def test_resnet_spaces(name: str, traced: Any) -> None:
    _, _, spec = traced(name)
    inner = [s for s in spec.free_spaces if not s.name.startswith("stream:")]
    streams = [s for s in spec.free_spaces if s.name.startswith("stream:")]
    assert len(streams) == 2 and len(inner) == (2 if name == "resnet-basic" else 5)
    # BatchNorms right after their convolutions fold: the spaces stay dense
    assert all(s.maps == "dense" and s.batchnorms for s in spec.free_spaces)
    shortcut = "model.resnet.encoder.stages.1.layers.0.shortcut"
    _has(streams[1], "writers", (f"{shortcut}.convolution.weight", 0))


def test_mixtral_experts_keep_the_stream_free(traced: Any) -> None:
    model, x, spec = traced("mixtral")
    mlp = "model.model.layers.0.mlp"
    stream = _with(spec, "model.model.embed_tokens.weight", 1)
    _free(spec, "model.model.embed_tokens.weight", 1, maps="permutation")
    # the router and every expert read the stream; every expert writes it
    _has(stream, "readers", (f"{mlp}.gate.weight", 1), (f"{mlp}.experts.gate_up_proj", 2))
    _has(stream, "writers", (f"{mlp}.experts.down_proj", 1))
    # the experts' hidden units: one space per expert, its slice of the gate and up halves of
    # gate_up_proj and of down_proj, observed on the tokens sent to it; the router's choice
    # among experts stays fixed
    gate_up, down = f"{mlp}.experts.gate_up_proj", f"{mlp}.experts.down_proj"
    for expert in range(4):
        hidden = spec[f"{gate_up}[{expert}]"]
        assert hidden.free and hidden.maps == "permutation" and hidden.observe
        assert hidden.writers == (
            AxisRef(gate_up, 1, at=(0, expert)),
            AxisRef(gate_up, 1, 1, 48, at=(0, expert)),
        )
        assert hidden.readers == (AxisRef(down, 2, at=(0, expert)),)
        assert {point.rows[1] for point in hidden.observe if point.rows} == {expert}
    assert not _with(spec, f"{mlp}.gate.weight", 0).free
    # torch._grouped_mm has no float64 kernel: the check runs in float32
    with pytest.warns(UserWarning, match="float64"):
        assert accord.check_spec(spec, model, x).dtype == torch.float32


# the mixtures of experts with packed (experts, …) parameters, 4 experts in one layer
PACKED_EXPERTS = (
    "mixtral",
    "qwen2-moe",
    "olmoe",
    "qwen3-moe",
    "phimoe",
    "granitemoe",
    "granitemoe-shared",
    "glm4-moe",
    "dots1",
    "deepseek-v2",
    "deepseek-v3",
    # a Python loop over the experts' slices, their rows concatenated before the activation
    "jetmoe",
    # every expert on every token: torch.bmm of (experts, tokens, features)
    "llama4",
    # per-expert biases picked by the sorted expert ids; gate and up units interleaved
    "gpt-oss",
)


@pytest.mark.parametrize("name", PACKED_EXPERTS)
def test_packed_experts_get_one_space_each(name: str, traced: Any) -> None:
    """Each expert's hidden units are a free space of their own, moving its slice of the
    packed parameters; weight matching, which needs no observations, brings a permuted twin
    back (permutation and CCA do in test_hf_model_traces_and_merges_back)."""
    model, _, spec = traced(name)
    experts = [s for s in spec.free_spaces if any(r.at is not None for r in s.refs)]
    assert sorted(s.name[-3:] for s in experts) == [f"[{e}]" for e in range(4)]
    for space in experts:
        expert = int(space.name[-2])
        assert all(r.at == (0, expert) for r in space.refs), space.name
        assert space.observe and all(_expert_of(p) == expert for p in space.observe)
    twin = accord.randomly_permuted(model, spec, seed=3).eval()
    data = [(FAMILIES[name]()[1](16),)]
    result = accord.merge([model, twin], data, method="weight_matching", progress=False)
    with torch.no_grad():
        expected = model(data[0][0])
        got = result.model.eval()(data[0][0])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def _expert_of(point: Any) -> int:
    """The expert whose rows an observation point samples (``rows`` or ``entry``)."""
    return point.entry if point.entry is not None else point.rows[1]


def test_expert_statistics_pair_tokens_of_models_that_route_differently(traced: Any) -> None:
    """Each expert's hidden units are observed on every token, zero where the router did not
    send it there: two models that route differently pair their samples by token. Checked
    against the experts computed by hand from each model's router and packed weights."""
    model, _, spec = traced("mixtral")
    _assert_expert_statistics(
        "mixtral", model, spec, _expert_hidden, "model.model.layers.0.mlp.experts.gate_up_proj[{}]"
    )


def test_jetmoe_experts_cut_by_run_time_sizes_get_one_space_each(traced: Any) -> None:
    """JetMoE splits its tokens, sorted by expert, into one piece per expert by sizes known
    at run time, runs each piece through its expert's slice of the packed weight in a Python
    loop and concatenates the rows again before the activation: the split and the
    concatenation in order are one grouping of the rows, so each expert's hidden units are
    a space of their own, observed on the rows of its piece (found from the split's pieces)
    and summed back into every token, so that models routing differently pair samples by
    token. Checked against the experts computed by hand."""
    model, _, spec = traced("jetmoe")
    mlp = "model.model.layers.0.mlp"
    split = "model_model_layers_0_mlp_input_linear_split_with_sizes"
    for expert in range(4):
        hidden = spec[f"{mlp}.input_linear[{expert}]"]
        assert hidden.free and hidden.maps == "permutation" and hidden.size == 48
        assert hidden.writers == (
            AxisRef(f"{mlp}.input_linear.weight", 1, at=(0, expert)),
            AxisRef(f"{mlp}.input_linear.weight", 1, 1, 48, at=(0, expert)),
        )
        assert hidden.readers == (AxisRef(f"{mlp}.output_linear.weight", 2, at=(0, expert)),)
        assert [point.rows for point in hidden.observe] == [(split, expert)]
    # the stream is not observed on the pieces: how many rows each holds depends on the router
    stream = _with(spec, "model.model.embed_tokens.weight", 1)
    assert stream.free and not any("getitem" in point.node for point in stream.observe)
    _assert_expert_statistics("jetmoe", model, spec, _jetmoe_hidden, f"{mlp}.input_linear[{{}}]")


def _assert_expert_statistics(
    family: str, model: nn.Module, spec: Any, hidden_of: Any, name: str
) -> None:
    """``model`` and another of ``family`` (seed 1) route 8 tokens differently; each expert's
    space (``name`` formatted with its index) holds one sample per token: the means and
    cross-covariance of the two models' hidden units computed by hand, ``hidden_of(model,
    x)`` as (tokens, experts, units)."""
    torch.manual_seed(1)
    other = Logits(FAMILIES[family]()[0]).eval()
    x = FAMILIES[family]()[1](8)
    stats = accord.collect_statistics(
        [model, other], [(x,)], spec, progress=False, precision="float64"
    )
    hidden = [hidden_of(m, x) for m in (model, other)]
    assert not torch.equal(*(h.ne(0).any(-1) for h in hidden))  # routed differently
    tokens = x.numel()
    for expert in range(hidden[0].shape[1]):
        got = stats.spaces[name.format(expert)]
        a, b = (h[:, expert].double() for h in hidden)
        assert got.count == tokens  # one sample per token
        torch.testing.assert_close(got.mean, torch.stack([a.mean(0), b.mean(0)]))
        cross = (a - a.mean(0)).T @ (b - b.mean(0)) / (len(a) - 1)
        torch.testing.assert_close(got.covariance(0, 1), cross)


def _rows_into(module: nn.Module, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input of ``module``'s last call when ``model`` runs on ``x``, as (tokens,
    features). (The hook returns None: a value would replace the module's output.)"""
    seen: dict[str, torch.Tensor] = {}
    handle = module.register_forward_hook(lambda _m, args, _o: seen.update(x=args[0]))
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen["x"].reshape(-1, seen["x"].shape[-1])


def _jetmoe_hidden(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(tokens, experts, hidden units) of JetMoE's only MLP: ``silu(gate)`` of each expert for
    the tokens its router sends there, zero elsewhere."""
    moe = model.model.model.layers[0].mlp
    h = _rows_into(moe, model, x)
    with torch.no_grad():
        chosen = moe.router.layer(h).topk(moe.router.top_k, dim=1).indices
        experts = []
        for expert in range(moe.input_linear.weight.shape[0]):
            gate = (h @ moe.input_linear.weight[expert].T).chunk(2, dim=-1)[0]
            sent = (chosen == expert).any(-1, keepdim=True)
            experts.append(torch.nn.functional.silu(gate) * sent)
    return torch.stack(experts, dim=1)


def test_experts_batched_over_every_token_are_observed_each_on_its_entry(traced: Any) -> None:
    """Llama 4 runs every expert on every token, each token scaled by the expert's routing
    weight (zero where the router did not choose it), as one torch.bmm of (experts, tokens,
    features) by the packed (experts, in, out) parameter: entry g of the product is expert
    g's alone, so each expert's hidden units are a space of their own, moving its slice of
    both packed parameters and observed on entry g (one sample per token, in every model).
    Checked against the experts computed by hand from each model's router and weights."""
    model, _, spec = traced("llama4")
    experts = "model.model.layers.0.feed_forward.experts"
    for expert in range(4):
        hidden = spec[f"{experts}.gate_up_proj[{expert}]"]
        assert hidden.free and hidden.size == 48
        assert hidden.writers == (
            AxisRef(f"{experts}.gate_up_proj", 2, at=(0, expert)),
            AxisRef(f"{experts}.gate_up_proj", 2, 1, 48, at=(0, expert)),
        )
        assert hidden.readers == (AxisRef(f"{experts}.down_proj", 1, at=(0, expert)),)
        assert [point.entry for point in hidden.observe] == [expert]
    assert spec.to_dict() == Spec.from_dict(spec.to_dict()).to_dict()  # entry round-trips
    _assert_expert_statistics(
        "llama4", model, spec, _llama4_hidden, f"{experts}.gate_up_proj[{{}}]"
    )


@pytest.mark.parametrize("name", ["qwen3-moe", "gpt-oss"])
def test_experts_by_each_tokens_own_weights_share_one_space(name: str) -> None:
    """transformers' ``batched_mm`` experts repeat each token once per chosen expert and
    multiply it by its expert's weights picked by id (``W[ids] @ x``, torch.bmm): the
    experts' rows are not sorted apart, so their hidden units are one space for all experts
    (one map moves every expert's slice alike, exact), and the residual stream stays free.
    A permuted twin comes back exactly (permutation and CCA)."""
    torch.manual_seed(0)
    model, inputs = FAMILIES[name]()
    model.config._experts_implementation = "batched_mm"
    model, x = Logits(model).eval(), inputs(2)
    spec = accord.trace(model, x)
    experts = "model.model.layers.0.mlp.experts"
    hidden = _with(spec, f"{experts}.gate_up_proj", 2 if name == "gpt-oss" else 1)
    assert hidden.free and all(r.at is None for r in hidden.refs)
    assert AxisRef(f"{experts}.down_proj", 1 if name == "gpt-oss" else 2) in hidden.readers
    assert _with(spec, "model.model.embed_tokens.weight", 1).free
    accord.check_spec(spec, model, x)
    twin = accord.randomly_permuted(model, spec, seed=3).eval()
    data = [(inputs(16),)]
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x), rtol=1e-5, atol=1e-5)
        expected = model(data[0][0])
    for method in ("permutation", "cca"):
        result = accord.merge([model, twin], data, method=method, repair="none", progress=False)
        with torch.no_grad():
            got = result.model.eval()(data[0][0])
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_expert_biases_and_interleaved_units_move_with_their_expert(traced: Any) -> None:
    """GPT-OSS packs each expert's gate and up units in turn (unit c owns entries 2c and
    2c + 1: a block of 2) and adds each token's expert bias, picked by the sorted expert ids
    whose counts make the grouped product's offsets: each expert's units are a space of their
    own moving its slice of both weights and of both biases (the down bias with the stream).
    The samples are checked against the experts computed by hand."""
    model, _, spec = traced("gpt-oss")
    experts = "model.model.layers.0.mlp.experts"
    for expert in range(4):
        hidden = spec[f"{experts}.gate_up_proj[{expert}]"]
        assert hidden.free and hidden.size == 16 and hidden.maps == "permutation"
        assert hidden.writers == (
            AxisRef(f"{experts}.gate_up_proj", 2, 2, at=(0, expert)),
            AxisRef(f"{experts}.gate_up_proj_bias", 1, 2, at=(0, expert)),
        )
        assert hidden.readers == (AxisRef(f"{experts}.down_proj", 1, at=(0, expert)),)
    stream = _with(spec, "model.model.embed_tokens.weight", 1)
    assert stream.free and AxisRef(f"{experts}.down_proj_bias", 1) in stream.writers
    _assert_expert_statistics(
        "gpt-oss", model, spec, _gpt_oss_hidden, f"{experts}.gate_up_proj[{{}}]"
    )


def _gpt_oss_hidden(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(tokens, experts, hidden units) of GPT-OSS's only MLP: ``sigmoid(α · min(gate,
    limit))`` of each expert (where the spec observes its units) for the tokens its router
    sends there, zero elsewhere."""
    mlp = model.model.model.layers[0].mlp
    h = _rows_into(mlp, model, x)
    with torch.no_grad():
        _, _, chosen = mlp.router(h)
        moe, experts = mlp.experts, []
        for expert in range(moe.gate_up_proj.shape[0]):
            gate = (h @ moe.gate_up_proj[expert] + moe.gate_up_proj_bias[expert])[:, ::2]
            unit = torch.sigmoid(gate.clamp(max=moe.limit) * moe.alpha)
            experts.append(unit * (chosen == expert).any(-1, keepdim=True))
    return torch.stack(experts, dim=1)


def _llama4_hidden(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(tokens, experts, hidden units) of Llama 4's only MoE layer: ``silu(gate)`` of each
    expert on every token scaled by its routing weight (zero where not chosen)."""
    moe = model.model.model.layers[0].feed_forward
    h = _rows_into(moe, model, x)
    with torch.no_grad():
        logits = moe.router(h)[1]
        top = logits.topk(moe.top_k, dim=-1)
        scores = torch.full_like(logits, float("-inf")).scatter(1, top.indices, top.values)
        scores = scores.sigmoid()
        width = moe.experts.down_proj.shape[1]
        experts = []
        for expert in range(moe.experts.gate_up_proj.shape[0]):
            routed = h * scores[:, expert : expert + 1]
            gate = (routed @ moe.experts.gate_up_proj[expert])[:, :width]
            experts.append(torch.nn.functional.silu(gate))
    return torch.stack(experts, dim=1)


def _expert_hidden(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(tokens, experts, hidden units) of Mixtral's only layer: ``silu(gate)`` of each expert
    (the activation, where the spec observes its hidden units) for the tokens its router sends
    there, zero elsewhere."""
    moe = model.model.model.layers[0].mlp
    h = _rows_into(moe, model, x)
    with torch.no_grad():
        _, _, chosen = moe.gate(h)
        experts = []
        for expert in range(moe.experts.gate_up_proj.shape[0]):
            gate = (h @ moe.experts.gate_up_proj[expert].T).chunk(2, dim=-1)[0]
            sent = (chosen == expert).any(-1, keepdim=True)
            experts.append(torch.nn.functional.silu(gate) * sent)
    return torch.stack(experts, dim=1)


def test_bit_standardized_convolutions_allow_permutations(traced: Any) -> None:
    _, _, spec = traced("bit")
    stages = "model.bit.encoder.stages"
    stream = _with(spec, f"{stages}.1.layers.0.downsample.conv.weight", 0)
    _free(spec, f"{stages}.1.layers.0.downsample.conv.weight", 0, maps="permutation")
    _has(stream, "writers", (f"{stages}.1.layers.0.conv3.weight", 0))
    _has(stream, "readers", ("model.classifier.1.weight", 1))
    _has(stream, "elementwise", ("model.bit.norm.weight", 0))
    # the standardization (per output channel, over inputs and taps) commutes with
    # permutations of both, but with no other map: every space is permutations only
    for conv in ("conv1", "conv2"):
        _free(spec, f"{stages}.0.layers.0.{conv}.weight", 0, maps="permutation")
    _free(spec, "model.bit.embedder.convolution.weight", 0, maps="permutation")
    assert all(space.maps == "permutation" for space in spec.free_spaces)


def test_phi3_fused_projections(traced: Any) -> None:
    _, _, spec = traced("phi3")
    layer = "model.model.layers.0"
    # gate and up fused in one Linear, chunked along the features: one permutable space
    gate_up = _with(spec, f"{layer}.mlp.gate_up_proj.weight", 0, 0)
    _free(spec, f"{layer}.mlp.gate_up_proj.weight", 0, 0, maps="permutation")
    assert (
        gate_up.size == 48
        and AxisRef(f"{layer}.mlp.gate_up_proj.weight", 0, 1, 48) in gate_up.writers
    )
    # q, k and v fused and sliced, partial rotary embeddings (a slice of every head): one
    # permutation space of the 2 key/value groups, q rows from 0, k from 32, v from 48
    qkv = f"{layer}.self_attn.qkv_proj.weight"
    heads = _with(spec, qkv, 0, 0)
    _free(spec, qkv, 0, 0, maps="permutation")
    assert heads.size == 2 and set(heads.writers) == {
        AxisRef(qkv, 0, 16, 0),
        AxisRef(qkv, 0, 8, 32),
        AxisRef(qkv, 0, 8, 48),
    }


def test_falcon_matmul_linears_and_multi_query_heads(traced: Any) -> None:
    _, _, spec = traced("falcon")
    layer = "model.transformer.h.0"
    qkv = f"{layer}.self_attention.query_key_value"
    stream = _with(spec, "model.transformer.word_embeddings.weight", 1)
    _free(spec, "model.transformer.word_embeddings.weight", 1, maps="permutation")
    # FalconLinear's ``x @ W.T + b``: rows and bias write, columns read, as a Linear's
    _has(stream, "readers", (f"{qkv}.weight", 1), (f"{layer}.mlp.dense_h_to_4h.weight", 1))
    _has(
        stream,
        "writers",
        (f"{layer}.self_attention.dense.weight", 0),
        (f"{layer}.self_attention.dense.bias", 0),
        (f"{layer}.mlp.dense_4h_to_h.weight", 0),
    )
    mlp = _with(spec, f"{layer}.mlp.dense_h_to_4h.weight", 0)
    _free(spec, f"{layer}.mlp.dense_h_to_4h.weight", 0, maps="dense")
    _has(mlp, "writers", (f"{layer}.mlp.dense_h_to_4h.bias", 0))
    _has(mlp, "readers", (f"{layer}.mlp.dense_4h_to_h.weight", 1))
    # split([4, 1, 1]) by heads: 4 query heads, the one key head and the one value head
    # (its features read by the output columns of every query head); RoPE fixes q and k
    value = _with(spec, f"{qkv}.weight", 0, 40)
    _free(spec, f"{qkv}.weight", 0, 40)
    assert value.size == 8 and AxisRef(f"{qkv}.bias", 0, 1, 40) in value.writers
    offsets = sorted(r.offset for r in value.readers if r.tensor.endswith("dense.weight"))
    assert offsets == [0, 8, 16, 24]
    for offset, size in ((0, 32), (32, 8)):
        space = _with(spec, f"{qkv}.weight", 0, offset)
        assert space.size == size and not space.free and "rotary" in space.reason


@pytest.mark.parametrize(
    ("name", "groups", "run", "heads_per_group"),
    [("falcon-grouped", 2, 32, 2), ("falcon-heads", 4, 24, 1)],
)
def test_falcon_interleaved_heads_move_whole(
    name: str, groups: int, run: int, heads_per_group: int, traced: Any
) -> None:
    """The fused projection laid out per key/value group (its query heads, its key, its
    value: 32 rows) or per head (q, k, v: 24 rows), under rotary embeddings: one space of
    permutations of the groups, each its run of rows and the output columns of its query
    heads."""
    _, _, spec = traced(name)
    attn = "model.transformer.h.0.self_attention"
    heads = _with(spec, f"{attn}.query_key_value.weight", 0)
    _free(spec, f"{attn}.query_key_value.weight", 0, maps="permutation")
    assert heads.size == groups and heads.observed_block == 8 * heads_per_group
    assert set(heads.writers) == {
        AxisRef(f"{attn}.query_key_value.{p}", 0, run) for p in ("weight", "bias")
    }
    assert heads.readers == (AxisRef(f"{attn}.dense.weight", 1, 8 * heads_per_group),)


@pytest.mark.parametrize(
    ("name", "attn", "qkv", "out"),
    [
        ("gpt-neox", "model.gpt_neox.layers.0.attention", "query_key_value", "dense"),
        ("codegen", "model.transformer.h.0.attn", "qkv_proj", "out_proj"),
        ("persimmon", "model.model.layers.0.self_attn", "query_key_value", "dense"),
    ],
)
def test_heads_cut_into_q_k_v_move_whole(
    name: str, attn: str, qkv: str, out: str, traced: Any
) -> None:
    """The fused projection viewed as (…, H, 3·D) and each head cut into q, k and v (GPT-NeoX's
    chunk, CodeGen's split of its mp_num blocks, here one head each), or as (…, H, 3, D) and
    selected (Persimmon, with q and k norms over each head), under partial rotary embeddings:
    one space of permutations of the 4 heads, each its run of 24 rows and its 8 output
    columns; every space but the output's free."""
    _, _, spec = traced(name)
    heads = _with(spec, f"{attn}.{qkv}.weight", 0)
    _free(spec, f"{attn}.{qkv}.weight", 0, maps="permutation")
    assert heads.size == 4 and heads.observed_block == 8
    assert AxisRef(f"{attn}.{qkv}.weight", 0, 24) in heads.writers
    assert heads.readers == (AxisRef(f"{attn}.{out}.weight", 1, 8),)
    assert len(spec.free_spaces) == len(list(spec)) - 1


def test_deberta_per_head_biases_move_with_their_heads(traced: Any) -> None:
    """DeBERTa cuts its fused projection per head into q, k and v, then adds q_bias and
    v_bias viewed as (H, D): each head's run of a bias is a writer of that head's q·k or v
    space, so every space but the output's is free."""
    _, _, spec = traced("deberta")
    attn = "model.deberta.encoder.layer.0.attention"
    qkv, out = f"{attn}.self.in_proj.weight", f"{attn}.output.dense.weight"
    for head in range(4):
        qk, v = _with(spec, qkv, 0, 24 * head), _with(spec, qkv, 0, 24 * head + 16)
        assert qk.free and qk.maps == "orthogonal" and qk.size == 8
        assert AxisRef(f"{attn}.self.q_bias", 0, 1, 8 * head) in qk.writers
        assert AxisRef(qkv, 0, 1, 24 * head + 8) in qk.readers  # the head's keys
        assert v.free and AxisRef(f"{attn}.self.v_bias", 0, 1, 8 * head) in v.writers
        assert v.readers == (AxisRef(out, 1, 1, 8 * head),)
    assert len(spec.free_spaces) == len(list(spec)) - 1


def test_codegen_moves_its_mp_blocks_whole() -> None:
    """CodeGen lays its fused projection out in mp_num = 4 blocks, each the queries, values and
    keys of H/4 heads: with 8 heads the blocks (24 rows, two heads' 8 output columns) move."""
    torch.manual_seed(0)
    config = transformers.CodeGenConfig(
        vocab_size=64, n_embd=32, n_layer=1, n_head=8, rotary_dim=2, n_positions=20
    )
    model = Logits(transformers.CodeGenForCausalLM(config)).eval()
    x = torch.randint(2, 64, (2, 7))
    spec = accord.trace(model, x)
    attn = "model.transformer.h.0.attn"
    blocks = _with(spec, f"{attn}.qkv_proj.weight", 0)
    assert blocks.free and blocks.size == 4 and blocks.maps == "permutation"
    assert blocks.writers == (AxisRef(f"{attn}.qkv_proj.weight", 0, 24),)
    assert blocks.readers == (AxisRef(f"{attn}.out_proj.weight", 1, 8),)
    accord.check_spec(spec, model, x)
    twin = accord.randomly_permuted(model, spec, seed=3).eval()
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["bloom", "falcon-alibi-heads"])
def test_alibi_keeps_heads_in_place_and_frees_each_head(name: str, traced: Any) -> None:
    """ALiBi adds a slope of each head's own to its scores, so heads may not move; within a
    head q·k and v are as free as anywhere. q, k and v of a head lie in a row of the fused
    projection (Bloom's ``view(B, L, H, 3, D)`` and select, Falcon's ``unflatten`` and
    ``unbind``): per head one qk space (its q rows write, its k rows read) and one value
    space read by its 8 output columns."""
    _, _, spec = traced(name)
    attn = "model.transformer.h.0.self_attention"
    qkv = f"{attn}.query_key_value.weight"
    for head in range(4):
        start = 24 * head
        qk = _with(spec, qkv, 0, start)
        _free(spec, qkv, 0, start, maps="orthogonal")
        assert qk.size == 8 and AxisRef(qkv, 0, 1, start + 8) in qk.readers
        value = _with(spec, qkv, 0, start + 16)
        _free(spec, qkv, 0, start + 16, maps="linear")
        assert value.size == 8
        assert value.readers == (AxisRef(f"{attn}.dense.weight", 1, 1, 8 * head),)
    assert len(spec.free_spaces) == len(list(spec)) - 1  # all but the output


def test_alibi_keeps_whole_groups_in_place() -> None:
    """Falcon's grouped layout (per key/value group its query heads, key and value) slices
    the query heads off each group, so only whole groups could move, and ALiBi's slopes
    differ per head: the groups stay fixed, with that reason."""
    torch.manual_seed(0)
    model, tokens = _falcon(alibi=True, new_decoder_architecture=True, num_kv_heads=2)
    wrapped, x = Logits(model).eval(), tokens(2)
    spec = accord.trace(wrapped, x)
    groups = _with(spec, "model.transformer.h.0.self_attention.query_key_value.weight", 0)
    assert not groups.free and "differs per head" in groups.reason
    accord.check_spec(spec, wrapped, x)


@pytest.mark.parametrize("name", ["falcon-alibi", "falcon-alibi-eager"])
def test_falcon_multi_query_heads_share_one_key(name: str, traced: Any) -> None:
    """Without rotary embeddings the four query heads of multi-query attention read one key
    head: one qk space of that head's 8 features, whose map acts on every query head alike
    (rows 0, 8, 16, 24) and on the key (row 32); the one value head is read by the output
    columns of every query head."""
    qkv = "model.transformer.h.0.self_attention.query_key_value"
    _, _, spec = traced(name)
    qk = _with(spec, f"{qkv}.weight", 0)
    _free(spec, f"{qkv}.weight", 0, maps="orthogonal")
    assert qk.size == 8 and set(qk.writers) == {
        AxisRef(f"{qkv}.{p}", 0, 1, offset) for p in ("weight", "bias") for offset in (0, 8, 16, 24)
    }
    assert set(qk.readers) == {AxisRef(f"{qkv}.{p}", 0, 1, 32) for p in ("weight", "bias")}
    _free(spec, f"{qkv}.weight", 0, 40, maps="linear")


def test_gemma_gain_of_one_plus_w_moves_with_the_stream(traced: Any) -> None:
    _, _, spec = traced("gemma")
    stream = _with(spec, "model.model.embed_tokens.weight", 1)
    _free(spec, "model.model.embed_tokens.weight", 1, maps="permutation")
    _has(stream, "elementwise", ("model.model.layers.0.input_layernorm.weight", 0))


def test_gpt_bigcode_multi_query_shares_its_key_and_value_head(traced: Any) -> None:
    _, _, spec = traced("gpt-bigcode")
    c_attn = "model.transformer.h.0.attn.c_attn"
    # one key head for the 4 query heads: q·k is one space of the 8 head features, written
    # by every query head's rows (from 0, 8, 16, 24), read by the key's rows (from 32)
    qk = _with(spec, f"{c_attn}.weight", 0, 0)
    _free(spec, f"{c_attn}.weight", 0, 0, maps="orthogonal")
    assert qk.size == 8 and {r.offset for r in qk.writers} == {0, 8, 16, 24}
    assert AxisRef(f"{c_attn}.weight", 0, 1, 32) in qk.readers
    assert {o.offset for o in qk.observe} == {0, 8, 16, 24}  # head by head
    # the value head (from 40), read by the output columns of every query head
    value = _with(spec, f"{c_attn}.weight", 0, 40)
    _free(spec, f"{c_attn}.weight", 0, 40, maps="linear")
    offsets = sorted(r.offset for r in value.readers if r.tensor.endswith("c_proj.weight"))
    assert value.size == 8 and offsets == [0, 8, 16, 24]


def test_hiera_qkv_cut_on_an_axis_of_its_own(traced: Any) -> None:
    _, _, spec = traced("hiera")
    stages = "model.hiera.encoder.stages"
    # qkv.reshape(B, N, W, 3, H, D): q, k and v each one space; q·k per head, v per head
    qkv = f"{stages}.0.layers.0.attn.qkv.weight"
    qk = _with(spec, qkv, 0, 0)
    _free(spec, qkv, 0, 0, maps="orthogonal")
    assert AxisRef(qkv, 0, 1, 8) in qk.readers
    _free(spec, qkv, 0, 16, maps="linear")
    # later stages max-pool the query's positions per head: permutations only there
    _free(spec, f"{stages}.1.layers.0.attn.qkv.weight", 0, 0, maps="permutation")
    assert len(spec.free_spaces) == len(list(spec)) - 2  # all but the input and the output


def test_siglip_probe_writes_the_features_it_is_compared_with(traced: Any) -> None:
    _, _, spec = traced("siglip")
    vision = "model.vision_model"
    stream = _with(spec, f"{vision}.embeddings.patch_embedding.weight", 0)
    _free(spec, f"{vision}.embeddings.patch_embedding.weight", 0, maps="permutation")
    # the learned query of the pooling head's nn.MultiheadAttention moves with the stream
    _has(stream, "writers", (f"{vision}.head.probe", 2))
    _has(stream, "readers", (f"{vision}.head.attention.in_proj_weight", 1))
    # inside nn.MultiheadAttention nothing is observed (weight matching aligns those spaces)
    assert _with(spec, f"{vision}.head.attention.in_proj_weight", 0, 0).free


def test_bart_classifier_reads_the_end_of_sequence_features(traced: Any) -> None:
    _, _, spec = traced("bart")
    # x[eos_mask] keeps the features: the shared stream of encoder and decoder stays free
    stream = _with(spec, "model.model.shared.weight", 1)
    _free(spec, "model.model.shared.weight", 1, maps="permutation")
    _has(stream, "readers", ("model.classification_head.dense.weight", 1))
    assert len(spec.free_spaces) == len(list(spec)) - 1  # all but the output


def test_xglm_heads_merged_into_the_batch(traced: Any) -> None:
    _, _, spec = traced("xglm")
    layer = "model.model.layers.0"
    # bmm on (B·H, L, D): q·k and v per head stay free
    _free(spec, f"{layer}.self_attn.q_proj.weight", 0, maps="orthogonal")
    _free(spec, f"{layer}.self_attn.v_proj.weight", 0, maps="linear")
    # sinusoidal positions, a buffer outside the state dict, are added to the stream
    assert not _with(spec, "model.model.embed_tokens.weight", 1).free


def test_tied_output_layer_joins_the_space_it_reads_to_the_stream(traced: Any) -> None:
    # the embedding writes the stream, the tied decoder reads the masked-LM head's dense
    # space: one map must move both (before, both were fixed: "claimed twice")
    _, _, spec = traced("camembert-mlm")
    emb = "model.roberta.embeddings"
    stream = _with(spec, f"{emb}.word_embeddings.weight", 1)
    assert stream is _with(spec, "model.lm_head.dense.weight", 0)
    _free(spec, f"{emb}.word_embeddings.weight", 1, maps="permutation")
    _has(
        stream,
        "writers",
        (f"{emb}.position_embeddings.weight", 1),
        ("model.lm_head.decoder.weight", 1),
    )
    _has(stream, "elementwise", ("model.lm_head.layer_norm.weight", 0))
    # observed along the stream as well as at the head's activation
    nodes = [point.node for point in stream.observe]
    assert any("encoder_layer" in node for node in nodes) and "model_lm_head_gelu" in nodes


@pytest.mark.parametrize("name", ["t5", "umt5"])
def test_relative_position_bias_keeps_each_heads_maps(name: str, traced: Any) -> None:
    # the bias (batch, heads, queries, keys) is added per head: heads stay in place, each
    # head's q·k and values still map
    _, _, spec = traced(name)
    for stack in ("encoder", "decoder"):
        attention = f"model.transformer.{stack}.block.0.layer.0.SelfAttention"
        _free(spec, f"{attention}.q.weight", 0, maps="orthogonal")
        assert _with(spec, f"{attention}.q.weight", 0).groups == 4
        _has(_with(spec, f"{attention}.q.weight", 0), "readers", (f"{attention}.k.weight", 0))
        _free(spec, f"{attention}.v.weight", 0, maps="linear")
        bias = _with(spec, f"{attention}.relative_attention_bias.weight", 1)
        assert not bias.free and "adds a bias of each head's own" in bias.reason


def test_spec_of_an_exported_model_round_trips(traced: Any, tmp_path: Any) -> None:
    model, _, spec = traced("llama")
    spec.save(tmp_path / "spec.json")
    loaded = Spec.load(tmp_path / "spec.json", model)
    assert loaded == spec and loaded.graph == "export"
    # the heads are observed in blocks (offsets: test_trace_rope's round trip)
    assert any(o.block > 1 for s in loaded for o in s.observe)


def test_model_neither_tracer_handles_gets_both_reasons() -> None:
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.fc(x).sum() > 0:  # a branch on a value: neither torch.fx nor export
                return self.fc(x)
            return -self.fc(x)

    with pytest.raises(TraceError, match=r"torch\.export could not export DataDependent") as info:
        accord.trace(DataDependent(), torch.randn(2, 4))
    message = str(info.value)
    assert "torch.fx could not trace" in message and "accord.Spec.load" in message


def test_operator_without_a_rule_fixes_only_its_spaces() -> None:
    class Sorted(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 5), nn.Linear(5, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.a(x))
            if h.shape[0] > 1:  # shape-dependent Python: torch.fx stops here
                h = self.b(h)
            return self.c(torch.sort(h, dim=-1).values)

    model, x = Sorted().eval(), torch.randn(2, 4)
    spec = accord.trace(model, x)
    assert spec.graph == "export" and spec["a"].free
    assert not spec["b"].free and "aten.sort" in spec["b"].reason
    accord.check_spec(spec, model, x)


def test_yolos_resized_position_embeddings_write_the_stream(traced: Any) -> None:
    _, _, spec = traced("yolos")
    emb = "model.vit.embeddings"
    stream = _with(spec, f"{emb}.patch_embeddings.projection.weight", 0)
    _free(spec, f"{emb}.patch_embeddings.projection.weight", 0, maps="permutation")
    # the position embeddings' patch rows bicubically resized to the image's grid, put back
    # between the class token's row and the detection tokens' rows
    _has(
        stream,
        "writers",
        (f"{emb}.position_embeddings", 2),
        (f"{emb}.cls_token", 2),
        (f"{emb}.detection_tokens", 2),
    )


def test_dpt_transposed_convolutions_upsample_free_spaces(traced: Any) -> None:
    _, _, spec = traced("dpt")
    layer = "model.model.neck.reassemble_stage.layers.0"
    resize = _with(spec, f"{layer}.resize.weight", 1)
    _free(spec, f"{layer}.resize.weight", 1, maps="linear")
    _has(resize, "writers", (f"{layer}.resize.bias", 0))
    _has(_with(spec, f"{layer}.projection.weight", 0), "readers", (f"{layer}.resize.weight", 0))
    _free(spec, "model.model.dpt.embeddings.patch_embeddings.projection.weight", 0)
    assert len(spec.free_spaces) == len(list(spec)) - 2  # all but the input and the output


@pytest.mark.parametrize(
    ("name", "query_reason", "key_reason"),
    [
        # V2 rotates through complex numbers (each head's pairs viewed as complex numbers
        # across the heads), V3 through interleaved slices (the key's rotary part, never
        # split into heads, is read as pairs, x[..., ::2] and x[..., 1::2], which the
        # rotation's cos and sin then multiply each by its own frequency)
        ("deepseek-v2", "mixes heads", "aten.view_as_complex"),
        ("deepseek-v3", "slicing", "with a tensor accord cannot map"),
    ],
)
def test_latent_attention_maps_each_head_without_positions(
    name: str, query_reason: str, key_reason: str, traced: Any
) -> None:
    """DeepSeek's multi-head latent attention: the q latent and the kv latent (each
    RMS-normed) permute. Each query head is its part without positions (q_b_proj rows) beside
    a rotated part; each key head its part without positions (kv_b_proj rows, cut from its
    value by split_with_sizes within the heads) beside a rotated part shared by every head,
    the two written into an empty tensor in place (``new_empty``, ``copy_``: a concatenation).
    The rotated parts stay in place, and so do the heads; each head's parts without
    positions are one q·k space (orthogonal maps: q rows write it, k rows read it), and each
    value head maps with its output columns (any invertible map)."""
    _, _, spec = traced(name)
    attn = "model.model.layers.0.self_attn"
    _free(spec, f"{attn}.q_a_proj.weight", 0, maps="permutation")
    _free(spec, f"{attn}.kv_a_proj_with_mqa.weight", 0, maps="permutation")
    for head in range(4):
        qk = _with(spec, f"{attn}.q_b_proj.weight", 0, 8 * head)
        _free(spec, f"{attn}.q_b_proj.weight", 0, 8 * head, maps="orthogonal")
        assert qk.size == 4
        assert qk.readers == (AxisRef(f"{attn}.kv_b_proj.weight", 0, 1, 12 * head),)
        rotated = _with(spec, f"{attn}.q_b_proj.weight", 0, 8 * head + 4)
        assert not rotated.free and query_reason in rotated.reason
        value = _with(spec, f"{attn}.kv_b_proj.weight", 0, 12 * head + 4)
        _free(spec, f"{attn}.kv_b_proj.weight", 0, 12 * head + 4, maps="linear")
        assert value.size == 8
        assert value.readers == (AxisRef(f"{attn}.o_proj.weight", 1, 1, 8 * head),)
    rotary_key = _with(spec, f"{attn}.kv_a_proj_with_mqa.weight", 0, 16)
    assert not rotary_key.free and key_reason in rotary_key.reason
    _free(spec, "model.model.embed_tokens.weight", 1, maps="permutation")


def test_state_space_mixers_stay_fixed_with_their_reasons(traced: Any) -> None:
    """Mamba's channels are a permutation symmetry (in_proj rows, the depthwise conv, A_log,
    D, dt_proj, out_proj columns move together), but the reference scan multiplies them with
    the state on other axes and writes them into its cache in place: no rule proves it, so
    only the residual stream is free."""
    _, _, spec = traced("mamba")
    _free(spec, "model.backbone.embeddings.weight", 1, maps="permutation")
    mixer = _with(spec, "model.backbone.layers.0.mixer.in_proj.weight", 0)
    assert not mixer.free and "aten.copy_" in mixer.reason
    assert [s.name for s in spec.free_spaces] == ["stream:model.backbone.embeddings"]


def test_audio_front_ends(traced: Any) -> None:
    """wav2vec 2.0's feature encoder: 1-d convolutions, the first group-normed (one group per
    channel: permutations), free; the stream is read by the grouped positional convolution,
    whose weight is weight-normed (wav2vec 2.0) or plain (Data2Vec-Audio): a grouped
    convolution reading the stream keeps it fixed, with the reason."""
    _, _, spec = traced("wav2vec2")
    convs = "model.wav2vec2.feature_extractor.conv_layers"
    _free(spec, f"{convs}.0.conv.weight", 0, maps="permutation")
    _free(spec, f"{convs}.1.conv.weight", 0, maps="permutation")
    stream = _with(spec, "model.wav2vec2.feature_projection.projection.weight", 0)
    assert not stream.free and "aten.conv1d" in stream.reason
    _free(spec, "model.wav2vec2.encoder.layers.0.attention.q_proj.weight", 0, maps="orthogonal")
    _, _, spec = traced("data2vec-audio")
    stream = _with(spec, "model.data2vec_audio.feature_projection.projection.weight", 0)
    assert not stream.free and "reads its input by group" in stream.reason


def test_fourier_mixing_fixes_the_features_it_mixes(traced: Any) -> None:
    """FNet's FFT runs along the features as well as the positions: no permutation of the
    features commutes with it."""
    _, _, spec = traced("fnet")
    stream = _with(spec, "model.fnet.embeddings.projection.weight", 0)
    assert not stream.free and "aten.fft_fftn" in stream.reason
    _free(spec, "model.fnet.encoder.layer.0.intermediate.dense.weight", 0)


class _TokensFromImages(nn.Module):
    """JetMoE fed from images (its token ids read off the first pixels), for the image-only
    analysis tools."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.flatten(1)[:, :7].abs().mul(20).long().clamp(2, 63)
        return self.model(tokens).logits


@pytest.mark.parametrize("name", ["mixtral", "jetmoe"])
def test_precision_bench_takes_the_samples_statistics_take(name: str, traced: Any) -> None:
    """An expert's space is observed on the tokens routed to it (``Observation.rows``: end
    offsets for Mixtral, the pieces of a split for JetMoE), summed back into every token:
    the precision bench's reference covariance is computed on the very samples
    collect_statistics takes."""
    from accord.bench.precision import _passes, covariances

    model, _, spec = traced(name)
    batches = [(FAMILIES[name]()[1](8), None)]
    stats = accord.collect_statistics([model], batches, spec, progress=False, precision="float64")
    reference, _ = covariances(_passes(model, spec, batches, False))
    experts = [s.name for s in spec.free_spaces if any(p.rows for p in s.observe)]
    assert len(experts) == 4
    for space in experts:
        assert stats.spaces[space].count == batches[0][0].numel()
        torch.testing.assert_close(reference[space], stats.spaces[space].covariance(0, 0))


def test_analysis_tools_leave_out_or_refuse_expert_rows(traced: Any) -> None:
    """The tools that need one row per input leave out the nodes observed on one expert's
    tokens (layer similarity, with a warning) or refuse such a space by name (unit
    visualisation, the CKA attack)."""
    from accord.analysis.cka_attack import cka_attack
    from accord.analysis.similarity import layer_features
    from accord.analysis.visualize import _spaces
    from accord.data import Dataset

    model, _, spec = traced("jetmoe")
    experts = [s.name for s in spec.free_spaces if any(p.rows for p in s.observe)]
    with pytest.warns(UserWarning, match="routed to one expert"):
        features = layer_features(model, [(FAMILIES["jetmoe"]()[1](8),)], progress=False)
    expert_nodes = {p.node for s in spec.spaces for p in s.observe if p.rows}
    assert expert_nodes and not expert_nodes & set(features) and len(features["logits"]) == 8
    transforms = {space.name: None for space in spec.spaces}
    assert experts[0] not in _spaces(spec, transforms, None)
    with pytest.raises(accord.ConfigError, match="routed to one expert"):
        _spaces(spec, transforms, [experts[0]])
    images = Dataset(torch.rand(8, 1, 4, 4), torch.zeros(8, dtype=torch.long))
    wrapped = _TokensFromImages(model.model).eval()
    with pytest.raises(ValueError, match="one expert's"):
        cka_attack(wrapped, images, experts[0], 0.5)


@pytest.mark.parametrize("name", ["perceiver", "perceiver-text"])
def test_perceiver_learned_queries_are_observed_at_their_keys(name: str, traced: Any) -> None:
    """Perceiver's latents and its decoder's output queries are parameters: the query of
    their cross-attention is the same for every input, so its q·k space (orthogonal maps,
    which move the key alike) is observed at the key, where the inputs vary; the
    self-attention's query varies and is observed there."""
    _, _, spec = traced(name)
    attentions = {
        "model.perceiver.encoder.cross_attention": "key",
        "model.perceiver.decoder.decoder.decoding_cross_attention": "key",
        "model.perceiver.encoder.self_attends.0": "query",
    }
    for attention, observed in attentions.items():
        _free(spec, f"{attention}.attention.self.query.weight", 0, maps="orthogonal")
        qk = _with(spec, f"{attention}.attention.self.query.weight", 0)
        node = attention.replace(".", "_") + f"_attention_self_{observed}"
        assert [point.node for point in qk.observe] == [node], qk.observe
