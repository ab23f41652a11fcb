import itertools

import numpy as np

from semflow_jax.data import pipeline


def _take(it, n):
  return list(itertools.islice(it, n))


def test_train_stream_is_reproducible_and_resumes_at_the_next_unseen_batch(tiny_config):
  builder = pipeline.get_builder(tiny_config.data)
  # 64 examples / batch 16 = 4 batches per epoch; 7 batches cross an epoch boundary.
  full = _take(pipeline.TrainIterator(builder, 16, seed=3), 7)
  again = _take(pipeline.TrainIterator(builder, 16, seed=3), 7)
  for a, b in zip(full, again):
    np.testing.assert_array_equal(a["image"], b["image"])
  resumed = _take(pipeline.TrainIterator(builder, 16, seed=3, position=5), 2)
  for a, b in zip(full[5:], resumed):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  other_seed = _take(pipeline.TrainIterator(builder, 16, seed=4), 1)
  assert not np.array_equal(full[0]["image"], other_seed[0]["image"])


def test_one_epoch_visits_every_example_once_and_epochs_are_reshuffled(tiny_config):
  builder = pipeline.get_builder(tiny_config.data)
  batches = _take(pipeline.TrainIterator(builder, 16, seed=0, flip=False), 8)
  keys = [b["label"].reshape(16, -1).tobytes() for b in batches]
  epoch0 = {bytes(r) for b in batches[:4] for r in b["label"].reshape(16, -1)}
  epoch1 = {bytes(r) for b in batches[4:] for r in b["label"].reshape(16, -1)}
  assert epoch0 == epoch1 and len(epoch0) == 64  # all 64 layouts are distinct
  assert keys[:4] != keys[4:8]


def test_flip_applies_the_same_flip_to_image_and_label(tiny_config):
  builder = pipeline.get_builder(tiny_config.data)
  plain = _take(pipeline.TrainIterator(builder, 64, seed=0, flip=False), 1)[0]
  flipped = _take(pipeline.TrainIterator(builder, 64, seed=0, flip=True), 1)[0]
  # Same order (same shuffle seed); each example is either unchanged or mirrored, consistently.
  n_flipped = 0
  for i in range(64):
    same = np.array_equal(plain["image"][i], flipped["image"][i])
    mirrored = np.array_equal(plain["image"][i][:, ::-1], flipped["image"][i])
    assert same or mirrored
    expected_label = plain["label"][i] if same else plain["label"][i][:, ::-1]
    np.testing.assert_array_equal(flipped["label"][i], expected_label)
    n_flipped += not same
  assert 10 < n_flipped < 54


def test_eval_batches_pad_with_masked_examples_and_count_each_once(tiny_config):
  builder = pipeline.get_builder(tiny_config.data)
  batches = list(pipeline.eval_batches(builder, "validation", 6))  # 16 = 6 + 6 + 4 (+2 pad)
  assert [len(b["image"]) for b in batches] == [6, 6, 6]
  assert [int(b["mask"].sum()) for b in batches] == [6, 6, 4]
  real = np.concatenate([b["label"][b["mask"] > 0] for b in batches])
  ref = pipeline.load_arrays(builder, "validation", 16)["label"]
  np.testing.assert_array_equal(real, ref)
  limited = list(pipeline.eval_batches(builder, "validation", 4, num_examples=10))
  assert sum(int(b["mask"].sum()) for b in limited) == 10
