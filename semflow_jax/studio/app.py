"""The studio's page: Gradio components wired to `sample.Predictor` (the model loaded once, its
programs compiled once and reused by every call).

Every operation is an event with an API name, so the page and `gradio_client` call the same
functions: `load_photo`, `segment`, `blank_labels`, `load_labels`, `brush`, `labels` (snap the
canvas), `synthesize`, `resample`, `load_reference`, `style`, `edit`. Label maps travel between
them as PNGs of class ids (the files a person downloads), images as PNGs: nothing is ever
re-encoded lossily (Gradio's image components default to WebP; every one here says PNG).
"""

import io
import ipaddress
import os
import shutil
import tempfile
import time
from typing import Optional, Sequence

import gradio as gr
import numpy as np
import PIL.Image
from absl import logging

from semflow_jax import anchors, flow, image_files, images, sample, storage
from semflow_jax.studio import canvas

PNG = "png"
MAX_SAMPLES = 16
DEFAULT_SAMPLES = 4
# A photo or label map whose aspect ratio differs from the model's by more than this factor is
# refused: resized to the model's resolution it would be squashed beyond recognition.
MAX_ASPECT_DISTORTION = 4.0
IGNORE_NAME = "ignore (255)"  # the brush that paints the ignore label
REGION_COLOUR = "#ff00ff"
OVERLAY_OPACITY = 0.6  # the label colours over the photo
OUTPUT_MAX_AGE_S = 3600  # result files older than this are removed (Gradio keeps its own copies)

# System fonts: the default theme fetches Google's web fonts, which a TPU VM behind a tunnel (or
# a machine offline) cannot reach.
THEME = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
CSS = """
.pixelated img { image-rendering: pixelated; }
#photo img, #labels_view img, #edited img, #reference img { width: 100%; height: 100%;
                                                            object-fit: contain; }
.legend { max-height: 14em; overflow-y: auto; font-size: 0.85em; }
.legend span.swatch { display: inline-block; width: 0.9em; height: 0.9em; margin-right: 0.3em;
                      border: 1px solid #8888; vertical-align: middle; }
"""


