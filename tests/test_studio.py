"""The studio through its HTTP API (gradio_client), against the same operations through the
Python API (`sample.Predictor` on the same checkpoint): same inputs and seed, same pixels.

One studio server for the module, on the tiny config's checkpoint (trained in a fixture). The
command line (`python -m semflow_jax.studio`) runs once, as a real process, for its safety
defaults. The page in a real browser: tests/test_studio_browser.py.
"""

import os
import subprocess
import sys
import time
import types

import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from semflow_jax import anchors, image_files
from semflow_jax.studio import app as studio_app
from semflow_jax.studio import canvas
from tests import studio_fixtures
from tests.conftest import REPO, free_port
from tests.studio_fixtures import read_png, write_png

# Gradio's queue logs through pandas, which warns about its own options.
pytestmark = pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword).*")
MAX_SIDE = 256  # the studio's --max_side here, so a too-large upload stays a small file


@pytest.fixture(scope="module")
def served(tmp_path_factory, tfds_dir):
  workdir = studio_fixtures.trained_workdir(tmp_path_factory, tfds_dir)
  config = studio_fixtures.tiny_config(tfds_dir)
  studio = studio_app.from_workdir(config, workdir, max_side=MAX_SIDE)
  files = tmp_path_factory.mktemp("studio_client")
  try:
    with studio_fixtures.serve(studio) as url:
      client = Client(url, verbose=False, analytics_enabled=False,
                      download_files=str(files / "downloads"))
      try:
        yield types.SimpleNamespace(studio=studio, predictor=studio.predictor, client=client,
                                    config=config, workdir=workdir, url=url, files=files,
                                    names=studio.names)
      finally:
        client.close()
  finally:
    studio.close()


@pytest.fixture(scope="module")
def photo(served):
  """A validation scene (the studio's first example) and its path."""
  path = served.studio.examples[1]
  return np.asarray(Image.open(path).convert("RGB")), path


def _labels(served, name="labels.png"):
  """A label map with every class, ignore pixels, at a size other than the model's."""
  labels = np.zeros((24, 24), np.uint8)
  labels[12:] = 1
  labels[2:8, 3:9] = 2
  labels[4:8, 14:22] = 3
  labels[15:20, 2:10] = 4
  labels[10:20, 12:16] = 5
  labels[14:22, 18:22] = 6
  labels[0, :4] = anchors.IGNORE_LABEL
  return labels, write_png(served.files / name, labels)


def _gallery(value):
  return [read_png(item["image"]) for item in value]


def _named(paths):
  return {os.path.basename(p): p for p in paths}


# -- every endpoint against the Python API -------------------------------------------------------
# The page's API, each endpoint checked below; a new one fails the first test until it is here.
CHECKED_ENDPOINTS = {"/load_photo", "/segment", "/labels", "/synthesize", "/resample",
                     "/load_reference", "/style", "/edit", "/blank_labels", "/load_labels",
                     "/brush"}


def test_the_api_is_the_endpoints_checked_here(served):
  api = served.client.view_api(print_info=False, return_format="dict")
  assert set(api["named_endpoints"]) == CHECKED_ENDPOINTS, sorted(api["named_endpoints"])


def test_load_photo_returns_the_decoded_photo_losslessly(served, photo, tmp_path):
  image, _ = photo
  jpeg = str(tmp_path / "photo.jpg")
  Image.fromarray(image).save(jpeg, quality=80)
  for path, expected in [(photo[1], image), (jpeg, image_files.read_image(jpeg))]:
    out = served.client.predict(handle_file(path), api_name="/load_photo")
    np.testing.assert_array_equal(read_png(out), expected)


