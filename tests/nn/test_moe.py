"""MoE block: grouped path == dense oracle, and routing equal to the reference router (P9)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from omni_jax.nn.moe import moe_forward, moe_specs, route, shared_expert_specs
from omni_jax.nn.params import init_params


@pytest.mark.parametrize("top_k,norm,shared", [(2, True, False), (3, False, False), (2, True, True)])
@pytest.mark.parametrize("tokens", [5, 300])
def test_grouped_equals_dense(top_k, norm, shared, tokens):
    specs = moe_specs(32, 16, 6, 0.2)
    if shared:
        specs.update(shared_expert_specs(32, 24, 0.2))
    params = init_params(specs, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (1, tokens, 32))
    grouped, logits_g = moe_forward(x, params, top_k=top_k, norm_topk_prob=norm, impl="grouped",
                                    grouped_matmul_impl="tiled")
    dense, logits_d = moe_forward(x, params, top_k=top_k, norm_topk_prob=norm, impl="dense")
    np.testing.assert_allclose(np.asarray(grouped), np.asarray(dense), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(logits_g), np.asarray(logits_d))


def _sorted_by_expert(weights, experts):
    return np.take_along_axis(np.asarray(weights), np.argsort(np.asarray(experts), axis=1), 1)


def test_router_matches_reference_topk_router():
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeTextConfig
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeThinkerTextTopKRouter

    experts = 16
    cfg = Qwen3OmniMoeTextConfig(hidden_size=64, num_experts=experts, num_experts_per_tok=4, norm_topk_prob=True)
    ref = Qwen3OmniMoeThinkerTextTopKRouter(cfg)
    torch.nn.init.normal_(ref.weight, std=0.5)
    x = np.random.default_rng(0).standard_normal((200, 64)).astype(np.float32)
    with torch.no_grad():
        ref_logits, ref_weights, ref_idx = ref(torch.tensor(x))
    routing = route(jnp.asarray(x), jnp.asarray(ref.weight.detach().numpy().T), 4, True)
    logits = np.asarray(routing.logits)
    np.testing.assert_allclose(logits, ref_logits.numpy(), rtol=1e-5, atol=1e-5)
    assert [set(r) for r in np.asarray(routing.experts)] == [set(r) for r in ref_idx.numpy()]

    # The weights are a function of the logits alone, and the two products above may add in different
    # orders (XLA's and torch's blocking follow the CPU's vector width: 4.8e-6 apart on a logit scale
    # of 15 on an AVX-512 machine). So: the reference's own softmax / top-k / renormalisation applied
    # to *our* logits,
    # through an identity router (F.linear by the identity is exact), must give our weights ...
    identity = Qwen3OmniMoeThinkerTextTopKRouter(
        Qwen3OmniMoeTextConfig(hidden_size=experts, num_experts=experts, num_experts_per_tok=4, norm_topk_prob=True))
    with torch.no_grad():
        identity.weight.copy_(torch.eye(experts))
        _, same_logits_weights, same_logits_idx = identity(torch.tensor(logits))
    ours = _sorted_by_expert(routing.weights, routing.experts)
    np.testing.assert_allclose(ours, _sorted_by_expert(same_logits_weights.numpy(), same_logits_idx.numpy()),
                               rtol=1e-6, atol=1e-7)
    # ... and against the reference end to end, within what the logits' difference can move them:
    # renormalised top-k weights exp(l_i) / sum_j exp(l_j) change by a factor within exp(+-2 eps) when
    # every logit moves by at most eps.
    eps = float(np.abs(logits - ref_logits.numpy()).max())
    np.testing.assert_allclose(ours, _sorted_by_expert(ref_weights.numpy(), ref_idx.numpy()),
                               rtol=np.expm1(2 * eps) + 1e-6, atol=1e-7)
