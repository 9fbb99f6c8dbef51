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


def test_router_matches_reference_topk_router():
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeTextConfig
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeThinkerTextTopKRouter

    cfg = Qwen3OmniMoeTextConfig(hidden_size=64, num_experts=16, num_experts_per_tok=4, norm_topk_prob=True)
    ref = Qwen3OmniMoeThinkerTextTopKRouter(cfg)
    torch.nn.init.normal_(ref.weight, std=0.5)
    x = np.random.default_rng(0).standard_normal((200, 64)).astype(np.float32)
    with torch.no_grad():
        ref_logits, ref_weights, ref_idx = ref(torch.tensor(x))
    routing = route(jnp.asarray(x), jnp.asarray(ref.weight.detach().numpy().T), 4, True)
    np.testing.assert_allclose(np.asarray(routing.logits), ref_logits.numpy(), rtol=1e-5, atol=1e-5)
    assert [set(r) for r in np.asarray(routing.experts)] == [set(r) for r in ref_idx.numpy()]
    order_ours = np.argsort(np.asarray(routing.experts), axis=1)
    order_ref = np.argsort(ref_idx.numpy(), axis=1)
    np.testing.assert_allclose(
        np.take_along_axis(np.asarray(routing.weights), order_ours, 1),
        np.take_along_axis(ref_weights.numpy(), order_ref, 1), rtol=1e-6, atol=1e-7)