def test_segment_matches_predictor_and_fills_the_canvas(served, photo):
  image, path = photo
  overlay, files, editor, labels_file, labels_view = served.client.predict(
      handle_file(path), 3, "heun", "sky", api_name="/segment")
  expected = served.predictor.segment(image, 3, "heun")
  files = _named(files)
  np.testing.assert_array_equal(read_png(files["labels.png"]), expected)  # class ids, mode L
  assert Image.open(files["labels.png"]).mode == "L"
  np.testing.assert_array_equal(read_png(labels_file), expected)
  np.testing.assert_array_equal(read_png(files["labels_preview.png"]),
                                canvas.render(expected, served.studio.palette))
  np.testing.assert_array_equal(read_png(labels_view),
                                canvas.render(expected, served.studio.palette))
  # The label map over the photo, one mask per class present, named by the dataset's classes.
  np.testing.assert_array_equal(read_png(overlay["image"]), image)
  present = [c for c in np.unique(expected)]
  assert [a["label"] for a in overlay["annotations"]] == [served.names[c] for c in present]
  for c, annotation in zip(present, overlay["annotations"]):
    mask = read_png(annotation["image"])
    np.testing.assert_array_equal(mask[..., 3] > 0, expected == c)
    colour = np.broadcast_to(served.studio.colours[c], ((expected == c).sum(), 3))
    np.testing.assert_array_equal(mask[expected == c][:, :3], colour)
  # The canvas now holds the segmentation in anchor colours, read back exactly.
  assert editor["brush"]["colors"] == [canvas.hex_colour(served.studio.colours[0])]  # sky
  editor = editor["value"]
  canvas_rgb = read_png(editor["background"])
  assert editor["layers"] == []
  np.testing.assert_array_equal(canvas.snap(canvas_rgb[..., :3], served.studio.palette), expected)


def test_canvas_strokes_are_snapped_to_the_nearest_anchor(served, tmp_path):
  """A stroke as a browser paints it: anti-aliased edges (partial alpha) over the label map."""
  palette = served.studio.palette
  labels = np.zeros((16, 16), np.uint8)  # sky everywhere
  background = np.concatenate([canvas.render(labels, palette), np.full((16, 16, 1), 255,
                                                                       np.uint8)], -1)
  stroke = np.zeros((16, 16, 4), np.uint8)
  stroke[..., :3] = served.studio.colours[5]        # building
  stroke[6:9, 2:14, 3] = 255                         # the stroke's core
  stroke[5, 2:14, 3] = 200                           # edges: mostly stroke ...
  stroke[9, 2:14, 3] = 100                           # ... mostly background
  ignore = np.zeros((16, 16, 4), np.uint8)
  ignore[..., :3] = canvas.ignore_colour(palette)    # the ignore brush
  ignore[12:14, 4:8, 3] = 255
  value = {"background": handle_file(write_png(tmp_path / "bg.png", background)),
           "layers": [handle_file(write_png(tmp_path / "stroke.png", stroke)),
                      handle_file(write_png(tmp_path / "ignore.png", ignore))],
           "composite": None}
  labels_file, labels_view = served.client.predict(value, api_name="/labels")
  expected = labels.copy()
  expected[5:9, 2:14] = 5
  expected[12:14, 4:8] = anchors.IGNORE_LABEL
  np.testing.assert_array_equal(read_png(labels_file), expected)
  np.testing.assert_array_equal(read_png(labels_view), canvas.render(expected, palette))
  # The same canvas as one composite image (what a browser sends) reads the same.
  composite = canvas.flatten({"background": background, "layers": [stroke, ignore]}, palette)
  value = {"background": None, "layers": [],
           "composite": handle_file(write_png(tmp_path / "composite.png",
                                              np.round(composite).astype(np.uint8)))}  # pyright: ignore[reportCallIssue]
  labels_file, _ = served.client.predict(value, api_name="/labels")
  np.testing.assert_array_equal(read_png(labels_file), expected)


def test_synthesize_matches_predictor(served):
  labels, path = _labels(served)
  gallery, files, region_editor = served.client.predict(handle_file(path), 3, 7, 2, "rk4",
                                                        api_name="/synthesize")
  expected = served.predictor.synthesize(labels, 3, 7, 2, "rk4")
  assert expected.shape == (3, 24, 24, 3)
  np.testing.assert_array_equal(np.stack(_gallery(gallery)), expected)
  files = _named(files)
  for i in range(3):
    np.testing.assert_array_equal(read_png(files[f"sample_{i}.png"]), expected[i])
  np.testing.assert_array_equal(read_png(files["labels.png"]), labels)
  # The re-sampling canvas starts from the first sample.
  np.testing.assert_array_equal(read_png(region_editor["value"]["background"])[..., :3],
                                expected[0])


