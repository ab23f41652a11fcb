"""The studio in a real browser: headless Chromium (Debian's /usr/bin/chromium) driven by
Playwright loads the page, uploads a photo, segments it, paints a stroke of another class,
synthesises and edits, and checks the pictures on the page against `sample.Predictor` on the
same checkpoint (fetched from the page's own <img> and download links). Bad uploads show a
message and the next request is served.

  SEMFLOW_STUDIO_WORKDIR=runs/synthetic SEMFLOW_STUDIO_SCREENSHOTS=docs/images \\
      python -m pytest -q tests/test_studio_browser.py

runs the same test on the default config's checkpoint (configs/synthetic.py) and writes the
README's screenshots; by default it trains the tiny config (seconds) and keeps the screenshots
in pytest's temporary folder.
"""

import io
import os
import re

import numpy as np
import pytest
from PIL import Image

from semflow_jax import image_files
from semflow_jax.studio import app as studio_app
from tests import studio_fixtures
from tests.studio_fixtures import write_png

pytestmark = pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword).*")

# Debian's package (`apt-get install chromium`; .ci/run installs it); SEMFLOW_CHROMIUM names
# another Chromium. Missing, the test fails: it never skips.
CHROMIUM = os.environ.get("SEMFLOW_CHROMIUM", "/usr/bin/chromium")
# Headless, as root, and nothing that reaches the network.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
TIMEOUT_MS = 120_000


@pytest.fixture(scope="module")
def browser_page(tmp_path_factory, tfds_dir):
  from playwright.sync_api import sync_playwright
  assert os.path.exists(CHROMIUM), (f"{CHROMIUM} is missing: apt-get install chromium (or set "
                                    "SEMFLOW_CHROMIUM to a Chromium binary)")
  workdir = os.environ.get("SEMFLOW_STUDIO_WORKDIR")
  if workdir:  # the default config's run (README screenshots)
    from configs import synthetic
    config = synthetic.get_config()
    config.data.tfds_data_dir = tfds_dir
  else:
    workdir = studio_fixtures.trained_workdir(tmp_path_factory, tfds_dir)
    config = studio_fixtures.tiny_config(tfds_dir)
  shots = os.environ.get("SEMFLOW_STUDIO_SCREENSHOTS") or str(tmp_path_factory.mktemp("shots"))
  studio = studio_app.from_workdir(config, workdir)
  try:
    with studio_fixtures.serve(studio) as url, sync_playwright() as playwright:
      browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
      try:
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url)
        page.wait_for_selector("#segment")
        yield page, studio, shots, tmp_path_factory.mktemp("browser_files")
      finally:
        browser.close()
  finally:
    studio.close()


def _fetch(page, url) -> np.ndarray:
  """An image the page shows or links, fetched by URL, as an array (it must be a PNG)."""
  response = page.request.get(url)
  assert response.ok, url
  data = response.body()
  assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{url} is not a PNG"
  return np.asarray(Image.open(io.BytesIO(data)))


def _new_src(page, selector, old=None, count=1) -> list:
  """The src (or href) of the first `count` elements matching `selector`, once they exist and
  the first differs from `old`."""
  attribute = "href" if " a" in selector else "src"
  page.wait_for_function(
      """([selector, attribute, old, count]) => {
           const found = [...document.querySelectorAll(selector)]
             .map(e => e.getAttribute(attribute));
           return found.length >= count && found[0] && found[0] !== old;
         }""", arg=[selector, attribute, old, count], timeout=TIMEOUT_MS)
  return page.eval_on_selector_all(selector, f"es => es.map(e => e.{attribute})")[:count]


def _upload(page, button_label, path):
  page.locator(f'[data-testid="{button_label}-upload-button"]').set_input_files(path)


def _shot(page, shots, name, *selectors):
  """A screenshot of the page region holding `selectors` (the whole page without any)."""
  clip = None
  if selectors:
    boxes = [page.eval_on_selector(s, "e => { const r = e.getBoundingClientRect(); return "
                                      "[r.left + scrollX, r.top + scrollY, r.right + scrollX, "
                                      "r.bottom + scrollY]; }") for s in selectors]
    left, top = min(b[0] for b in boxes), min(b[1] for b in boxes)
    clip = {"x": left, "y": top, "width": max(b[2] for b in boxes) - left,
            "height": max(b[3] for b in boxes) - top}
  page.screenshot(path=os.path.join(shots, name), full_page=True, clip=clip)


def _stroke(page, row, col_start, col_end, shape):
  """Drag the brush along label-map row `row` from `col_start` to `col_end` on the canvas (the
  editor fits the label map in its middle at the zoom it displays)."""
  page.locator("#canvas").scroll_into_view_if_needed()
  box = page.locator("#canvas canvas").first.bounding_box()  # in the viewport's coordinates
  zoom = page.locator("#canvas").get_by_text(re.compile(r"^\d+%$")).first.inner_text()
  scale = int(zoom[:-1]) / 100
  cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
  to_screen = lambda r, c: (cx + (c + 0.5 - shape[1] / 2) * scale,
                            cy + (r + 0.5 - shape[0] / 2) * scale)
  page.mouse.move(*to_screen(row, col_start))
  page.mouse.down()
  page.mouse.move(*to_screen(row, col_end), steps=20)
  page.mouse.up()


