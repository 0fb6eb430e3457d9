"""benchmarks/flax_models.py runs every row, and its models are what they claim to be."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = pytest.mark.scripts  # A benchmark script: not run in the lowest environment.

@pytest.fixture(scope="module")
def flax_models(import_benchmark):
  return import_benchmark("flax_models")


def test_quick_run_records_every_variant_with_its_measurements(flax_models, capsys):
  results = flax_models.main(["--quick"])
  rows = results["flax_models"]
  cfg = flax_models.Config(**flax_models.QUICK)
  expected = {("language model", v) for v in ("flax", "jaxdrop drop-in", "jaxdrop is_causal")}
  expected |= {("ViT", v) for v in ("flax", "jaxdrop drop-in")}
  assert {(r["model"], r["variant"]) for r in rows} == expected
  assert len(rows) == len(expected) * len(cfg.lengths) * len(cfg.rates)
  for row in rows:
    for field in ("train_ms", "eval_ms", "train_compile_s", "eval_compile_s"):
      assert row[field] > 0, (row, field)
    assert row["train_temp_bytes"] > 0 and row["eval_temp_bytes"] > 0, row
  assert "| language model | 33 | 0.1 | jaxdrop is_causal |" in capsys.readouterr().out


def test_the_language_model_variants_compute_the_same_function(flax_models):
  """flax with its causal mask, the drop-in with the same mask, and is_causal without one:
  the same logits with dropout off, so the timed variants do the same work."""
  cfg = flax_models.Config(**flax_models.QUICK)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab, (2, 33)), jnp.int32)
  models = flax_models._models(cfg, rate=0.1)["language model"]
  params = models["flax"].init(jax.random.key(2), tokens, train=False)["params"]
  logits = {name: m.apply({"params": params}, tokens, train=False) for name, m in models.items()}
  for name in ("jaxdrop drop-in", "jaxdrop is_causal"):
    np.testing.assert_allclose(logits[name], logits["flax"], atol=2e-5, rtol=2e-5)
  # Causal: a later token does not change an earlier position's logits.
  changed = tokens.at[:, -1].set((tokens[:, -1] + 1) % cfg.vocab)
  later = models["jaxdrop is_causal"].apply({"params": params}, changed, train=False)
  np.testing.assert_allclose(later[:, :-1], logits["jaxdrop is_causal"][:, :-1], atol=1e-6)
  assert not np.allclose(later[:, -1], logits["jaxdrop is_causal"][:, -1])


def test_the_vit_sees_patches_plus_a_class_token(flax_models):
  cfg = flax_models.Config(**flax_models.QUICK)
  patches, labels = flax_models._batch(cfg, "ViT", 33)
  assert patches.shape == (cfg.batch, 32, cfg.patch_dim) and labels.shape == (cfg.batch,)
  model = flax_models._models(cfg, rate=0.1)["ViT"]["flax"]
  params = model.init(jax.random.key(0), patches, train=False)["params"]
  assert params["position"].shape == (33, cfg.width)
  assert model.apply({"params": params}, patches, train=False).shape == (cfg.batch, cfg.classes)
