"""Do the docs' commands still parse? Every `python -m semflow_jax...` command, `launch/tpu.sh`
command, config path and config key in README.md and in the configs' docstrings is checked
against the code: the module's absl flags, the config file (loaded with its argument), the
config's keys. Flags are discovered from the module named in each command (imported in a fresh
process, since two entry points may define the same flag name), so new entry points and flags
need no change here.

  problems = check(text, "README.md")   # [] when everything parses; else "README.md:LINE: ..."
"""

import functools
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys

import ml_collections

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_LAUNCHER = "launch/tpu.sh"
# What `launch/tpu.sh <command> ... -- ARGS` hands ARGS to.
TPU_PASSTHROUGH = {"train": "semflow_jax.main", "build-data": "semflow_jax.data.build"}
CONFIG_PATH = re.compile(r"configs/[A-Za-z0-9_]+\.py(?::[A-Za-z0-9_]+)?")
OPERATORS = {"&&", "||", ";", "|", "&"}

# Runs the module as `python -m` does, with absl's app.run replaced by a dump of the flags
# defined by then (some entry points define their flags only when run as a program).
_DUMP_FLAGS = """
import json, runpy, sys
from absl import app, flags
def _dump(main, argv=None, **kwargs):
  print(json.dumps(sorted(flags.FLAGS)))
  raise SystemExit(0)
app.run = _dump
module = sys.argv[1]
sys.argv = [module]
runpy.run_module(module, run_name="__main__", alter_sys=True)
print(json.dumps(sorted(flags.FLAGS)))
"""


