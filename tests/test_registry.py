"""register_model: target kinds, the contract check, and clear errors (no engine started)."""

import pytest
import torch
from torch import nn

from parallel_bridge import register_model
from parallel_bridge.models.attention import TrainableAttention
from parallel_bridge.serving.registry import registered, unregister

vllm = pytest.importorskip("vllm")


class Complete(nn.Module):
    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        return torch.zeros(len(input_ids), 4)

    def compute_logits(self, hidden_states):
        return hidden_states


class NoLogits(nn.Module):
    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        return torch.zeros(len(input_ids), 4)


@pytest.fixture
def name(request):
    n = f"PBTest_{request.node.name}".replace("[", "_").replace("]", "")
    yield n
    unregister(n)


def build(cls, vllm_config=None):
    from vllm.config import VllmConfig

    return cls(vllm_config=vllm_config or VllmConfig())


def test_factory_gets_vllm_config_and_default_context(name):
    seen = {}

    def factory(vllm_config, parallel_context):
        seen["tp"] = (parallel_context.tp_rank, parallel_context.tp)
        seen["config"] = vllm_config
        return Complete()

    model = build(register_model(name, factory))
    assert seen["tp"] == (0, 1)  # vLLM's parallel state is not initialized here: world of one
    assert isinstance(model.model, Complete)
    assert model.compute_logits(torch.ones(2, 4)).shape == (2, 4)
    assert name in vllm.ModelRegistry.get_supported_archs()
    assert vllm.ModelRegistry.models[name].interfaces.is_text_generation_model


def test_factory_that_raises_names_the_model(name):
    def broken(vllm_config, parallel_context):
        raise ValueError("no such layer size")

    cls = register_model(name, broken)
    with pytest.raises(
        RuntimeError,
        match=rf"model '{name}': the target .*broken raised ValueError while building "
        r"the model \(tp rank 0 of 1\): no such layer size",
    ):
        build(cls)


def test_factory_returning_a_non_module(name):
    cls = register_model(name, lambda vllm_config, ctx: {"not": "a module"})
    with pytest.raises(
        TypeError, match=rf"model '{name}': the target .*<lambda> returned dict, not a torch.nn.Module"
    ):
        build(cls)


def test_module_lacking_a_method_is_reported_with_its_signature(name):
    cls = register_model(name, lambda vllm_config, ctx: NoLogits())
    with pytest.raises(
        TypeError,
        match=r"lacks what vLLM calls: compute_logits\(hidden_states: Tensor\[num_tokens, "
        r"hidden\]\) -> Tensor\[num_tokens, vocab\]",
    ):
        build(cls)


def test_class_lacking_a_method_fails_at_registration(name):
    with pytest.raises(
        TypeError, match=rf"model '{name}': class .*NoLogits lacks what vLLM calls: compute_logits"
    ):
        register_model(name, NoLogits)


def test_annotated_factory_checked_at_registration(name):
    def factory(vllm_config, parallel_context) -> NoLogits:
        return NoLogits()

    with pytest.raises(TypeError, match="the return type of .*factory lacks what vLLM calls: compute_logits"):
        register_model(name, factory)


def test_string_target_resolves_and_checks(name):
    cls = register_model(name, "test_registry:Complete")
    assert registered(name).vllm_class is cls
    with pytest.raises(ValueError, match="must look like 'package.module:attribute'"):
        register_model(name + "x", "test_registry.Complete")
    with pytest.raises(ValueError, match="module 'test_registry' has no attribute 'Missing'"):
        register_model(name + "y", "test_registry:Missing")


def test_registering_a_name_twice(name):
    register_model(name, Complete)
    assert register_model(name, Complete) is registered(name).vllm_class  # same target: no-op
    with pytest.raises(
        ValueError,
        match=rf"model '{name}' is already registered with .*Complete; refusing to "
        r"replace it with .*NoLogits",
    ):
        register_model(name, NoLogits)


def test_load_weights_uses_each_parameters_weight_loader(name):
    calls = []

    class WithLoader(Complete):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(2))
            self.w.weight_loader = lambda p, t: (calls.append(t.sum().item()), p.data.copy_(t))

    model = build(register_model(name, lambda vc, ctx: WithLoader()))
    assert model.load_weights([("w", torch.ones(2))]) == {"model.w"}
    assert calls == [2.0] and torch.equal(model.model.w.data, torch.ones(2))


def test_unsupported_head_dim_on_cpu_lists_supported_sizes():
    from vllm.config import VllmConfig

    with pytest.raises(
        ValueError,
        match=r"head_dim=16 is not supported by vLLM's CPU attention backend; supported "
        r"head sizes are \[32, 64",
    ):
        TrainableAttention(4, 2, 16, layer_index=0, vllm_config=VllmConfig())


def test_registrations_reach_vllm_processes_only_inside_the_scope(name, monkeypatch):
    import os

    from parallel_bridge.serving.registry import MODULES_ENV, exported_to_vllm_processes

    monkeypatch.delenv(MODULES_ENV, raising=False)
    register_model(name, Complete)
    assert MODULES_ENV not in os.environ  # registering writes nothing to the environment
    with exported_to_vllm_processes() as value:
        assert os.environ[MODULES_ENV] == value and __name__ in value.split(",")
    assert MODULES_ENV not in os.environ
    monkeypatch.setenv(MODULES_ENV, "users_own_module")
    with exported_to_vllm_processes():
        assert os.environ[MODULES_ENV].split(",")[:2] == ["users_own_module", __name__]
    assert os.environ[MODULES_ENV] == "users_own_module"
