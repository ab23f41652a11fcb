"""Flag parsing shared by the entry points that take --config (main, studio, plan, export): a
bad command line ends in one line, `error: ...`, naming the flag, file or key, and exit 2.

  app.run(main, flags_parser=cli.parse_flags)

ml_collections reports a --config file it cannot find only when the config is first used (a
traceback of 36 lines), a config whose get_config raises as a traceback inside the flag error,
and an override naming no key as an AttributeError or KeyError: each becomes one line here.
"""

import ast
import dataclasses
import difflib
import os
import re
import sys
from typing import Callable, NoReturn, Optional, Sequence

from absl import app, flags

# The repository holding this package: where the README's `configs/...` paths live.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fail(message: str) -> NoReturn:
  """`error: <message>` on stderr, exit 2: a command line or input that cannot be used."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(2)


def _config_arg(argv) -> Optional[str]:
  """The --config value on this command line (the last one wins, as in absl), else the flag's
  default; None when neither (a required --config is then absl's to report)."""
  value = None
  args = argv[1:]
  for i, arg in enumerate(args):
    if arg == "--":
      break
    for prefix in ("--config=", "-config="):
      if arg.startswith(prefix):
        value = arg[len(prefix):]
    if arg in ("--config", "-config") and i + 1 < len(args):
      value = args[i + 1]
  if value is None and "config" in flags.FLAGS and flags.FLAGS["config"].default is not None:
    try:
      default = ast.literal_eval(flags.FLAGS["config"].default_as_str or "None")
    except (ValueError, SyntaxError):
      default = None
    value = default if isinstance(default, str) else None
  return value


def check_config_file(spec: str) -> Optional[str]:
  """The problem with a `--config=path[:argument]` whose file does not exist, in one line
  (where config paths are looked for, and the nearest existing config), or None."""
  path = spec.split(":", 1)[0]
  if not path or os.path.isfile(path):
    return None
  hints = []
  in_repo = os.path.join(_REPO, path)
  if not os.path.isabs(path) and os.path.isfile(in_repo):
    hints.append(f"did you mean {in_repo}?")
  else:
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder) and not os.path.isabs(path):
      folder = os.path.join(_REPO, os.path.dirname(path))
    if os.path.isdir(folder):
      names = sorted(n for n in os.listdir(folder) if n.endswith(".py") and n != "__init__.py")
      close = difflib.get_close_matches(os.path.basename(path), names, n=1)
      if close:
        nearest = os.path.join(os.path.dirname(path), close[0])
        if not os.path.isfile(nearest):
          nearest = os.path.join(folder, close[0])
        hints.append(f"did you mean {nearest}?")
  where = ("" if os.path.isabs(path) else
           f" (a relative path is read from the current directory, {os.getcwd()}: run from the "
           f"repository root or give the path to the config file)")
  return f"--config={spec}: no such config file{where}" + (f"; {hints[0]}" if hints else "")


def _override_error(argv, text: str) -> str:
  """An override naming no key of the config, as `--config.a.b=v: the config has no key a.b
  (did you mean ...?)` from ml_collections' message."""
  hint = re.search(r'Did you mean "(\w+)" instead of "(\w+)"', text)
  name = hint.group(2) if hint else next(iter(re.findall(r"\w+", text)), "?")
  for arg in argv[1:]:
    path = arg.split("=", 1)[0][len("--config."):].split(".")
    if arg.startswith("--config.") and name in path:
      key = ".".join(path[:path.index(name) + 1])
      guess = ".".join(path[:path.index(name)] + [hint.group(1)]) if hint else None
      return (f"{arg}: the config has no key {key}" +
              (f" (did you mean {guess}?)" if guess else ""))
  return f"a --config. override names no key of the config: {text}"


