"""The evaluation protocol end to end: native-size scoring against cityscapesscripts, the same
metrics on 1 device, 8 devices and 2 processes (uneven split), one compile per program per run
(also when compiled ahead of time), stopping on request, strict JSON with class names and
network-evaluation counts, and a metric added as one module plus its name in the config."""

import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from semflow_jax import anchors, evaluate, metrics, parallel, state as state_lib, train
from semflow_jax.data import pipeline, synthetic
from semflow_jax.programs import Programs
from semflow_jax.semflow import SemFlow
from tests import dataset_fixtures as fx
from tests.conftest import REPO

NUM_VALIDATION = 13  # eval batch 8: 8 + 5 (+3 padding); on 2 processes 4 + 3 and 4 + 2
SCALAR_KEYS = ("miou_euler_1", "miou_rk4_1", "roundtrip_miou", "diversity",
               "diversity_real", "colour_only_miou", "colour_only_miou_synth", "hf_energy_synth",
               "hf_energy_real", "diversity_down4", "diversity_real_down4")


def _strict_json(path):
  def refuse(constant):
    raise ValueError(f"{path}: {constant} is not JSON")
  with open(path) as f:
    return json.load(f, parse_constant=refuse)


def _config(tfds_dir):
  from configs import synthetic as synthetic_config
  config = synthetic_config.get_config("tiny")
  config.data.tfds_data_dir = tfds_dir
  config.data.num_validation = NUM_VALIDATION
  config.train.num_steps = 2
  config.train.eval_every = 1
  config.train.checkpoint_every = 2
  config.eval.seg_steps = (1,)
  config.eval.seg_methods = ("euler", "rk4")
  config.eval.synth_steps = 2
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tfds_dir):
  """Two training steps with an evaluation after each, on 8 devices; records the Evaluators and
  the colour-classifier fits the run makes."""
  config = _config(tfds_dir)
  workdir = str(tmp_path_factory.mktemp("evaluated"))
  evaluators, fits = [], []
  real_init, real_fit = evaluate.Evaluator.__init__, metrics.ColourClassifier.fit

  def init(self, *args, **kwargs):
    evaluators.append(self)
    real_init(self, *args, **kwargs)

  def fit(*args, **kwargs):
    fits.append(1)
    return real_fit(*args, **kwargs)

  with pytest.MonkeyPatch.context() as m:
    m.setattr(evaluate.Evaluator, "__init__", init)
    m.setattr(metrics.ColourClassifier, "fit", fit)
    result = train.train_and_evaluate(config, workdir)
  return config, workdir, result, evaluators, fits


def test_training_evaluates_with_one_evaluator_and_compiles_each_program_once(trained):
  config, workdir, result, evaluators, fits = trained
  assert len(evaluators) == 1 and len(fits) == 1  # one per run, not one per evaluation
  first = _strict_json(os.path.join(workdir, "eval", "metrics_1.json"))
  assert first["step"] == 1 and result["step"] == 2
  evaluator = evaluators[0]
  programs = evaluator.run.programs._cache
  assert set(programs) == {("segment", (("method", m), ("steps", 1))) for m in ("euler", "rk4")} | {
                              ("synthesize", (("method", "euler"), ("steps", 2))),
                              ("perturbed_anchors", ())}  # the first column of the synthesis grid
  # Two evaluations, real images and round-trip syntheses alike: one executable per program.
  own = [evaluator._example_keys, evaluator._to_uint8]
  assert [p.num_executables for p in list(programs.values()) + own] == [1] * (len(programs) + 2)