def test_resample_a_painted_region_and_chosen_classes_matches_predictor(served, tmp_path):
  labels, path = _labels(served)
  plain = served.predictor.synthesize(labels, 2, 3, 2, "euler")
  painted = np.zeros((24, 24, 4), np.uint8)
  painted[1:5, 16:23] = (255, 0, 255, 255)
  region_editor = {"background": handle_file(write_png(tmp_path / "s0.png", plain[0])),
                   "layers": [handle_file(write_png(tmp_path / "paint.png", painted))],
                   "composite": None}
  gallery, files = served.client.predict(handle_file(path), region_editor, ["sun"], 2, 3, 11, 2,
                                         "euler", api_name="/resample")
  region = (painted[..., 3] > 0) | (labels == 2)
  expected = served.predictor.resample(labels, region, 2, 3, 11, 2, "euler")
  np.testing.assert_array_equal(np.stack(_gallery(gallery)), expected)
  files = _named(files)
  np.testing.assert_array_equal(read_png(files["region.png"]) > 0, region)
  assert not np.array_equal(expected, plain)  # the region did change
  # Classes alone (no painting) work too.
  empty = {"background": region_editor["background"], "layers": [], "composite": None}
  gallery, _ = served.client.predict(handle_file(path), empty, ["ground", "tree"], 2, 3, 4, 2,
                                     "euler", api_name="/resample")
  np.testing.assert_array_equal(
      np.stack(_gallery(gallery)),
      served.predictor.resample(labels, np.isin(labels, [1, 6]), 2, 3, 4, 2, "euler"))


def test_style_matches_predictor(served, photo):
  labels, path = _labels(served)
  reference, reference_path = photo
  loaded = served.client.predict(handle_file(reference_path), api_name="/load_reference")
  np.testing.assert_array_equal(read_png(loaded), reference)
  gallery, files = served.client.predict(handle_file(path), handle_file(reference_path), 0.5, True,
                                         2, 5, 4, "euler", api_name="/style")
  expected = served.predictor.synthesize_styled(labels, reference, 2, 0.5, True, 0, 5, 4, "euler")
  np.testing.assert_array_equal(np.stack(_gallery(gallery)), expected)
  assert sorted(_named(files)) == ["labels.png", "sample_0.png", "sample_1.png"]


@pytest.mark.parametrize("method", ["blend", "shift"])
def test_edit_matches_predictor(served, photo, method):
  image, path = photo
  edited = served.predictor.segment(image, 2, "euler")
  edited[2:9, 2:9] = 5  # a building
  edited[12:, :4] = anchors.IGNORE_LABEL  # keep the photo's own labels there
  labels_path = write_png(served.files / f"edited_{method}.png", edited)
  out, files = served.client.predict(handle_file(path), handle_file(labels_path), method, 2, 3,
                                     "euler", api_name="/edit")
  expected, count = served.predictor.edit(image, edited, method, 3, "euler", 2)
  assert count > 0
  np.testing.assert_array_equal(read_png(out), expected)
  files = _named(files)
  np.testing.assert_array_equal(read_png(files["edited.png"]), expected)
  np.testing.assert_array_equal(read_png(files["labels.png"]), edited)


def test_blank_and_uploaded_label_maps_and_the_brush(served, photo):
  image, path = photo
  editor, labels_file, _ = served.client.predict("tree", handle_file(path),
                                                 api_name="/blank_labels")
  np.testing.assert_array_equal(read_png(labels_file), np.full(image.shape[:2], 6, np.uint8))
  editor, labels_file, _ = served.client.predict("ignore (255)", None, api_name="/blank_labels")
  np.testing.assert_array_equal(read_png(labels_file), np.full((16, 16), 255, np.uint8))
  np.testing.assert_array_equal(read_png(editor["value"]["background"])[..., :3],
                                canvas.render(read_png(labels_file), served.studio.palette))
  labels, labels_path = _labels(served)
  editor, labels_file, labels_view = served.client.predict(handle_file(labels_path), "sky",
                                                           api_name="/load_labels")
  np.testing.assert_array_equal(read_png(labels_file), labels)
  np.testing.assert_array_equal(read_png(labels_view), canvas.render(labels, served.studio.palette))
  # The brush: the class's anchor colour and no other, sized for the label map on the canvas.
  for name, colour in [("ground", served.studio.colours[1]),
                       ("ignore (255)", canvas.ignore_colour(served.studio.palette))]:
    update = served.client.predict(name, handle_file(labels_path), api_name="/brush")
    assert update["brush"]["colors"] == [canvas.hex_colour(colour)]
    assert update["brush"]["color_mode"] == "fixed" and update["brush"]["default_size"] == 1