def brush_size(shape) -> int:
  """Brush radius in label-map pixels: about a 24th of the shorter side."""
  return max(1, min(shape[:2]) // 24)


def region_brush(size: Optional[int] = None) -> gr.Brush:
  """The brush that marks a region to re-sample (any colour: only where it painted counts)."""
  return gr.Brush(colors=[REGION_COLOUR], default_color=REGION_COLOUR, color_mode="fixed",
                  default_size=size or "auto")


class Studio:
  """The page over one loaded model. `build()` returns the gr.Blocks; the handlers work on the
  values Gradio passes (numpy images, file paths, editor dicts) and raise gr.Error with one line
  for bad input, so a bad upload is a message on the page and the server keeps serving."""

  def __init__(self, predictor: sample.Predictor, class_names: Sequence[str],
               examples: Sequence[str] = (), max_side: int = 4096, title: str = "SemFlow studio",
               description: str = ""):
    self.predictor = predictor
    self.model = predictor.model
    self.palette = predictor.model.palette
    self.names = list(class_names)
    if len(self.names) != self.model.num_classes:
      raise ValueError(f"{len(self.names)} class names for a model of {self.model.num_classes} "
                       "classes")
    self.colours = canvas.palette_colours(self.palette)
    # One brush per class and one that paints the ignore label (Gradio's eraser only removes
    # strokes, back to the label map they were painted on).
    self.brush_names = self.names + [IGNORE_NAME]
    self.examples = list(examples)
    self.max_side = int(max_side)
    self.title, self.description = title, description
    self.output_root = tempfile.mkdtemp(prefix="semflow_studio_")
    self.results_root = os.path.join(self.output_root, "results")
    os.makedirs(self.results_root)
    self._compiled = set()  # (program, batch, settings) that have run: for the progress line

  def close(self):
    shutil.rmtree(self.output_root, ignore_errors=True)

  # -- helpers -------------------------------------------------------------------------------
  def _defaults(self):
    s = self.predictor.config.sample
    return int(s.seg_steps), int(s.synth_steps), s.method, int(s.seed)

  def _check_size(self, shape, name: str) -> None:
    """A size the model cannot take: too large for the studio, or too far from the model's
    aspect ratio to survive the resize to its resolution."""
    h, w = shape[:2]
    if min(h, w) < 1:
      raise image_files.InputError(f"{name}: empty image ({h}x{w})")
    if max(h, w) > self.max_side:
      raise image_files.InputError(f"{name}: {h}x{w} is larger than the studio takes "
                              f"(--max_side={self.max_side})")
    mh, mw = self.model.image_size
    distortion = (h / w) / (mh / mw)
    if not 1.0 / MAX_ASPECT_DISTORTION <= distortion <= MAX_ASPECT_DISTORTION:
      raise image_files.InputError(
          f"{name}: {h}x{w} cannot be resized to the model's {mh}x{mw} without squashing it "
          f"more than {MAX_ASPECT_DISTORTION:g}x; crop it closer to the model's aspect ratio")

  def _read_upload(self, path: Optional[str], what: str):
    """(PIL image, the upload's file name): its size is checked from the header, before the
    pixels are decoded."""
    if not path:
      raise image_files.InputError(f"no {what} was uploaded")
    name = os.path.basename(path)
    with open(path, "rb") as f:  # Gradio's local copy of the upload
      data = f.read()
    try:
      with PIL.Image.open(io.BytesIO(data)) as header:
        size = header.size
    except Exception:  # noqa: BLE001  (not an image: decode_image names the problem)
      size = None
    if size is not None:
      self._check_size(size[::-1], name)
    return image_files.decode_image(data, name), name

  def _photo(self, path: Optional[str], what: str = "photo") -> np.ndarray:
    return np.asarray(self._read_upload(path, what)[0].convert("RGB"))

  def _labels(self, path: Optional[str], what: str = "label map") -> np.ndarray:
    """A label PNG of class ids (an upload, or the studio's own label file) -> uint8 (H, W)."""
    image, name = self._read_upload(path, what)
    return image_files.label_map_from_image(image, name, self.model.num_classes)

  def _check_sampler(self, steps, method) -> tuple:
    try:
      flow.check_sampler(steps, method)
    except ValueError as e:
      raise image_files.InputError(str(e)) from None
    return int(steps), method

  def _output_dir(self) -> str:
    """A fresh folder for one call's files; old ones are removed (Gradio has copied them)."""
    now = time.time()
    for name in os.listdir(self.results_root):
      path = os.path.join(self.results_root, name)
      if now - os.path.getmtime(path) > OUTPUT_MAX_AGE_S:
        shutil.rmtree(path, ignore_errors=True)
    return tempfile.mkdtemp(dir=self.results_root)

  def _write(self, directory: str, name: str, array: np.ndarray) -> str:
    path = os.path.join(directory, name)
    images.write_png(path, np.asarray(array))
    return path

  def _write_samples(self, out: np.ndarray, labels: np.ndarray) -> list:
    directory = self._output_dir()
    paths = [self._write(directory, f"sample_{i}.png", x) for i, x in enumerate(out)]
    return paths + [self._write(directory, "labels.png", labels)]

  def _compile_note(self, name: str, batch: int, **static) -> str:
    """' (compiling it first, once)' for the first call of a program at these settings and
    batch size: XLA compiles it then, and every later call reuses it."""
    key = (name, batch, tuple(sorted(static.items())))
    first = key not in self._compiled
    self._compiled.add(key)
    return " (compiling it first, once)" if first else ""

  def brush(self, class_name: str, size: Optional[int] = None) -> gr.Brush:
    """A brush that paints `class_name` (or IGNORE_NAME) in its colour, and no other colour."""
    label = self._brush_label(class_name)
    rgb = canvas.ignore_colour(self.palette) if label == anchors.IGNORE_LABEL else \
        self.colours[label]
    return gr.Brush(colors=[canvas.hex_colour(rgb)], default_color=canvas.hex_colour(rgb),
                    color_mode="fixed", default_size=size or "auto")

  def _brush_label(self, name: str) -> int:
    return anchors.IGNORE_LABEL if name == IGNORE_NAME else self._class_id(name)

  def _class_id(self, class_name: str) -> int:
    try:
      return self.names.index(class_name)
    except ValueError:
      shown = ", ".join(self.names[:12]) + (", ..." if len(self.names) > 12 else "")
      raise image_files.InputError(f"unknown class {class_name!r}; the model's classes are {shown}"
                              ) from None

  def _editor(self, labels: np.ndarray, class_name: str):
    """The canvas update that shows `labels`, with a brush sized for the label map."""
    return gr.ImageEditor(value=canvas.to_editor(labels, self.palette),
                          brush=self.brush(class_name, brush_size(labels.shape)))

  def _labels_outputs(self, labels: np.ndarray):
    """(label PNG of class ids, its picture in anchor colours)."""
    path = self._write(self._output_dir(), "labels.png", labels)
    return path, canvas.render(labels, self.palette)

  def legend_html(self) -> str:
    rows = [f'<div><span class="swatch" style="background:{canvas.hex_colour(c)}"></span>'
            f'{i}: {name}</div>' for i, (name, c) in enumerate(zip(self.names, self.colours))]
    ignore = canvas.hex_colour(canvas.ignore_colour(self.palette))
    rows.append(f'<div><span class="swatch" style="background:{ignore}"></span>{IGNORE_NAME}'
                '</div>')
    return '<div class="legend">' + "".join(rows) + "</div>"

  # -- handlers (each one is an API endpoint) ---------------------------------------------------
  def load_photo(self, upload: Optional[str]) -> np.ndarray:
    return self._photo(upload)

  def segment(self, photo: Optional[np.ndarray], seg_steps, sampler, brush_class,
              progress=gr.Progress()):
    if photo is None:
      raise image_files.InputError("upload or pick a photo first")
    self._check_size(photo.shape, "photo")
    steps, sampler = self._check_sampler(seg_steps, sampler)
    progress(0.1, desc=f"segmenting: {steps} {sampler} steps" +
             self._compile_note("segment", 1, steps=steps, method=sampler))
    labels = self.predictor.segment(photo, steps, sampler)
    progress(0.9, desc="drawing the label map")
    overlay = (photo, [(OVERLAY_OPACITY * m, n) for m, n in canvas.overlay_masks(labels,
                                                                                self.names)])
    directory = self._output_dir()
    files = [self._write(directory, "labels.png", labels),
             self._write(directory, "labels_preview.png", canvas.render(labels, self.palette))]
    return (overlay, files, self._editor(labels, brush_class), *self._labels_outputs(labels))

  def blank_labels(self, class_name: str, photo: Optional[np.ndarray]):
    """A canvas filled with `class_name`, at the photo's size (so it can edit the photo) or, with
    no photo, at the model's resolution."""
    shape = photo.shape[:2] if photo is not None else tuple(self.model.image_size)
    labels = np.full(shape, self._brush_label(class_name), np.uint8)
    return (self._editor(labels, class_name), *self._labels_outputs(labels))

  def load_labels(self, upload: Optional[str], class_name: str):
    labels = self._labels(upload, "label PNG")
    return (self._editor(labels, class_name), *self._labels_outputs(labels))

  def set_brush(self, class_name: str, labels_file: Optional[str]):
    """The canvas's brush for `class_name`, sized for the label map on the canvas (its file)."""
    size = None
    if labels_file:
      with PIL.Image.open(labels_file) as image:  # reads the header only
        size = brush_size(image.size[::-1])
    return gr.ImageEditor(brush=self.brush(class_name, size))

  def snap(self, editor: Optional[dict]):
    """The canvas as the model reads it: every pixel snapped to the nearest anchor (or ignore)."""
    labels = canvas.editor_labels(editor, self.palette)
    if labels is None:
      raise image_files.InputError("the canvas is empty: segment a photo, upload a label PNG or start "
                              "a blank canvas")
    self._check_size(labels.shape, "canvas")
    return self._labels_outputs(labels)

  def synthesize(self, labels_file: Optional[str], num_samples, seed, synth_steps, sampler,
                 progress=gr.Progress()):
    labels = self._labels(labels_file)
    n, seed = self._count(num_samples), int(seed)
    steps, sampler = self._check_sampler(synth_steps, sampler)
    progress(0.1, desc=f"synthesising {n} sample(s): {steps} {sampler} steps" +
             self._compile_note("synthesize", n, steps=steps, method=sampler))
    out = self.predictor.synthesize(labels, n, seed, steps, sampler)
    progress(0.9, desc="writing PNGs")
    files = self._write_samples(out, labels)
    region_canvas = gr.ImageEditor(
        value={"background": out[0], "layers": [], "composite": out[0]},
        brush=region_brush(brush_size(labels.shape)))
    return list(out), files, region_canvas

  def resample(self, labels_file: Optional[str], region_editor: Optional[dict],
               classes: Optional[Sequence[str]], num_samples, seed, new_seed, synth_steps, sampler,
               progress=gr.Progress()):
    labels = self._labels(labels_file)
    n, seed, new_seed = self._count(num_samples), int(seed), int(new_seed)
    steps, sampler = self._check_sampler(synth_steps, sampler)
    if new_seed == seed:
      raise image_files.InputError(f"the re-sample seed {new_seed} is the samples' seed: the region "
                              "would not change")
    region = np.isin(labels, [self._class_id(c) for c in classes or []])
    painted = canvas.painted_region(region_editor)
    if painted is not None:
      if painted.shape != labels.shape:
        raise image_files.InputError(f"the painted region is {painted.shape[0]}x{painted.shape[1]}, "
                                f"the label map {labels.shape[0]}x{labels.shape[1]}: synthesise "
                                "again and paint over the new sample")
      region |= painted
    if not region.any():
      raise image_files.InputError("nothing to re-sample: paint a region over the sample or choose "
                              "classes that the label map has")
    progress(0.1, desc=f"re-sampling {int(region.sum())} pixels of {n} sample(s)" +
             self._compile_note("resample", n, steps=steps, method=sampler))
    out = self.predictor.resample(labels, region, n, seed, new_seed, steps, sampler)
    progress(0.9, desc="writing PNGs")
    files = self._write_samples(out, labels)
    return list(out), files + [self._write(os.path.dirname(files[0]), "region.png",
                                           region.astype(np.uint8) * 255)]

  def load_reference(self, upload: Optional[str]) -> np.ndarray:
    return self._photo(upload, "reference image")

  def style(self, labels_file: Optional[str], reference: Optional[np.ndarray], strength,
            colour_transfer, num_samples, seed, synth_steps, sampler, progress=gr.Progress()):
    labels = self._labels(labels_file)
    if reference is None:
      raise image_files.InputError("upload or pick a reference image first")
    self._check_size(reference.shape, "reference image")
    n, seed, strength = self._count(num_samples), int(seed), float(strength)
    if not 0.0 <= strength <= 1.0:
      raise image_files.InputError(f"style strength {strength} must be in [0, 1] (1 = plain "
                              "synthesis, 0 = the reference itself)")
    steps, sampler = self._check_sampler(synth_steps, sampler)
    progress(0.1, desc=f"synthesising {n} sample(s) in the reference's style" +
             self._compile_note("style", n, strength=strength, steps=steps, method=sampler,
                                colour_transfer=bool(colour_transfer)))
    out = self.predictor.synthesize_styled(labels, reference, n, strength, bool(colour_transfer),
                                           0, seed, steps, sampler)
    progress(0.9, desc="writing PNGs")
    return list(out), self._write_samples(out, labels)

  def edit(self, photo: Optional[np.ndarray], labels_file: Optional[str], method: str, seg_steps,
           synth_steps, sampler, progress=gr.Progress()):
    if photo is None:
      raise image_files.InputError("upload or pick a photo first")
    labels = self._labels(labels_file)
    if labels.shape != photo.shape[:2]:
      raise image_files.InputError(f"the label map is {labels.shape[0]}x{labels.shape[1]}, the photo "
                              f"{photo.shape[0]}x{photo.shape[1]}: start the labels from the "
                              "photo's segmentation (or a blank canvas with the photo loaded)")
    if method not in sample.EDIT_METHODS:
      raise image_files.InputError(f"edit method {method!r}: expected one of "
                              f"{', '.join(sample.EDIT_METHODS)}")
    seg_steps, _ = self._check_sampler(seg_steps, sampler)
    steps, sampler = self._check_sampler(synth_steps, sampler)
    progress(0.1, desc=f"editing ({method}): segment the photo, shift the labels, integrate back"
             + self._compile_note("edit", 1, steps=steps, method=sampler, edit=method,
                                  seg_steps=seg_steps))
    edited, count = self.predictor.edit(photo, labels, method, steps, sampler, seg_steps)
    if not count:
      gr.Warning("no label differs from the photo's segmentation: nothing was edited")
    directory = self._output_dir()
    return edited, [self._write(directory, "edited.png", edited),
                    self._write(directory, "labels.png", labels)]

  def _count(self, num_samples) -> int:
    n = int(num_samples)
    if not 1 <= n <= MAX_SAMPLES:
      raise image_files.InputError(f"number of samples {n} must be in 1..{MAX_SAMPLES}")
    return n

  def warm_up(self, num_samples: int) -> None:
    """Compile the default programs (segment, synthesize N, edit) before the page opens."""
    seg_steps, synth_steps, method, seed = self._defaults()
    start = time.time()
    photo = np.zeros((*self.model.image_size, 3), np.uint8)
    labels = self.predictor.segment(photo, seg_steps, method)
    self.predictor.synthesize(labels, num_samples, seed, synth_steps, method)
    self.predictor.edit(photo, labels, "blend", synth_steps, method, seg_steps)
    self._compile_note("segment", 1, steps=seg_steps, method=method)
    self._compile_note("synthesize", num_samples, steps=synth_steps, method=method)
    self._compile_note("edit", 1, steps=synth_steps, method=method, edit="blend",
                       seg_steps=seg_steps)
    logging.info("studio: programs compiled in %.1f s: %s", time.time() - start,
                 self.predictor.programs.compiled())

  # -- the page --------------------------------------------------------------------------------
  def build(self) -> gr.Blocks:
    seg_steps, synth_steps, method, seed = self._defaults()
    first = self.names[0]
    colour_map = {n: canvas.hex_colour(c) for n, c in zip(self.names, self.colours)}
    with gr.Blocks(title=self.title, analytics_enabled=False) as demo:
      gr.Markdown(f"# {self.title}\n{self.description}")
      with gr.Accordion("Sampler", open=True):
        with gr.Row():
          seg_steps_in = gr.Slider(1, 100, value=seg_steps, step=1, label="Segmentation steps")
          synth_steps_in = gr.Slider(1, 100, value=synth_steps, step=1, label="Synthesis steps")
          sampler_in = gr.Dropdown(list(flow.METHODS), value=method, label="Sampler")
          seed_in = gr.Number(value=seed, precision=0, label="Seed")
          samples_in = gr.Slider(1, MAX_SAMPLES, value=DEFAULT_SAMPLES, step=1, label="Samples")

      with gr.Column(elem_id="photo_section"):
        gr.Markdown("## 1. Photo")
        with gr.Row():
          with gr.Column():
            photo = gr.Image(label="Photo", type="numpy", format=PNG, interactive=False,
                             elem_id="photo", elem_classes=["pixelated"], height=320)
            with gr.Row():
              upload_photo = gr.UploadButton("Upload a photo", file_types=["image"],
                                             elem_id="upload_photo")
              segment_button = gr.Button("Segment", variant="primary", elem_id="segment")
            if self.examples:
              gr.Examples([[p] for p in self.examples], inputs=[photo], label="Or pick a photo",
                          examples_per_page=12)
          with gr.Column():
            overlay = gr.AnnotatedImage(label="Segmentation", color_map=colour_map, format=PNG,
                                        elem_id="overlay", elem_classes=["pixelated"], height=320)
            seg_files = gr.File(label="Segmentation files (class ids, picture)",
                                file_count="multiple", elem_id="seg_files")

      with gr.Column(elem_id="labels_section"):
        gr.Markdown("## 2. Label map")
        with gr.Row():
          with gr.Column(scale=3):
            gr.Markdown(f"Paint with the brush class. Strokes are snapped to the nearest class "
                        f"colour; '{IGNORE_NAME}' keeps the photo's own label when editing; the "
                        "eraser removes strokes.")
            editor = gr.ImageEditor(
                label="Label map", type="numpy",
                image_mode="RGBA", format=PNG, sources=(), transforms=(), layers=False,
                brush=self.brush(first), eraser=gr.Eraser(), elem_id="canvas",
                elem_classes=["pixelated"], height=420)
          with gr.Column(scale=2):
            brush_class = gr.Dropdown(self.brush_names, value=first, label="Brush class",
                                      filterable=True, elem_id="brush_class")
            gr.HTML(self.legend_html())
            with gr.Row():
              from_segmentation = gr.Button("Start from the segmentation", elem_id="from_seg")
              blank = gr.Button("Fill a canvas with the brush class", elem_id="blank")
              upload_labels = gr.UploadButton("Upload a label PNG", file_types=[".png"],
                                              elem_id="upload_labels")
            read_canvas = gr.Button("Read the canvas (as every operation below does)",
                                    elem_id="read_canvas")
            labels_view = gr.Image(label="Labels as the model reads them",
                                   format=PNG, interactive=False, elem_id="labels_view",
                                   elem_classes=["pixelated"], height=200)
            labels_file = gr.File(label="Label map file (class ids)", elem_id="labels_file",
                                  file_types=[".png"])

      with gr.Column(elem_id="results_section"):
        gr.Markdown("## 3. Synthesise, re-sample, style, edit")
        with gr.Tabs():
          with gr.Tab("Synthesise", id="synthesize"):
            synth_button = gr.Button("Synthesise", variant="primary", elem_id="synthesize")
            synth_gallery = gr.Gallery(label="Samples", format=PNG, columns=4, elem_id="samples",
                                       elem_classes=["pixelated"], height=300)
            synth_files = gr.File(label="Sample files", file_count="multiple")
          with gr.Tab("Re-sample", id="resample"):
            gr.Markdown("Paint over the first sample the region to re-sample, and/or choose "
                        "classes: every sample keeps its noise outside the region and draws new "
                        "noise inside it.")
            with gr.Row():
              region_editor = gr.ImageEditor(
                  label="Region to re-sample", type="numpy",
                  image_mode="RGBA", format=PNG, sources=(), transforms=(), layers=False,
                  brush=region_brush(), elem_id="region",
                  elem_classes=["pixelated"], height=300)
              with gr.Column():
                resample_classes = gr.Dropdown(self.names, multiselect=True, value=[],
                                               label="... and/or these classes")
                new_seed_in = gr.Number(value=seed + 1, precision=0,
                                        label="Seed of the region's new noise")
                resample_button = gr.Button("Re-sample", variant="primary", elem_id="resample")
            resample_gallery = gr.Gallery(label="Re-sampled", format=PNG, columns=4,
                                          elem_classes=["pixelated"], height=300)
            resample_files = gr.File(label="Re-sampled files", file_count="multiple")
          with gr.Tab("Style", id="style"):
            with gr.Row():
              with gr.Column():
                reference = gr.Image(label="Reference", type="numpy", format=PNG,
                                     interactive=False, elem_id="reference",
                                     elem_classes=["pixelated"], height=240)
                upload_reference = gr.UploadButton("Upload a reference image",
                                                   file_types=["image"])
                if self.examples:
                  gr.Examples([[p] for p in self.examples], inputs=[reference],
                              label="Or pick one", examples_per_page=12)
              with gr.Column():
                strength = gr.Slider(0.0, 1.0, value=sample.DEFAULT_STYLE_STRENGTH, step=0.05,
                                     label="Strength (1 = plain synthesis, 0 = the reference)")
                colour_transfer = gr.Checkbox(label="Colour transfer (match the reference's Lab "
                                                    "statistics)")
                style_button = gr.Button("Synthesise in this style", variant="primary",
                                         elem_id="style")
            style_gallery = gr.Gallery(label="Styled", format=PNG, columns=4,
                                       elem_classes=["pixelated"], height=300)
            style_files = gr.File(label="Styled files", file_count="multiple")
          with gr.Tab("Edit the photo", id="edit"):
            with gr.Row():
              edit_method = gr.Radio(list(sample.EDIT_METHODS), value="blend",
                                     label="Method (blend keeps the photo outside the edit)")
              edit_button = gr.Button("Edit the photo through the labels", variant="primary",
                                      elem_id="edit")
            edited = gr.Image(label="Edited photo", format=PNG, interactive=False,
                              elem_id="edited", elem_classes=["pixelated"], height=320)
            edit_files = gr.File(label="Edited files", file_count="multiple")

      model = dict(concurrency_id="model", concurrency_limit=1)  # one model call at a time
      labels_out = [labels_file, labels_view]
      upload_photo.upload(_errors(self.load_photo), upload_photo, photo, api_name="load_photo")
      segmented = [overlay, seg_files, editor, *labels_out]
      segment_button.click(_errors(self.segment), [photo, seg_steps_in, sampler_in, brush_class],
                           segmented, api_name="segment", **model)
      from_segmentation.click(_errors(self.segment),
                              [photo, seg_steps_in, sampler_in, brush_class], segmented,
                              api_visibility="private", **model)
      blank.click(_errors(self.blank_labels), [brush_class, photo], [editor, *labels_out],
                  api_name="blank_labels")
      upload_labels.upload(_errors(self.load_labels), [upload_labels, brush_class],
                           [editor, *labels_out], api_name="load_labels")
      brush_class.change(_errors(self.set_brush), [brush_class, labels_file], editor,
                         api_name="brush")
      snap = dict(fn=_errors(self.snap), inputs=editor, outputs=labels_out)
      read_canvas.click(**snap, api_name="labels")

      def then_snap(button, name, fn, inputs, outputs):
        """Snap the canvas, then run: every operation reads the labels as painted."""
        snapped = button.click(**snap, api_visibility="private")
        snapped.success(_errors(fn), inputs, outputs, api_name=name, **model)

      then_snap(synth_button, "synthesize", self.synthesize,
                [labels_file, samples_in, seed_in, synth_steps_in, sampler_in],
                [synth_gallery, synth_files, region_editor])
      then_snap(resample_button, "resample", self.resample,
                [labels_file, region_editor, resample_classes, samples_in, seed_in, new_seed_in,
                 synth_steps_in, sampler_in], [resample_gallery, resample_files])
      then_snap(style_button, "style", self.style,
                [labels_file, reference, strength, colour_transfer, samples_in, seed_in,
                 synth_steps_in, sampler_in], [style_gallery, style_files])
      then_snap(edit_button, "edit", self.edit,
                [photo, labels_file, edit_method, seg_steps_in, synth_steps_in, sampler_in],
                [edited, edit_files])
      upload_reference.upload(_errors(self.load_reference), upload_reference, reference,
                              api_name="load_reference")
    return demo


def _errors(fn):
  """Bad input (image_files.InputError) -> gr.Error: one line on the page, the server serves on."""
  import functools

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    try:
      return fn(*args, **kwargs)
    except image_files.InputError as e:
      raise gr.Error(str(e), print_exception=False) from None
  return wrapped


def launch(studio: Studio, host: str = "127.0.0.1", port: Optional[int] = None,
           auth=None, share: bool = False, block: bool = True, max_file_size: str = "100mb"):
  """Serve the page; returns (demo, local URL). With block=False the server runs in a thread
  (tests: close it with demo.close())."""
  demo = studio.build()
  demo.queue(default_concurrency_limit=1)
  _, url, _ = demo.launch(server_name=host, server_port=port, auth=auth, share=share,
                          prevent_thread_lock=True, show_error=True, quiet=True,
                          max_file_size=max_file_size, ssr_mode=False, mcp_server=False,
                          enable_monitoring=False, pwa=False, css=CSS, theme=THEME)
  if block:
    demo.block_thread()
  return demo, url


def is_loopback(host: str) -> bool:
  """Only this machine can reach `host` (127.0.0.0/8, ::1, localhost)."""
  if host == "localhost":
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:  # a host name: it resolves to some interface, maybe a public one
    return False


def exposure_warning(host: str, port: int, share: bool, auth) -> Optional[str]:
  """The loud warning for a page others can reach without a password (None otherwise)."""
  exposed = [] if is_loopback(host) else [f"{host}:{port}"]
  if share:
    exposed.append("a public gradio.live link")
  if not exposed or auth is not None:
    return None
  return OPEN_WARNING.format(where=" and ".join(exposed))


OPEN_WARNING = """
*************************************************************************************
  WARNING: the studio listens on {where} WITHOUT A PASSWORD.
  Anyone who can reach it can use this page: run the model on this machine's
  accelerators, upload files to it and download its results.
  Pass --password_file=FILE, or keep the default --host=127.0.0.1 and use an SSH tunnel.
*************************************************************************************
"""


def class_names(config) -> list:
  """The dataset's class names (each data module's table), or 'class_<i>' where it has none."""
  from semflow_jax.data import celebamask_hq, cityscapes, coco_stuff, synthetic
  tables = {"synthetic_scenes": synthetic.CLASS_NAMES,
            coco_stuff.CocoStuff.name: coco_stuff.CLASS_NAMES,
            cityscapes.CityscapesSemantic.name: cityscapes.CLASS_NAMES,
            celebamask_hq.CelebamaskHq.name: celebamask_hq.CLASS_NAMES}
  names = list(tables.get(config.data.name, ()))
  return [names[i] if i < len(names) else f"class_{i}" for i in range(config.data.num_classes)]


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_EXAMPLES = 12


def example_photos(config, examples: Optional[str], directory: str) -> list:
  """Local PNG paths of the photos to pick from: the image files in `examples` (a folder, local
  or gs://; the first 12 by name), or with none given and the built-in synthetic scenes, six
  validation scenes rendered from the dataset's seed (no dataset build needed)."""
  paths = []
  if examples:
    if not storage.is_dir(examples):
      raise image_files.InputError(f"--examples={examples}: not a folder")
    names = sorted(n for n in storage.listdir(examples) if n.lower().endswith(IMAGE_SUFFIXES))
    if not names:
      raise image_files.InputError(f"--examples={examples}: no image files "
                              f"({', '.join(IMAGE_SUFFIXES)})")
    for name in names[:MAX_EXAMPLES]:
      image = image_files.read_image(storage.join(examples, name))
      paths.append(os.path.join(directory, os.path.splitext(name)[0] + ".png"))
      images.write_png(paths[-1], image)
  elif config.data.name == "synthetic_scenes":
    from semflow_jax.data import synthetic
    size = config.data.image_size
    for i in range(6):
      image = synthetic.generate_example(config.data.seed, "validation", i, size)["image"]
      paths.append(os.path.join(directory, f"validation_{i}.png"))
      images.write_png(paths[-1], image)
  return paths


def from_workdir(config, workdir: str, ensemble: Sequence[str] = (),
                 examples: Optional[str] = None, max_side: int = 4096) -> Studio:
  """The studio over the latest checkpoint in `workdir` (with `ensemble`: their mean
  velocity)."""
  predictor = sample.Predictor.load(config, workdir, ensemble)
  workdirs = ", ".join(dict.fromkeys([workdir, *ensemble]))
  h, w = predictor.model.image_size
  space = "images (SD latent space)" if predictor.model.has_vae else "pixels"
  description = (f"`{workdirs}`: {config.data.name}, {config.data.num_classes} classes, "
                 f"{h}x{w} {space}, palette `{predictor.model.palette.name}`. Photos and label "
                 "maps of other sizes are resized to the model's and the results back.")
  studio = Studio(predictor, class_names(config), max_side=max_side, description=description)
  directory = os.path.join(studio.output_root, "examples")
  os.makedirs(directory)
  studio.examples = example_photos(config, examples, directory)
  return studio