def test_metrics_json_is_strict_with_class_names_nfe_and_skip_reasons(trained):
  config, workdir, result, _, _ = trained
  written = _strict_json(os.path.join(workdir, "eval", "metrics_2.json"))
  assert written == json.loads(json.dumps(result))
  for key in SCALAR_KEYS:  # mIoU in [0, 1]; mean |differences| in [0, 2]; hf energy in [0, 4]
    top = 4 if key.startswith("hf_") else 2 if key.startswith("diversity") else 1
    assert isinstance(written[key], float) and 0 <= written[key] <= top, key
  per_class = written["per_class_iou_rk4_1"]
  assert list(per_class) == list(synthetic.CLASS_NAMES)
  assert all(v is None or 0 <= v <= 1 for v in per_class.values())
  assert written["nfe"] == {"miou_euler_1": 1, "miou_rk4_1": 4, "roundtrip_miou": 3,
                            "diversity": 2, "colour_only_miou_synth": 2, "hf_energy_synth": 2,
                            "diversity_down4": 2}
  assert written["fid"] is None and "config.eval.fid_weights" in written["skipped"]["fid"]
  assert written["lpips_diversity"] is None and "lpips_weights" in written["skipped"][
      "lpips_diversity"]
  assert written["num_examples"] == NUM_VALIDATION


def _same_metrics(a, b):
  # Confusion-matrix metrics exactly; on the real images, per-example values exactly (combined
  # bit for bit) and sums up to the fixed-point reduction. Syntheses are float32 pixels that XLA
  # may round differently for another per-device batch size (the noise itself is identical).
  for key in SCALAR_KEYS:
    if "miou" in key or key in ("diversity_real", "diversity_real_down4"):
      assert a[key] == b[key], (key, a[key], b[key])
    else:
      assert a[key] == pytest.approx(b[key], rel=1e-6), key
  for sampler in ("euler_1", "rk4_1"):
    assert a[f"per_class_iou_{sampler}"] == b[f"per_class_iou_{sampler}"]


def test_one_device_gives_the_metrics_of_eight(trained):
  config, workdir, result, _, _ = trained
  mesh = parallel.make_mesh(config, jax.devices()[:1])
  params, step = state_lib.load_params(config, workdir, mesh)
  model = SemFlow.from_config(config)
  builder = pipeline.get_builder(config.data)
  one = evaluate.Evaluator(config, model, Programs(model), builder, mesh)(params, step)
  _same_metrics(one, result)


def test_compiled_ahead_of_time_runs_those_executables_and_stops_on_request(trained, tmp_path):
  config, workdir, result, _, _ = trained
  mesh = parallel.make_mesh(config)
  params, step = state_lib.load_params(config, workdir, mesh)
  model = SemFlow.from_config(config, mesh)
  evaluator = evaluate.Evaluator(config, model, Programs(model), pipeline.get_builder(config.data),
                                 mesh)
  evaluator.compile(jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params))
  programs = list(evaluator.run.programs._cache.values()) + [evaluator._example_keys,
                                                             evaluator._to_uint8]
  assert all(len(p._executables) == 1 for p in programs)

  # Asked between batches: the first answer lets batch 1 start, the second stops the run.
  answers = iter([False, True])
  out = str(tmp_path / "run")
  assert evaluator(params, step, out, should_stop=lambda: next(answers)) is None
  assert not os.path.exists(out)  # nothing written
  again = evaluator(params, step, out)
  _same_metrics(again, result)
  assert os.path.exists(os.path.join(out, "eval", f"metrics_{step}.json"))
  # Both evaluations ran the executables compiled ahead of time: nothing compiled again.
  assert [(p.name, len(p._executables), p.jitted._cache_size()) for p in programs] == [
      (p.name, 1, 0) for p in programs]