def test_bad_uploads_are_one_line_messages_and_the_server_keeps_serving(served, photo, tmp_path):
  image, path = photo
  garbage = tmp_path / "garbage.png"
  garbage.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
  outside = np.zeros((16, 16), np.uint8)
  outside[3, 3] = 9
  strip = np.zeros((4, 100, 3), np.uint8)
  huge = np.zeros((MAX_SIDE + 1, MAX_SIDE + 1, 3), np.uint8)
  files = {"garbage": str(garbage),
           "outside": write_png(tmp_path / "outside.png", outside),
           "rgb": write_png(tmp_path / "rgb_labels.png", np.zeros((16, 16, 3), np.uint8)),
           "strip": write_png(tmp_path / "strip.png", strip),
           "huge": write_png(tmp_path / "huge.png", huge),
           "small": write_png(tmp_path / "small_labels.png", np.zeros((8, 8), np.uint8))}
  cases = [
      ("/load_photo", [handle_file(files["garbage"])], "garbage.png: not a readable image"),
      ("/load_reference", [handle_file(files["garbage"])], "garbage.png: not a readable image"),
      ("/load_labels", [handle_file(files["outside"]), "sky"],
       "outside.png: label values 9 are outside the dataset's classes 0..6"),
      ("/load_labels", [handle_file(files["rgb"]), "sky"],
       "rgb_labels.png: not a single-channel label map"),
      ("/load_photo", [handle_file(files["strip"])],
       "strip.png: 4x100 cannot be resized to the model's 16x16 without squashing"),
      ("/load_photo", [handle_file(files["huge"])],
       f"huge.png: {MAX_SIDE + 1}x{MAX_SIDE + 1} is larger than the studio takes"),
      ("/edit", [handle_file(path), handle_file(files["small"]), "blend", 2, 2, "euler"],
       "the label map is 8x8, the photo 16x16"),
      ("/synthesize", [handle_file(files["outside"]), 2, 0, 2, "euler"],
       "label values 9 are outside"),
      ("/resample", [handle_file(files["small"]), None, [], 1, 0, 1, 2, "euler"],
       "nothing to re-sample"),
      ("/resample", [handle_file(files["small"]), None, ["sky"], 1, 0, 0, 2, "euler"],
       "the re-sample seed 0 is the samples' seed"),
  ]
  for api_name, args, message in cases:
    with pytest.raises(AppError, match=message.replace("(", r"\(").replace(")", r"\)")):
      served.client.predict(*args, api_name=api_name)
    # ... and the next request is served.
    out = served.client.predict(handle_file(path), api_name="/load_photo")
    np.testing.assert_array_equal(read_png(out), image)


# -- safety: loopback by default, a password or a loud warning elsewhere, no share link ------------
def test_exposure_warning():
  for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
    assert studio_app.is_loopback(host) and not studio_app.exposure_warning(host, 1, False, None)
  for host in ("0.0.0.0", "10.1.2.3", "::", "my-host"):
    assert not studio_app.is_loopback(host)
    warning = studio_app.exposure_warning(host, 7860, False, None)
    assert f"listens on {host}:7860 WITHOUT A PASSWORD" in warning
    assert "Anyone who can reach it can use this page" in warning
    assert studio_app.exposure_warning(host, 7860, False, ("studio", "pw")) is None
  assert "gradio.live" in studio_app.exposure_warning("127.0.0.1", 7860, True, None)


