"""Do the docs' commands still parse? Every `python -m semflow_jax...` command, `launch/tpu.sh`
command, config path and config key in README.md and in the configs' docstrings is checked
against the code: the module's absl flags, the config file (loaded with its argument), the
config's keys. Flags are discovered from the module named in each command (imported in a fresh
process, since two entry points may define the same flag name), so new entry points and flags
need no change here.

  problems = check(text, "README.md")   # [] when everything parses; else "README.md:LINE: ..."

`check_names` (below) holds the prose to the code: paths, `module.function` names, config keys
and flags that README.md and docs/DESIGN.md name must exist.
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
    if key and (key.group(1).endswith(FILE_SUFFIXES) or (
        _is_project_name(key.group(1)) and not _dotted_problem(key.group(1)))):
      continue  # a file (`train.py`) or the code's name (`sample.segment_many`): check_names
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


# -- Names in prose: modules, `module.function`, config keys, flags ------------------------------
# What `check_names` reads in README.md and docs/DESIGN.md: every path under the repository's
# folders (and every bare `name.py` / `name.sh`), every backticked dotted name whose first part
# is one of the project's modules or classes (`runtime.start_job`, `SemFlow.velocity`,
# `evaluators.common.sum_over_processes`), every backticked `config.key` and `section.key`, and
# every backticked `--flag`. Names of other libraries (`jax.jit`, `optax.multi_transform`) are not
# checked: the first part decides.

REPO_FOLDERS = ("semflow_jax", "configs", "benchmarks", "tests", "launch", "docs")
# Entry points whose absl flags a `--flag` in prose may name.
ENTRY_POINTS = ("semflow_jax.main", "semflow_jax.studio", "semflow_jax.plan",
                "semflow_jax.export", "semflow_jax.convert", "semflow_jax.convert_eval_nets",
                "semflow_jax.data.build")
# Flags of other programs that the docs name, with whose they are.
EXTERNAL_FLAGS = {
    "": "the `--` that ends a launcher's own options",
    "signal": "SLURM's sbatch --signal",
    "node-count": "gcloud's queued-resources create",
    "node-prefix": "gcloud's queued-resources create",
    "worker": "gcloud's tpu-vm ssh",
}
EXTERNAL_FLAG_PREFIXES = ("xla_",)  # XLA's own flags (XLA_FLAGS)
# Paths the docs name that are examples, not files of the repository.
EXAMPLE_PATHS = {
    "semflow_jax/evaluators/brightness.py": "docs/DESIGN.md's example of adding a metric",
}
# Files of other projects that the docs name (DESIGN's notes on the codebases it learns from).
OTHER_PROJECTS_FILES = {"sampling.py": "score_sde's sampler"}
_PATH = re.compile(rf"(?<![\w/.-])((?:{'|'.join(REPO_FOLDERS)})/[\w./-]*[\w/])")
_BARE_FILE = re.compile(r"(?<![\w/.<-])([A-Za-z_][\w]*\.(?:py|sh))\b")
# A dotted name ending so is a file's name (`config.json`), which the path checks cover.
FILE_SUFFIXES = (".py", ".sh", ".json", ".jsonl", ".npz", ".npy", ".png", ".md", ".txt", ".bin",
                 ".pth", ".safetensors", ".lock", ".toml", ".gz", ".pyi")
_DOTTED = re.compile(r"^([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)(?:\(.*\))?$")


@functools.lru_cache(maxsize=None)
def code_index():
  """({dotted module: names defined at its top level}, {class name: its attribute names}) of
  every module under semflow_jax/, read with `ast` (nothing is imported)."""
  import ast
  modules, classes = {}, {}
  root = os.path.join(REPO, "semflow_jax")
  for folder, _, files in os.walk(root):
    for name in files:
      if not name.endswith(".py"):
        continue
      path = os.path.join(folder, name)
      parts = os.path.relpath(path, REPO)[:-3].split(os.sep)
      dotted = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
      with open(path) as f:
        tree = ast.parse(f.read())
      names = modules.setdefault(dotted, set())
      for node in tree.body:
        names.update(_defined(node))
        if isinstance(node, ast.ClassDef):
          attributes = classes.setdefault(node.name, set())
          for item in node.body:
            attributes.update(_defined(item))
          for item in ast.walk(node):  # self.x = ... in its methods
            if (isinstance(item, (ast.Assign, ast.AnnAssign)) and
                any(isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name)
                    and t.value.id == "self"
                    for t in (item.targets if isinstance(item, ast.Assign) else [item.target]))):
              attributes.update(t.attr for t in (item.targets if isinstance(item, ast.Assign)
                                                 else [item.target])
                                if isinstance(t, ast.Attribute))
  for dotted in list(modules):  # a package's submodules are its attributes
    if "." in dotted:
      parent, _, child = dotted.rpartition(".")
      modules.setdefault(parent, set()).add(child)
  return modules, classes


def _defined(node) -> set:
  """Names a top-level (or class-level) statement defines."""
  import ast
  if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
    return {node.name}
  if isinstance(node, ast.Assign):
    return {n.id for t in node.targets for n in ast.walk(t) if isinstance(n, ast.Name)}
  if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
    return {node.target.id}
  if isinstance(node, (ast.Import, ast.ImportFrom)):
    return {(a.asname or a.name).split(".")[0] for a in node.names}
  if isinstance(node, (ast.If, ast.Try, ast.With)):
    body = list(node.body) + list(getattr(node, "orelse", [])) + [
        s for h in getattr(node, "handlers", []) for s in h.body]
    return set().union(*(_defined(s) for s in body)) if body else set()
  return set()


def _dotted_problem(name: str):
  """None if `name` (a.b.c) resolves in the code, or if its first part is not the project's;
  else what does not exist."""
  modules, classes = code_index()
  parts = name.split(".")
  # The longest prefix naming a module: semflow_jax.x.y, x.y (semflow_jax.x.y) or a module's
  # last parts (common -> semflow_jax.evaluators.common).
  for n in range(len(parts), 0, -1):
    prefix = ".".join(parts[:n])
    found = [m for m in modules if m == prefix or m.endswith("." + prefix)]
    if found:
      break
  else:
    if parts[0] in classes:
      return None if parts[1] in classes[parts[0]] else (
          f"class {parts[0]} has no attribute {parts[1]}")
    return None  # another library's name, or a variable
  rest = parts[n:]
  if not rest:
    return None
  if not any(rest[0] in modules[m] for m in found):
    return f"{' / '.join(sorted(found))} has no {rest[0]}"
  if len(rest) > 1 and rest[0] in classes and rest[1] not in classes[rest[0]]:
    return f"class {rest[0]} has no attribute {rest[1]}"
  return None


def _is_project_name(name: str) -> bool:
  """Does `name`'s first part name one of the project's modules or classes?"""
  modules, classes = code_index()
  first = name.split(".")[0]
  return first in classes or any(m == "semflow_jax." + first or m.endswith("." + first)
                                 or m == first for m in modules)


@functools.lru_cache(maxsize=None)
def _known_flags() -> frozenset:
  flags = set()
  for module in ENTRY_POINTS:
    flags |= module_flags(module)
  for name in os.listdir(os.path.join(REPO, "launch")):
    with open(os.path.join(REPO, "launch", name)) as f:
      flags |= set(re.findall(r"--([a-z][a-z_]*)", f.read()))
  return frozenset(flags)


@functools.lru_cache(maxsize=None)
def _repo_files() -> frozenset:
  out = set()
  for folder in REPO_FOLDERS:
    for _parent, dirs, files in os.walk(os.path.join(REPO, folder)):
      dirs[:] = [d for d in dirs if d != "__pycache__"]
      out.update(files)
  return frozenset(out)


def check_names(text: str, source: str) -> list:
  """Every name in `text` that the code does not have, as "source:LINE: problem"."""
  problems = []
  configs = [load_config(s) for s in all_configs()]
  sections = {k for k, v in load_config("configs/synthetic.py").items()
              if isinstance(v, ml_collections.ConfigDict)}

  def line_of(offset):
    return text[:offset].count("\n") + 1

  for match in _PATH.finditer(text):
    path = match.group(1).rstrip("/.")
    if "<" in path or path in EXAMPLE_PATHS:
      continue
    if not os.path.exists(os.path.join(REPO, path)):
      problems.append(f"{source}:{line_of(match.start())}: no file or folder {path}")
  for match in _BARE_FILE.finditer(text):
    if match.group(1) in OTHER_PROJECTS_FILES:
      continue
    if match.group(1) not in _repo_files() and not any(
        p.endswith("/" + match.group(1)) for p in EXAMPLE_PATHS):
      problems.append(f"{source}:{line_of(match.start())}: no file named {match.group(1)}")
  fence = re.compile(r"^[ \t]*```([a-z]*)\n(.*?)^[ \t]*```", re.M | re.S)
  prose = fence.sub(lambda m: "\n" * m.group(0).count("\n"), text)  # commands: `check`
  for span in re.finditer(r"`([^`]+)`", prose):
    code = " ".join(span.group(1).split())
    line = prose[:span.start()].count("\n") + 1  # prose keeps text's lines, not its offsets
    dotted = _DOTTED.match(code)
    if dotted and not dotted.group(1).endswith(FILE_SUFFIXES):
      name = dotted.group(1)
      first = name.split(".")[0]
      if first == "config":
        if not any(has_key(c, name[len("config."):]) for c in configs):
          problems.append(f"{source}:{line}: no config has the key {name[7:]} (`{code}`)")
        continue
      problem = _dotted_problem(name)
      if first in sections and not any(has_key(c, name) for c in configs) and (
          problem or not _is_project_name(name)):
        problems.append(f"{source}:{line}: no config has the key {name} and the code has no "
                        f"{name} (`{code}`)")
      elif problem and not (first in sections and any(has_key(c, name) for c in configs)):
        problems.append(f"{source}:{line}: {problem} (`{code}`)")
      continue
    if not code.startswith("--"):
      continue  # a command of another program (`tensorboard --logdir ...`): its flags are its own
    for flag in re.findall(r"(?:^|\s)--([A-Za-z_][\w-]*|)(?==|\s|$)", code):
      if (flag.startswith("config") or flag in EXTERNAL_FLAGS
          or flag.startswith(EXTERNAL_FLAG_PREFIXES)):
        continue
      known = _known_flags()
      if flag not in known and not (flag.startswith("no") and flag[2:] in known):
        problems.append(f"{source}:{line}: no entry point or launcher has the flag --{flag}")
  return sorted(set(problems), key=lambda p: (int(p.split(":")[1]), p))