# The docs/DESIGN.md example of a new metric ("Adding a metric"), run as written there.
def _design_example() -> str:
  with open(os.path.join(REPO, "docs", "DESIGN.md")) as f:
    text = f.read()
  section = text[text.index("## Adding a metric"):]
  return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_a_metric_is_one_module_plus_its_name_in_the_config(trained, monkeypatch):
  import types
  config, workdir, result, _, _ = trained
  module = types.ModuleType("semflow_jax.evaluators.brightness")
  exec(compile(_design_example(), "docs/DESIGN.md", "exec"), module.__dict__)
  monkeypatch.setitem(sys.modules, module.__name__, module)  # as if the file were there
  config = config.copy_and_resolve_references()
  config.eval.metrics = ("brightness", "miou")
  mesh = parallel.make_mesh(config)
  params, step = state_lib.load_params(config, workdir, mesh)
  model = SemFlow.from_config(config, mesh)
  builder = pipeline.get_builder(config.data)
  evaluator = evaluate.Evaluator(config, model, Programs(model), builder, mesh)
  out = evaluator(params, step)
  real = pipeline.load_arrays(builder, "validation", NUM_VALIDATION)
  keys_a, _ = evaluate.example_keys(evaluator.base_key, np.arange(NUM_VALIDATION, dtype=np.int32))
  synthesis = np.asarray(jax.jit(model.synthesize, static_argnums=(3,))(
      params, real["label"], keys_a, 2))
  assert out["brightness_synth"] == pytest.approx(float(synthesis.mean()), rel=1e-5)
  assert out["miou_euler_1"] == result["miou_euler_1"]
  assert "diversity" not in out  # only what config.eval.metrics names runs
  with pytest.raises(ValueError, match="no metric evaluator 'brightnes'.*miou"):
    config.eval.metrics = ("brightnes",)
    evaluate.Evaluator(config, model, Programs(model), builder, mesh)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_with_an_uneven_split_give_the_metrics_of_one(trained, tmp_path):
  config, trained_workdir, result, _, _ = trained
  # A copy of the run: --mode=eval rewrites eval/metrics_2.json, which other tests read as
  # training wrote it.
  workdir = str(tmp_path / "run")
  shutil.copytree(trained_workdir, workdir)
  os.remove(os.path.join(workdir, "eval", "metrics_2.json"))  # the evaluation must write it
  address = f"127.0.0.1:{_free_port()}"
  overrides = [f"--config.data.tfds_data_dir={config.data.tfds_data_dir}",
               f"--config.data.num_validation={NUM_VALIDATION}",
               "--config.eval.seg_steps=(1,)", "--config.eval.seg_methods=('euler', 'rk4')",
               "--config.eval.synth_steps=2"]
  logs = [open(tmp_path / f"process_{i}.log", "w+") for i in range(2)]
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # both processes do the same work
  procs = [subprocess.Popen(
      [sys.executable, "-m", "semflow_jax.main", "--config=configs/synthetic.py:tiny",
       f"--workdir={workdir}", "--mode=eval", f"--coordinator_address={address}",
       "--num_processes=2", f"--process_id={i}"] + overrides,
      cwd=REPO, env=env, stdout=logs[i], stderr=subprocess.STDOUT) for i in range(2)]
  try:
    for p in procs:
      p.wait(timeout=600)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, f in zip(procs, logs):
    f.seek(0)
    output = f.read()
    f.close()
    assert p.returncode == 0, output[-3000:]
  two = _strict_json(os.path.join(workdir, "eval", "metrics_2.json"))
  _same_metrics(two, result)


# -- the protocol at Cityscapes' native size, against the official evaluation ------------------
@pytest.fixture(scope="module")
def cityscapes_native(tmp_path_factory):
  """The Cityscapes fixture at the real 2048x1024, built with the tfds builder."""
  root = tmp_path_factory.mktemp("cityscapes_native")
  written = fx.write_cityscapes(str(root / "manual"), size=(1024, 2048))
  builder = fx.build("cityscapes_semantic", root / "manual", root / "tfds")
  return root, written, builder


def test_eval_batches_hold_whole_images_and_native_labels(cityscapes_native):
  root, written, builder = cityscapes_native
  preprocess = pipeline.Preprocess(crop="random", image_size=(16, 32))  # evaluation: no crop
  batches = list(pipeline.eval_batches(builder, "validation", 2, keys=("image", "label"),
                                       preprocess=preprocess, native_labels=True))
  assert [b["mask"].tolist() for b in batches] == [[1, 1], [1, 0]]
  assert [b["index"].tolist() for b in batches] == [[0, 1], [2, -1]]
  for batch in batches:
    assert batch["image"].shape == (2, 16, 32, 3) and batch["label"].shape == (2, 16, 32, 1)
    assert batch[pipeline.NATIVE_LABEL_KEY].shape == (2, 1024, 2048, 1)
    assert batch[pipeline.NATIVE_SIZE_KEY][batch["mask"] > 0].tolist() == [[1024, 2048]] * int(
        batch["mask"].sum())
  assert preprocess.for_eval().crop == "full"  # the whole frame, resized


