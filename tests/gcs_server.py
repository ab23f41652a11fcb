"""A Google Cloud Storage server on localhost for the tests: gcp-storage-emulator, in memory.

  python -m tests.gcs_server --port=PORT --bucket=NAME [--read_log=FILE]  # prints "ready"

With --read_log, the name of every object downloaded is appended to FILE, one line per
download (the tests count what a reader fetched).

Three fidelity fixes:
- GCS sends `x-goog-generation` with every object download and tensorstore (which Orbax writes
  and reads array data with) refuses a download without it ("Malformed StorageGeneration"); the
  emulator leaves it out, so it is added here.
- GCS answers a suffix range (`Range: bytes=-N`, the last N bytes), which ArrayRecord's reader
  (google-cloud-cpp, `CLOUD_STORAGE_EMULATOR_ENDPOINT`) asks for to read a file's footer; the
  emulator knows only `bytes=A-[B]` and sends the whole object, so a suffix is rewritten as that.
- GCS serves many clients at once. The emulator's single-threaded HTTP server serves one
  connection at a time, so one client's keep-alive connection (tensorstore and gcsfs pool them)
  starves every other client; here each connection gets a thread, and requests still run one at
  a time against the emulator's in-memory store.
"""

import argparse
import http.server
import re
import sys
import threading
import time

from gcp_storage_emulator import server
from gcp_storage_emulator.handlers import objects

_download = objects.download
_read_log = None  # a file object, with --read_log


def _download_with_generation(request, response, storage, *args, **kwargs):
  headers = request._request_handler.headers
  suffix = re.fullmatch(r"\s*bytes=-([0-9]+)\s*", headers.get("range", "") or "")
  if suffix:
    try:
      size = len(storage.get_file(request.params["bucket_name"], request.params["object_id"]))
    except Exception:  # not found: the download below answers 404
      size = None
    if size is not None:
      del headers["range"]
      headers["range"] = f"bytes={max(0, size - int(suffix.group(1)))}-"
  _download(request, response, storage, *args, **kwargs)
  if _read_log is not None:
    _read_log.write(request.params["object_id"] + "\n")
    _read_log.flush()
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
  except Exception:  # not found: the emulator already answered 404
    return
  response["x-goog-generation"] = str(obj["generation"])
  response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))


objects.download = _download_with_generation  # objects.get(alt=media) calls it by name

_one_at_a_time = threading.Lock()


def _serialised(method):
  def handle(self):
    with _one_at_a_time:
      return method(self)
  return handle


for _verb in ("GET", "POST", "PUT", "DELETE", "PATCH"):
  setattr(server.RequestHandler, f"do_{_verb}",
          _serialised(getattr(server.RequestHandler, f"do_{_verb}")))
server.server.HTTPServer = http.server.ThreadingHTTPServer  # what APIThread instantiates
server.HANDLERS = tuple(
    (regex, {method: (_download_with_generation if handler is _download else handler)
             for method, handler in handlers.items()})
    for regex, handlers in server.HANDLERS)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--bucket", required=True)
  parser.add_argument("--read_log")
  args = parser.parse_args()
  global _read_log
  if args.read_log:
    _read_log = open(args.read_log, "a")
  gcs = server.create_server("127.0.0.1", args.port, in_memory=True, default_bucket=args.bucket)
  gcs.start()
  print("ready", flush=True)
  try:
    while True:
      time.sleep(1)
  finally:
    gcs.stop()


if __name__ == "__main__":
  sys.exit(main())
