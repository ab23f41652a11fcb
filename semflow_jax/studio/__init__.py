"""The studio: segment, paint, synthesise, re-sample, style and edit in the browser.

  python -m semflow_jax.studio --config=configs/synthetic.py --workdir=runs/synthetic

A Gradio page over one trained checkpoint (or an ensemble), loaded once, with its programs
compiled once (`sample.Predictor`, the same functions the file CLI calls). `app.py` is the page,
`canvas.py` the label map <-> painting canvas conversions, `__main__.py` the command line.
Gradio is the `studio` extra (`pip install -e ".[studio]"`): nothing else imports this package.
"""

_APP = ("Studio", "class_names", "from_workdir", "launch")


def __getattr__(name):
  """`semflow_jax.studio.Studio` etc. from app.py, imported on first use: `python -m
  semflow_jax.studio` with a bad flag answers before Gradio and JAX load (seconds)."""
  if name in _APP:
    from semflow_jax.studio import app
    return getattr(app, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