def test_native_resolution_miou_equals_cityscapesscripts(cityscapes_native, tmp_path):
  """Evaluator's mIoU (model at 16x32, labels at 2048x1024) against cityscapesscripts'
  evalPixelLevelSemanticLabeling on prediction files the test writes at native size."""
  from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as cs_eval
  from cityscapesscripts.helpers import labels as cs_labels
  from configs import cityscapes
  root, written, builder = cityscapes_native
  config = cityscapes.get_config("local")
  config.data.image_size = (16, 32)
  config.eval.batch_size = 8  # 3 validation images on 8 devices: padded
  config.eval.seg_steps, config.eval.synth_steps = (1,), 1
  config.eval.metrics = ("miou",)  # what is compared here; the others' programs cost compiles
  model = SemFlow.from_config(config)
  params = jax.jit(model.init)(jax.random.PRNGKey(0))  # jitted: op by op is slow
  mesh = parallel.make_mesh(config)
  programs = Programs(model)
  result = evaluate.Evaluator(config, model, programs, builder, mesh)(params, 0)

  to_label_id = np.zeros(256, np.uint8)
  for label in cs_labels.labels:
    if 0 <= label.trainId < 255:
      to_label_id[label.trainId] = label.id
  predictions, truths = [], []
  batch = next(pipeline.eval_batches(builder, "validation", 8, keys=("image", "file_name"),
                                     preprocess=pipeline.Preprocess.from_config(config.data)))
  small = np.asarray(programs.segment(1, "euler")(params, batch["image"]))
  gt_by_name = {os.path.basename(image): label for _, image, label, _ in written["val"]}
  for labels, name, keep in zip(small, batch["file_name"], batch["mask"]):
    if not keep:
      continue
    native = np.asarray(Image.fromarray(to_label_id[labels]).resize((2048, 1024),
                                                                    Image.Resampling.NEAREST))
    path = str(tmp_path / name.decode().replace("leftImg8bit", "pred"))
    Image.fromarray(native).save(path)
    predictions.append(path)
    truths.append(gt_by_name[name.decode()])
  assert len(predictions) == 3 and len(set(np.unique(small))) > 3  # a real test case
  args = cs_eval.args
  args.evalInstLevelScore, args.JSONOutput, args.quiet = False, False, True  # pyright: ignore[reportAttributeAccessIssue]
  official = cs_eval.evaluateImgLists(predictions, truths, args)
  assert abs(result["miou_euler_1"] - official["averageScoreClasses"]) < 1e-9
  for name, iou in result["per_class_iou_euler_1"].items():
    theirs = official["classScores"][name]
    assert (iou is None) if np.isnan(theirs) else abs(iou - theirs) < 1e-9, name


# -- FID and LPIPS inside the evaluation ----------------------------------------------------------
@pytest.fixture(scope="module")
def eval_nets(tmp_path_factory):
  """Random-weight FID Inception and LPIPS, saved where config.eval.*_weights point (their
  agreement with the published networks is tests/test_eval_nets.py's concern)."""
  from semflow_jax import checkpoint
  from semflow_jax.models import inception, lpips
  root = tmp_path_factory.mktemp("eval_nets")
  rng = np.random.default_rng(0)

  def random(path, leaf):  # He-normal kernels, identity BatchNorm, small biases; no compile
    name = path[-1].key
    if name == "kernel":
      kernel = rng.normal(size=leaf.shape) * np.sqrt(2 / np.prod(leaf.shape[:-1]))
      heads = str(path[0].key).startswith("lin")  # LPIPS' linear heads are non-negative
      return (np.abs(kernel) if heads else kernel).astype(np.float32)
    fill = {"scale": 1.0, "running_var": 1.0}.get(name, 0.0)
    return np.full(leaf.shape, fill, np.float32)
  nets = {"inception": jax.tree_util.tree_map_with_path(random, inception.abstract_params()),
          "lpips": jax.tree_util.tree_map_with_path(random, lpips.abstract_params())}
  for name, params in nets.items():  # as the converter writes them (a version and its marker)
    checkpoint.save_converted(str(root / name), params, {}, {"network": name})
  return str(root)