@functools.lru_cache(maxsize=None)
def module_flags(module: str) -> frozenset:
  """The flag names a `python -m <module>` command line accepts."""
  proc = subprocess.run([sys.executable, "-c", _DUMP_FLAGS, module], cwd=REPO,
                        capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  if proc.returncode != 0:
    raise ImportError(f"cannot import {module}: {proc.stderr.strip().splitlines()[-1:]}")
  return frozenset(json.loads(proc.stdout.strip().splitlines()[-1]))


@functools.lru_cache(maxsize=None)
def load_config(spec: str) -> ml_collections.ConfigDict:
  """`configs/x.py[:arg]` loaded as --config does (get_config(arg), or get_config())."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location(
      f"_docs_check_{os.path.basename(path)[:-3]}", os.path.join(REPO, path))
  module = importlib.util.module_from_spec(module_spec)
  if REPO not in sys.path:
    sys.path.insert(0, REPO)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def all_configs():
  """Every config file with each of its documented arguments."""
  specs = []
  for name in sorted(os.listdir(os.path.join(REPO, "configs"))):
    if name.endswith(".py") and name != "__init__.py":
      path = f"configs/{name}"
      with open(os.path.join(REPO, path)) as f:
        args = set(re.findall(rf"{re.escape(path)}:([A-Za-z0-9_]+)", f.read()))
      try:
        load_config(path)
      except (AttributeError, TypeError):  # a helper module (no get_config), not a config
        continue
      specs += [path] + [f"{path}:{a}" for a in sorted(args)]
  return specs


def has_key(config, dotted: str) -> bool:
  node = config
  for part in dotted.split("."):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
      return False
    node = node[part]
  return True


def _config_spec_error(spec):
  try:
    load_config(spec)
  except Exception as e:  # any failure to load is the problem to report
    return f"config {spec} does not load: {type(e).__name__}: {e}"
  return None


def _check_module_args(module, args):
  """Problems with `python -m module ARGS`."""
  try:
    known = module_flags(module)
  except ImportError as e:
    return [str(e)]
  problems, config_spec, overrides = [], None, []
  for arg in args:
    if not arg.startswith("--") or arg == "--":
      continue
    name, _, value = arg[2:].partition("=")
    if name == "config" and "config" in known:
      config_spec = value
    elif name.startswith("config.") and "config" in known:
      overrides.append(name[len("config."):])
    elif name not in known and not (name.startswith("no") and name[2:] in known):
      problems.append(f"python -m {module} has no flag --{name}")
  if overrides or config_spec:
    spec = config_spec or "configs/synthetic.py"  # semflow_jax.main's default
    error = _config_spec_error(spec)
    if error:
      problems.append(error)
    else:
      problems += [f"config {spec} has no key {key} (--config.{key})" for key in overrides
                   if not has_key(load_config(spec), key)]
  return problems


def _check_tpu_launcher(args):
  """`launch/tpu.sh COMMAND ...`: it runs with --dry_run, and its `--` part parses."""
  if not args:
    return ["launch/tpu.sh without a command"]
  command, rest = args[0], args[1:]
  split = rest.index("--") if "--" in rest else len(rest)
  proc = subprocess.run(["bash", os.path.join(REPO, TPU_LAUNCHER), command, "--dry_run",
                         *rest], capture_output=True, text=True, timeout=60, cwd=REPO)
  problems = []
  if proc.returncode != 0:
    problems.append(f"{TPU_LAUNCHER} {command} --dry_run fails: {proc.stderr.strip()[-300:]}")
  if command in TPU_PASSTHROUGH:
    problems += _check_module_args(TPU_PASSTHROUGH[command], rest[split + 1:])
  return problems


def _commands(tokens):
  """(kind, module or None, args) for each semflow_jax / launcher command in a token list."""
  found, i = [], 0
  while i < len(tokens):
    end = next((j for j in range(i, len(tokens)) if tokens[j] in OPERATORS), len(tokens))
    segment = tokens[i:end]
    for k, token in enumerate(segment):
      if (token.startswith("python") and segment[k + 1:k + 2] == ["-m"]
          and len(segment) > k + 2 and segment[k + 2].startswith("semflow_jax")):
        found.append(("module", segment[k + 2], segment[k + 3:]))
        break
      if token.endswith(TPU_LAUNCHER):
        found.append(("tpu", None, segment[k + 1:]))
        break
    i = end + 1
  return found


def _logical_lines(text):
  """(first line number, line) with backslash continuations joined."""
  out, start, parts = [], None, []
  for number, line in enumerate(text.splitlines(), 1):
    start = start or number
    if line.rstrip().endswith("\\"):
      parts.append(line.rstrip()[:-1])
      continue
    parts.append(line)
    out.append((start, " ".join(p.strip() for p in parts)))
    start, parts = None, []
  return out


def check(text: str, source: str) -> list:
  """Every problem in `text` (README.md or a config docstring), as "source:LINE: problem"."""
  problems = []
  sections = {k for k, v in load_config("configs/synthetic.py").items()
              if isinstance(v, ml_collections.ConfigDict)}
  key_pattern = re.compile(rf"^(?:--)?(?:config\.)?((?:{'|'.join(sorted(sections))})"
                           r"\.[A-Za-z0-9_.]*[A-Za-z0-9_])(?:=.*)?$")
  configs = [load_config(s) for s in all_configs()]

  def report(line, what, items):
    problems.extend(f"{source}:{line}: {item}  [{what.strip()[:160]}]" for item in items)

  def check_commands(line, code):
    try:
      tokens = shlex.split(code, comments=True)
    except ValueError as e:
      report(line, code, [f"does not parse as a shell command ({e})"])
      return
    for kind, module, args in _commands(tokens):
      report(line, code, _check_tpu_launcher(args) if kind == "tpu"
             else _check_module_args(module, args))

  # Fenced code blocks: shell commands, line by line.
  fence = re.compile(r"^[ \t]*```([a-z]*)\n(.*?)^[ \t]*```", re.M | re.S)
  for block in fence.finditer(text):
    first = text[:block.start()].count("\n") + 2
    if block.group(1) in ("bash", "sh", "shell", "console"):
      for offset, code in _logical_lines(block.group(2)):
        check_commands(first + offset - 1, code)
  prose = fence.sub(lambda m: "\n" * m.group(0).count("\n"), text)

  # Inline code spans: commands, config keys.
  for span in re.finditer(r"`([^`]+)`", prose):
    line = prose[:span.start()].count("\n") + 1
    code = " ".join(span.group(1).split())
    if "python -m semflow_jax" in code or (TPU_LAUNCHER in code and code != TPU_LAUNCHER):
      check_commands(line, code)
      continue
    key = key_pattern.match(code)
    if key and not any(has_key(c, key.group(1)) for c in configs):
      report(line, code, [f"no config has the key {key.group(1)}"])
  # Indented commands outside spans (the configs' docstrings).
  unspanned = re.sub(r"`[^`]+`", lambda m: re.sub(r"[^\n]", " ", m.group(0)), prose)
  for line, code in _logical_lines(unspanned):
    if "python -m semflow_jax" in code or TPU_LAUNCHER in code:
      check_commands(line, code[code.find("python -m") if "python -m" in code
                                else code.find(TPU_LAUNCHER):])

  # Config paths anywhere.
  for path in CONFIG_PATH.finditer(text):
    line = text[:path.start()].count("\n") + 1
    error = _config_spec_error(path.group(0))
    if error:
      report(line, path.group(0), [error])
  return sorted(set(problems), key=lambda p: (int(p.split(":")[1]), p))


def config_docstrings():
  """(source name, docstring) of every config file, line numbers as in the file."""
  out = []
  for name in sorted(os.listdir(os.path.join(REPO, "configs"))):
    if name.endswith(".py"):
      with open(os.path.join(REPO, "configs", name)) as f:
        source = f.read()
      match = re.match(r'\s*"""(.*?)"""', source, re.S)
      if match:
        out.append((f"configs/{name}", "\n" * source[:match.start(1)].count("\n")
                    + match.group(1)))
  return out
