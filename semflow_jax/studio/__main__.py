"""python -m semflow_jax.studio: the studio's page over a trained checkpoint.

  python -m semflow_jax.studio --config=configs/synthetic.py --workdir=runs/synthetic
  python -m semflow_jax.studio --config=configs/coco_stuff.py --workdir=gs://bucket/runs/coco \
      --examples=gs://bucket/photos --ensemble=gs://bucket/runs/coco_seed1

Serves on 127.0.0.1 (this machine only) unless --host says otherwise; on a TPU VM, reach it
through an SSH tunnel (README: The studio). Another --host needs --password_file, or it prints
that anyone on the network can use the page. No public share link unless --share.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from semflow_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", "configs/synthetic.py",
                                          "Config file, optionally with :argument.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The run whose latest checkpoint to load "
                               "(local or gs://).")
_ENSEMBLE = flags.DEFINE_list("ensemble", [], "More workdirs whose latest checkpoints join "
                              "--workdir's; the velocity is their mean.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on. 127.0.0.1: this "
                            "machine only (use an SSH tunnel from elsewhere); 0.0.0.0: every "
                            "network interface.")
_PORT = flags.DEFINE_integer("port", 7860, "Port to listen on.")
_PASSWORD_FILE = flags.DEFINE_string("password_file", None, "A file whose first line is the "
                                     "password the page asks for (user name 'studio'); a file, "
                                     "not a flag value, so it stays out of `ps` and shell "
                                     "history.")
_SHARE = flags.DEFINE_bool("share", False, "Also open a public *.gradio.live link through "
                           "Gradio's relay (anyone with the link can use the page).")
_EXAMPLES = flags.DEFINE_string("examples", None, "A folder of photos to pick from (local or "
                                "gs://); default for the synthetic scenes: six validation "
                                "scenes.")
_MAX_SIDE = flags.DEFINE_integer("max_side", 4096, "Largest photo or label map side accepted.")
_WARMUP = flags.DEFINE_bool("warmup", True, "Compile segment, synthesize and edit at the "
                            "default settings before the page opens.")
flags.mark_flags_as_required(["workdir"])

def read_password(path: str) -> str:
  from semflow_jax import storage
  if not storage.is_file(path):
    raise ValueError(f"--password_file={path}: no such file")
  lines = storage.read_text(path).splitlines()
  password = lines[0].strip() if lines else ""
  if not password:
    raise ValueError(f"--password_file={path}: the first line is empty")
  return password


def check_port(host: str, port: int) -> None:
  """Raise ValueError (one line) when `host:port` cannot be served: before the model loads and
  its programs compile, not after (a second studio on the default port, say)."""
  import socket
  try:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
  except OSError as e:
    raise ValueError(f"--host={host}: cannot resolve it ({e})") from None
  family, kind, proto, _, address = infos[0]
  with socket.socket(family, kind, proto) as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
    try:
      s.bind(address)
    except OSError as e:
      raise ValueError(f"--port={port}: cannot listen on {host}:{port} ({e.strerror}; another "
                       "studio or server uses it?): pass another --port") from None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from semflow_jax import checkpoint, runtime, storage
  # Before JAX starts; the cache is the user's, as for sampling (the workdir may be read-only).
  runtime.configure_process(_CONFIG.value, None)
  try:
    auth = ("studio", read_password(_PASSWORD_FILE.value)) if _PASSWORD_FILE.value else None
    check_port(_HOST.value, _PORT.value)
  except ValueError as e:  # before JAX and Gradio load
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  from semflow_jax.studio import app as studio_app
  try:
    storage.check(_WORKDIR.value, "--workdir")
    for workdir in _ENSEMBLE.value:
      storage.check(workdir, "--ensemble")
    studio = studio_app.from_workdir(_CONFIG.value, _WORKDIR.value, _ENSEMBLE.value,
                                     _EXAMPLES.value, _MAX_SIDE.value)
  except (ValueError, FileNotFoundError, checkpoint.IncompatibleCheckpointError,
          storage.StorageError) as e:  # image_files.InputError is a ValueError
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  try:
    if _WARMUP.value:
      logging.info("studio: compiling the default programs (once)")
      studio.warm_up(num_samples=studio_app.DEFAULT_SAMPLES)
    warning = studio_app.exposure_warning(_HOST.value, _PORT.value, _SHARE.value, auth)
    if warning:
      print(warning, file=sys.stderr, flush=True)
    demo, url = studio_app.launch(studio, _HOST.value, _PORT.value, auth=auth,
                                  share=_SHARE.value, block=False)
    print(f"studio: serving on {url}" + (" (user 'studio', password from --password_file)"
                                          if auth else ""), flush=True)
    demo.block_thread()
  finally:
    studio.close()


if __name__ == "__main__":
  # Before Gradio and TensorFlow load: no usage statistics sent anywhere, no C++ INFO chatter.
  os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
  os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  app.run(main, flags_parser=cli.parse_flags)
