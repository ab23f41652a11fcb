import itertools
import os
import sys

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


def test_the_host_resizes_are_the_pipelines_resize(tiny_config):
  from semflow_jax import resize
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
  label = rng.integers(0, 7, (20, 30), dtype=np.uint8)
  preprocess = pipeline.Preprocess(crop="full", image_size=(8, 12))
  out = pipeline._transform({"image": image, "label": label[..., None]},
                            np.zeros(2, np.int64), preprocess, flip=False)
  np.testing.assert_array_equal(resize.image(image, (8, 12)), out["image"].numpy())  # pyright: ignore[reportAttributeAccessIssue]
  np.testing.assert_array_equal(resize.labels(label, (8, 12)), out["label"].numpy()[..., 0])  # pyright: ignore[reportAttributeAccessIssue]
  # Bicubic with antialiasing: a downscaled image is smooth, not a subsample; labels are.
  assert not np.isin(resize.image(image, (8, 12)), image[::2, ::2]).all()
  assert set(np.unique(resize.labels(label, (8, 12)))) <= set(np.unique(label))


# -- many processes on localhost: the acceptance test of issue 18 -----------------------------------

_STREAM_WORKER = """
import json, sys
import jax
import numpy as np
from absl import logging
address, processes, index, data_dir, out = sys.argv[1:6]
if int(processes) > 1:
  jax.distributed.initialize(address, num_processes=int(processes), process_id=int(index))
logging.set_verbosity(logging.INFO)
from semflow_jax.data import pipeline
from tests.test_pipeline import CountingSource, stream_config, STREAM
config = stream_config(data_dir)
builder = pipeline.get_builder(config.data)  # several processes at once: one builds
source = CountingSource(pipeline.open_split(builder, "train"))
batch = STREAM["global_batch"] // jax.process_count()
it = pipeline.TrainIterator(builder, batch, STREAM["seed"], source=source)
batches = [next(it) for _ in range(STREAM["batches"])]
reads = list(source.read)
# Resume from a checkpointed state at an arbitrary step.
first = pipeline.TrainIterator(builder, batch, STREAM["seed"])
for _ in range(STREAM["resume_at"]):
  next(first)
state = json.loads(json.dumps(first.state()))
resumed = pipeline.TrainIterator.from_state(builder, state, batch, STREAM["seed"])
after = [next(resumed) for _ in range(3)]
np.savez(out, reads=np.asarray(reads), **{
    f"{k}_{i}": b[k] for i, b in enumerate(batches) for k in b},
    **{f"resumed_{k}_{i}": b[k] for i, b in enumerate(after) for k in b})
print("PROCESS", jax.process_index(), "OF", jax.process_count(), flush=True)
"""

# 2,000 training examples of 8x8; global batch 16: an epoch is 125 global batches.
STREAM = {"num_train": 2000, "global_batch": 16, "seed": 7, "batches": 130, "resume_at": 61}


def stream_config(data_dir):
  from configs import synthetic
  config = synthetic.get_config("tiny")
  config.data.tfds_data_dir = data_dir
  config.data.image_size = 8
  config.data.num_train, config.data.num_validation = STREAM["num_train"], 16
  return config


class CountingSource:
  """A random-access source that records every index read through it."""

  def __init__(self, source):
    self.source, self.read = source, []

  def __len__(self):
    return len(self.source)

  def __getitems__(self, indices):
    self.read.extend(indices)
    return self.source.__getitems__(indices)


def test_global_batches_reads_and_resume_on_1_2_and_4_processes(tmp_path):
  """Real processes on localhost, all started at once on one empty data dir: one of them builds
  the dataset while the others wait; every process count yields the same global batches; each
  process reads only its rows (1/P of an epoch, plus what the prefetch holds); resuming a
  checkpointed state continues exactly."""
  from tests.conftest import free_port, run_together
  data_dir = str(tmp_path / "tfds")
  commands, envs, groups = [], [], {}
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
         "JAX_PLATFORMS": "cpu"}
  for processes in (1, 2, 4):
    address = f"127.0.0.1:{free_port()}"
    for index in range(processes):
      out = str(tmp_path / f"p{processes}_{index}.npz")
      commands.append([sys.executable, "-c", _STREAM_WORKER, address, str(processes),
                       str(index), data_dir, out])
      envs.append(env)
      groups.setdefault(processes, []).append(out)
  ran = run_together(commands, envs, str(tmp_path), timeout=400)
  for proc, output in ran:
    assert proc.returncode == 0, output[-3000:]
  builders = [o for _, o in ran if "writing" in o and "shards" in o]
  waited = [o for _, o in ran if "built by another process" in o]
  assert len(builders) == 1 and len(waited) == len(ran) - 1, [o[-500:] for _, o in ran]

  n, g, epoch = STREAM["num_train"], STREAM["global_batch"], STREAM["num_train"] // 16
  results = {p: [np.load(f) for f in files] for p, files in groups.items()}
  reference = results[1][0]
  from semflow_jax.data import pipeline
  order = np.concatenate([pipeline.epoch_order(STREAM["seed"], e, n) for e in range(2)])
  for processes, per_process in results.items():
    batch = g // processes
    for b in range(STREAM["batches"]):
      for key in ("image", "label"):
        np.testing.assert_array_equal(
            np.concatenate([r[f"{key}_{b}"] for r in per_process]), reference[f"{key}_{b}"])
    for b in range(3):
      for key in ("image", "label"):
        np.testing.assert_array_equal(
            np.concatenate([r[f"resumed_{key}_{b}"] for r in per_process]),
            reference[f"{key}_{STREAM['resume_at'] + b}"])
    consumed = STREAM["batches"] * batch
    epochs0 = []
    for p, r in enumerate(per_process):
      reads = r["reads"]  # reads run on parallel threads: compare as multisets
      # Its rows of the global batches (epoch 0 in the global order, then epoch 1) ...
      rows = np.concatenate([order[b * g + p * batch:b * g + (p + 1) * batch]
                             for b in range(len(reads) // batch)])
      assert sorted(reads.tolist()) == sorted(rows.tolist())
      epoch0 = set(rows[:epoch * batch].tolist())
      assert len(epoch0) == n // processes  # 1/P of the split per epoch
      # ... and beyond the consumed batches only the bounded read-ahead: the queue's 2 batches,
      # the prefetched ones, one being batched and a record per core in the parallel map.
      ahead = (2 + pipeline.PREFETCH_BATCHES + 1) * batch + os.cpu_count()
      assert consumed <= len(reads) <= consumed + ahead, (processes, len(reads) - consumed)
      epochs0.append(epoch0)
    assert set().union(*epochs0) == set(range(n))  # together: every example of epoch 0 once