def test_fid_and_lpips_are_those_of_the_networks_on_the_synthesised_images(eval_nets, tfds_dir,
                                                                            tmp_path,
                                                                            monkeypatch):
  from configs import synthetic as synthetic_config
  from semflow_jax import perceptual
  config = synthetic_config.get_config("tiny")
  config.data.tfds_data_dir = tfds_dir
  config.data.image_size = 32       # LPIPS' AlexNet needs 32x32 at least
  config.data.num_validation = 4    # one padded batch of 8
  config.eval.seg_steps, config.eval.synth_steps, config.eval.colour_only = (1,), 1, False
  config.eval.fid_weights = config.eval.lpips_weights = eval_nets
  model = SemFlow.from_config(config)
  params = jax.jit(model.init)(jax.random.PRNGKey(1))
  mesh = parallel.make_mesh(config)
  builder = pipeline.get_builder(config.data)
  evaluator = evaluate.Evaluator(config, model, Programs(model), builder, mesh)
  workdir = str(tmp_path / "run")
  result = evaluator(params, 0, workdir)
  assert not {"fid", "lpips_diversity", "lpips_to_real"} & set(result["skipped"])
  assert result["nfe"]["fid"] == result["nfe"]["lpips_diversity"] == 1

  # The same quantities from the networks' own host path, on the images evaluation makes.
  real = pipeline.load_arrays(builder, "validation", 4)
  keys_a, keys_b = evaluate.example_keys(evaluator.base_key, np.arange(4, dtype=np.int32))
  synth = jax.jit(model.synthesize, static_argnums=(3,))
  a_float = np.asarray(synth(params, real["label"], keys_a, 1))
  b_float = np.asarray(synth(params, real["label"], keys_b, 1))
  a, b = anchors.from_unit_range(a_float), anchors.from_unit_range(b_float)
  by_name = {m.__module__.rsplit(".", 1)[-1]: m for m in evaluator.metrics}
  extractor, distances = by_name["fid"].features, by_name["lpips"].distances

  def mean_and_covariance(x):
    return np.mean(x, 0, dtype=np.float64), np.cov(x.astype(np.float64), rowvar=False)
  reference = mean_and_covariance(extractor(real["image"]))
  expected_fid = metrics.frechet_distance(*mean_and_covariance(extractor(a)), *reference)
  assert result["fid"] == pytest.approx(expected_fid, rel=1e-4)
  assert result["lpips_diversity"] == pytest.approx(float(np.mean(distances.between(a, b))),
                                                    rel=1e-4)
  assert result["lpips_to_real"] == pytest.approx(
      float(np.mean(distances.between(a, real["image"]))), rel=1e-4)
  assert result["lpips_to_real"] > result["lpips_diversity"] > 0
  # The issue #23 figures from the same syntheses (float, before quantisation) and real images.
  assert result["hf_energy_synth"] == pytest.approx(
      float(np.mean(metrics.high_frequency_energy(a_float))), rel=1e-5)
  assert result["hf_energy_real"] == pytest.approx(float(np.mean(metrics.high_frequency_energy(
      anchors.to_unit_range(real["image"])))), rel=1e-6)
  assert result["diversity_down4"] == pytest.approx(float(np.mean(
      metrics.per_example_downsampled_difference(a_float, b_float))), rel=1e-5)

  # The reference statistics were cached; a new run's evaluator reads them instead.
  cached = os.path.join(workdir, "eval", "fid_reference.npz")
  np.testing.assert_allclose(perceptual.read_statistics(cached)[0], reference[0], rtol=1e-5)
  monkeypatch.setattr(perceptual, "statistics_of",
                      lambda *a, **k: pytest.fail("recomputed the cached reference"))
  again = evaluate.Evaluator(config, model, Programs(model), builder, mesh)(params, 0, workdir)
  assert again["fid"] == pytest.approx(result["fid"], rel=1e-6)
