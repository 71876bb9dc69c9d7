"""The MoE peer's forced balance (`bench/moe_torch_peer.py --router=forced`) picks what shardlab's
`model.router_force_balance` does: token t's k-th expert is (t * K + k) mod E, weighted by the
router's probability of it (renormalised when the config says so), so forced-balance rows of the two
compare the same routing."""

import numpy as np
import torch
import transformers

import configs
from bench.moe_torch_peer import force_balance, hf_config


def test_forced_router_is_the_round_robin():
  m = configs.get_config("tiny_moe").model
  model = transformers.Qwen2MoeForCausalLM(hf_config(m, "eager"))
  routers = force_balance(model)
  assert len(routers) == m.n_layers - m.moe_first_dense
  router = routers[0]
  torch.manual_seed(0)
  torch.nn.init.normal_(router.weight)
  t, k, e = 11, m.experts_top_k, m.n_experts
  with torch.no_grad():
    logits, weights, picks = router(torch.randn(t, m.d_model))
  expected = np.array([[(i * k + j) % e for j in range(k)] for i in range(t)])
  np.testing.assert_array_equal(picks.numpy(), expected)
  z = logits.double().numpy()
  probs = np.exp(z - z.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  want = np.take_along_axis(probs, expected, axis=-1)
  if m.router_topk_norm:
    want /= want.sum(-1, keepdims=True)
  np.testing.assert_allclose(weights.double().numpy(), want, rtol=1e-5)