def test_the_readme_studio_command_starts_warms_up_and_segments(served, photo, tmp_path):
  """The README's command as a user types it (warm-up included), shortened only by the tiny
  config and its data directory, on a free port: it serves, and answers a segmentation."""
  image, path = photo
  port = free_port()
  log = open(tmp_path / "studio.log", "w+")
  proc = subprocess.Popen(
      [sys.executable, "-m", "semflow_jax.studio", "--config=configs/synthetic.py:tiny",
       f"--config.data.tfds_data_dir={served.config.data.tfds_data_dir}",
       f"--workdir={served.workdir}", f"--port={port}"],
      cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "XLA_FLAGS": ""})
  try:
    url, deadline = f"http://127.0.0.1:{port}/", time.time() + 240  # against hangs only
    while time.time() < deadline and proc.poll() is None:
      log.seek(0)
      if f"serving on {url}" in log.read():
        break
      time.sleep(0.5)
    log.seek(0)
    output = log.read()
    assert f"studio: serving on {url}" in output, output[-3000:]
    assert "programs compiled in" in output, output[-3000:]  # the warm-up ran
    client = Client(url, verbose=False, analytics_enabled=False, download_files=str(tmp_path))
    try:
      seg_steps, method = int(served.config.sample.seg_steps), served.config.sample.method
      _, files, _, labels_file, _ = client.predict(handle_file(path), seg_steps, method, "sky",
                                                   api_name="/segment")
    finally:
      client.close()
    labels = read_png(labels_file)
    np.testing.assert_array_equal(read_png(_named(files)["labels.png"]), labels)
    assert labels.shape == image.shape[:2] and labels.max() < len(served.names)
    # Another process, one device instead of eight: the same model's answer, up to the odd
    # pixel on an anchor boundary.
    expected = served.predictor.segment(image, seg_steps, method)
    assert (labels == expected).mean() >= 0.99
  finally:
    proc.terminate()
    proc.wait(timeout=60)
    log.close()


def test_a_port_in_use_is_one_line_before_anything_loads(tmp_path):
  """A second studio on a port that is taken stops at once with a line naming --port (before,
  Gradio's OSError traceback came after the model had loaded and compiled)."""
  import socket
  with socket.socket() as taken:
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    proc = subprocess.run(
        [sys.executable, "-m", "semflow_jax.studio", f"--workdir={tmp_path / 'no_run'}",
         f"--port={port}"], cwd=REPO, capture_output=True, text=True, timeout=300)
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
  assert f"--port={port}: cannot listen on 127.0.0.1:{port}" in errors[0], errors
  assert "Traceback" not in proc.stderr


def test_command_line_serves_on_loopback_with_a_password_and_no_share_link(served, tmp_path):
  password = tmp_path / "password"
  password.write_text("s3cret\n")
  port = free_port()
  log = open(tmp_path / "studio.log", "w+")
  proc = subprocess.Popen(
      [sys.executable, "-m", "semflow_jax.studio", "--config=configs/synthetic.py:tiny",
       f"--config.data.tfds_data_dir={served.config.data.tfds_data_dir}",
       f"--workdir={served.workdir}", f"--port={port}", f"--password_file={password}",
       "--nowarmup"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
      env={**os.environ, "XLA_FLAGS": ""})
  try:
    url, deadline = f"http://127.0.0.1:{port}/", time.time() + 240
    while time.time() < deadline and proc.poll() is None:
      log.seek(0)
      if f"serving on {url}" in log.read():
        break
      time.sleep(0.5)
    log.seek(0)
    output = log.read()
    assert f"studio: serving on {url} (user 'studio'" in output, output[-3000:]
    assert "WITHOUT A PASSWORD" not in output and "gradio.live" not in output
    # no password: refused (whatever gradio_client raises for it)
    with pytest.raises(Exception):  # noqa: B017
      Client(url, verbose=False, analytics_enabled=False)
    client = Client(url, auth=("studio", "s3cret"), verbose=False, analytics_enabled=False,
                    download_files=str(tmp_path))
    try:
      out = client.predict(handle_file(served.studio.examples[0]), api_name="/load_photo")
      np.testing.assert_array_equal(read_png(out), image_files.read_image(served.studio.examples[0]))
    finally:
      client.close()
  finally:
    proc.terminate()
    proc.wait(timeout=60)
    log.close()


def test_command_line_refuses_a_missing_password_file_in_one_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "semflow_jax.studio", "--config=configs/synthetic.py:tiny",
       f"--workdir={tmp_path}", "--host=0.0.0.0", f"--password_file={tmp_path / 'nope'}"],
      cwd=REPO, capture_output=True, text=True, timeout=240, env={**os.environ, "XLA_FLAGS": ""})
  assert proc.returncode == 2
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert errors == [f"error: --password_file={tmp_path / 'nope'}: no such file"], (
      proc.stderr[-2000:])
