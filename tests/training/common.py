"""Shared by the training tests: a small model and packed batches built by hand."""

import numpy as np

B, L = 8, 16
MODEL = ["model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=64", "model.vocab_size=64",
         "model.max_seq_len=16", f"data.seq_len={L}", f"data.global_batch={B}"]


def packed_batch(rng: np.random.Generator, vocab: int, keep: float) -> dict[str, np.ndarray]:
  """B rows of two documents each; the last token of the first is masked (as an EOS input is),
  and each other token is kept with probability `keep`."""
  tokens = rng.integers(0, vocab, (B, L + 1)).astype(np.int32)
  first_len = rng.integers(3, L - 3, B)
  index = np.arange(L)[None, :]
  seg = np.where(index < first_len[:, None], 1, 2).astype(np.int32)
  pos = np.where(seg == 1, index, index - first_len[:, None]).astype(np.int32)
  mask = (rng.random((B, L)) < keep).astype(np.float32)
  mask[np.arange(B), first_len - 1] = 0.0
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": seg, "positions": pos, "loss_mask": mask}