def _flag_error(e: flags.Error) -> str:
  """absl's message in one line: a config file's traceback reduced to its last line."""
  text = str(e)
  required = re.search(r"Flag --(\w+) must have a value other than None", text)
  if required:
    return f"--{required.group(1)} is required"
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  if len(lines) > 1 and "Traceback" in text:  # get_config raised: what it said
    head = re.match(r"flag (--config\S*): ", lines[0])
    said = re.sub(r"^\w+(Error|Exception): ", "", lines[-1])
    return f"{head.group(1) if head else lines[0]}: {said}"
  return " ".join(lines)


def parse_flags(argv):
  """absl's flag parsing (app.run's flags_parser), each bad command line as one line, exit 2."""
  spec = _config_arg(argv)
  if spec:
    problem = check_config_file(spec)
    if problem:
      fail(problem)
  try:
    rest = flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:  # an override names no key
    fail(_override_error(argv, str(e)))
  except flags.Error as e:
    fail(_flag_error(e))
  if len(rest) > 1:
    fail(f"unexpected arguments {rest[1:]} (flags are written --name=value; --help lists "
          "them)")
  return rest


@dataclasses.dataclass(frozen=True)
class ShardFlags:
  """--processes, --num_workers, --worker_index, --examples_per_shard (`define_shard_flags`)."""
  processes: flags.FlagHolder
  num_workers: flags.FlagHolder
  worker_index: flags.FlagHolder
  examples_per_shard: flags.FlagHolder

  def options(self) -> dict:
    """Their values as keyword arguments (records.build, encode.encode_latents take them);
    app.UsageError where they do not make sense."""
    if not 0 <= self.worker_index.value < self.num_workers.value:
      raise app.UsageError(f"--worker_index={self.worker_index.value} is not in [0, "
                           f"--num_workers={self.num_workers.value})")
    if self.processes.value < 1 or self.examples_per_shard.value < 1:
      raise app.UsageError("--processes and --examples_per_shard must be at least 1")
    return {f.name: getattr(self, f.name).value for f in dataclasses.fields(self)}


def define_shard_flags(verb: str, job: str, committed: str) -> ShardFlags:
  """The flags of a command that writes ArrayRecord shards on several processes and machines
  (data.build: `verb` 'writing', `job` 'build', `committed` 'dataset'; data.encode: 'encoding',
  'encode', 'latents')."""
  return ShardFlags(
      flags.DEFINE_integer("processes", 1, f"Local processes {verb} shards at once."),
      flags.DEFINE_integer("num_workers", 1, f"Machines sharing the {job} (each runs this "
                           "command with its --worker_index)."),
      flags.DEFINE_integer("worker_index", 0, "This machine's index in [0, num_workers); "
                           f"worker 0 commits the {committed}."),
      flags.DEFINE_integer("examples_per_shard", 1000, "Examples per ArrayRecord file (at most)."),
  )


def define_output_flags(output_help: str, overwrite_help: str) -> None:
  """The converters' --output (required when run) and --overwrite."""
  flags.DEFINE_string("output", None, output_help)
  flags.DEFINE_bool("overwrite", False, overwrite_help)


def run_converter(convert: Callable[..., str], input_flags: Sequence[str]) -> None:
  """The converters' main(): `convert(--output, *input flags, --overwrite)` after checking every
  path (a bucket that cannot be used is reported now, not after minutes of converting); a bad
  input ends in one line, `error: ...`, and exit 2."""
  from semflow_jax import runtime, storage
  from semflow_jax.checkpoint import ConversionError
  runtime.configure_process()  # converting needs no TPU: no TPU start-up without TPUs
  f = flags.FLAGS
  if not f.output:
    raise app.UsageError("--output is required")
  try:
    storage.check(f.output, "--output", write=True)
    for name in input_flags:
      storage.check(getattr(f, name), f"--{name}")
    convert(f.output, *(getattr(f, name) for name in input_flags), f.overwrite)
  except (ConversionError, FileNotFoundError, storage.StorageError) as e:
    fail(str(e))