def _choose_class(page, name):
  box = page.locator("#brush_class input")
  box.click()
  box.fill(name)
  page.keyboard.press("Enter")
  page.wait_for_function("name => document.querySelector('#brush_class input').value === name",
                         arg=name)


def test_segment_paint_synthesise_and_edit_in_a_browser(browser_page):
  page, studio, shots, _ = browser_page
  predictor, names = studio.predictor, studio.names
  seg_steps, synth_steps, method, seed = studio._defaults()
  photo_path = studio.examples[1]
  photo = image_files.read_image(photo_path)

  # Upload a photo: the page shows it, unchanged.
  _upload(page, "Upload a photo", photo_path)
  [src] = _new_src(page, "#photo img")
  np.testing.assert_array_equal(_fetch(page, src), photo)

  # Segment: the overlay appears; the label map (download link) is the Python API's.
  page.click("#segment")
  [labels_url] = _new_src(page, "#labels_file a")
  page.wait_for_selector("#overlay img")
  labels = _fetch(page, labels_url)
  np.testing.assert_array_equal(labels, predictor.segment(photo, seg_steps, method))

  # Paint a stroke of the class least present along one row, then synthesise: every operation
  # first reads the canvas, snapped to the anchors.
  h, w = labels.shape
  row = h // 4
  new_class = int(np.argmin(np.bincount(labels[row:row + 3, 2:w - 2].ravel(),
                                        minlength=len(names))))
  _choose_class(page, names[new_class])
  page.wait_for_timeout(500)  # the brush update reaches the editor
  for r in (row, row + 1, row + 2):  # a band three rows high
    _stroke(page, r, 2, w - 3, labels.shape)
  page.click("#synthesize")
  [painted_url] = _new_src(page, "#labels_file a", old=labels_url)
  painted = _fetch(page, painted_url)
  changed = np.argwhere(painted != labels)
  assert (painted[row:row + 3, 3:w - 4] == new_class).all(), painted[row:row + 3]
  # Only near the strokes (the brush's radius and its anti-aliased edge).
  assert len(changed) and (changed[:, 0] >= row - 2).all() and (changed[:, 0] <= row + 4).all()
  samples = _new_src(page, "#samples img", count=studio_app.DEFAULT_SAMPLES)
  expected = predictor.synthesize(painted, studio_app.DEFAULT_SAMPLES, seed, synth_steps, method)
  for src, want in zip(samples, expected):
    np.testing.assert_array_equal(_fetch(page, src), want)
  _shot(page, shots, "studio_segment_paint.png", "#photo_section", "#labels_section")
  _shot(page, shots, "studio_synthesis.png", "#results_section")

  # Edit the photo through the painted labels: the Python API's edit, the photo kept outside.
  page.get_by_role("tab", name="Edit the photo").click()
  page.click("#edit")
  [edited_src] = _new_src(page, "#edited img")
  edited = _fetch(page, edited_src)
  want, count = predictor.edit(photo, painted, "blend", synth_steps, method, seg_steps)
  np.testing.assert_array_equal(edited, want)
  assert count > 0 and not np.array_equal(edited, photo)
  far = np.abs(np.arange(h) - row - 1)[:, None].repeat(w, 1) > 5  # rows the edit cannot reach
  if not predictor.model.has_vae:  # pixel space: blend keeps the photo's pixels there
    np.testing.assert_array_equal(edited[far], photo[far])
  _shot(page, shots, "studio_edit.png", "#results_section")


def test_bad_uploads_show_a_message_and_the_next_request_is_served(browser_page):
  page, studio, shots, files = browser_page
  garbage = files / "garbage.png"
  garbage.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
  outside = np.zeros(studio.model.image_size, np.uint8)
  outside[0, 0] = studio.model.num_classes + 2
  cases = [
      ("Upload a photo", str(garbage), "garbage.png: not a readable image"),
      ("Upload a label PNG", write_png(files / "outside.png", outside),
       f"outside.png: label values {studio.model.num_classes + 2} are outside"),
      ("Upload a photo", write_png(files / "strip.png", np.zeros((4, 100, 3), np.uint8)),
       "strip.png: 4x100 cannot be resized"),
  ]
  for button, path, message in cases:
    _upload(page, button, path)
    page.get_by_text(message).first.wait_for()
  _shot(page, shots, "studio_bad_upload.png", "#photo_section", "#labels_section")
  # The server still answers: a good photo uploads and segments.
  old = page.eval_on_selector("#labels_file a", "e => e.href") if page.locator(
      "#labels_file a").count() else None
  old_photo = page.eval_on_selector("#photo img", "e => e.src") if page.locator(
      "#photo img").count() else None
  photo_path = studio.examples[2]
  _upload(page, "Upload a photo", photo_path)
  [src] = _new_src(page, "#photo img", old=old_photo)
  np.testing.assert_array_equal(_fetch(page, src), image_files.read_image(photo_path))
  page.click("#segment")
  [labels_url] = _new_src(page, "#labels_file a", old=old)
  seg_steps, _, method, _ = studio._defaults()
  np.testing.assert_array_equal(_fetch(page, labels_url),
                                studio.predictor.segment(image_files.read_image(photo_path), seg_steps,
                                                         method))
