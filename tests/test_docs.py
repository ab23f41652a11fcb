"""The docs' commands, config paths and config keys parse (tests/docs_check.py)."""

import os

import pytest

from tests import docs_check
from tests.conftest import REPO


def _readme():
  with open(os.path.join(REPO, "README.md")) as f:
    return f.read()


def test_readme_commands_configs_and_keys_parse():
  problems = docs_check.check(_readme(), "README.md")
  assert not problems, "\n".join(problems)


@pytest.mark.parametrize("source,text", docs_check.config_docstrings())
def test_config_docstring_commands_parse(source, text):
  problems = docs_check.check(text, source)
  assert not problems, "\n".join(problems)


def test_the_readme_opens_with_the_main_job_and_the_test_suite():
  blocks = [b.split("```", 1)[0].strip() for b in _readme().split("```bash\n")[1:3]]
  assert blocks[0].endswith("python -m semflow_jax.main --config=configs/synthetic.py "
                            "--workdir=runs/synthetic")
  assert blocks[1].endswith("python -m pytest -q -n 2 --dist loadfile tests")
  with open(os.path.join(REPO, ".ci", "run")) as f:
    ci = f.read()
  assert blocks[1] in ci, "CI must run the README's test command verbatim"


def _line_of(text, needle):
  """The line where the command holding `needle` starts (continuations end with a backslash)."""
  lines = text[:text.index(needle)].split("\n")
  while len(lines) > 1 and lines[-2].rstrip().endswith("\\"):
    lines.pop()
  return len(lines)


def test_a_broken_readme_fails_naming_each_broken_line():
  readme = _readme()
  breakages = {  # a typo in a flag, a config argument, an override key, a prose key, a launcher
      "--mode=segment --input=photo.png": "--mode=segment --inputt=photo.png",
      "configs/synthetic.py:tiny --": "configs/synthetic.py:tinyy --",
      "--config.train.num_steps=300": "--config.train.num_stepz=300",
      "`train.log_every`": "`train.log_evry`",
      "launch/tpu.sh logs --name=semflow": "launch/tpu.sh logz --name=semflow",
  }
  broken = readme
  for good, bad in breakages.items():
    assert good in broken, good
    broken = broken.replace(good, bad, 1)
  problems = docs_check.check(broken, "README.md")
  expected = {
      _line_of(broken, "--inputt=photo.png"): "has no flag --inputt",
      _line_of(broken, "configs/synthetic.py:tinyy"): "config configs/synthetic.py:tinyy does "
                                                       "not load",
      _line_of(broken, "--config.train.num_stepz"): "has no key train.num_stepz",
      _line_of(broken, "`train.log_evry`"): "no config has the key train.log_evry",
      _line_of(broken, "launch/tpu.sh logz"): "launch/tpu.sh logz --dry_run fails",
  }
  for line, message in expected.items():
    assert any(p.startswith(f"README.md:{line}: ") and message in p for p in problems), (
        line, message, problems)
  assert len({p.split(":")[1] for p in problems}) == len(expected), problems


def _design():
  with open(os.path.join(REPO, "docs", "DESIGN.md")) as f:
    return f.read()


def test_the_design_doc_commands_configs_and_keys_parse():
  problems = docs_check.check(_design(), "docs/DESIGN.md")
  assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", ["README.md", "docs/DESIGN.md"])
def test_every_module_function_key_and_flag_the_docs_name_exists(name):
  with open(os.path.join(REPO, name)) as f:
    problems = docs_check.check_names(f.read(), name)
  assert not problems, "\n".join(problems)


def test_the_readme_layout_names_every_module():
  layout = _readme().split("## Layout", 1)[1].split("```", 2)[1]
  modules = [name for folder in ("semflow_jax", os.path.join("semflow_jax", "data"))
             for name in sorted(os.listdir(os.path.join(REPO, folder)))
             if name.endswith(".py") and name != "__init__.py"]
  missing = [m for m in modules if m not in layout]
  assert not missing, f"README.md's layout does not name {missing}"


def test_a_stale_statement_fails_naming_its_line():
  design = _design()
  breakages = {  # statements the docs once made, put back
      "`config.model.init_from` (converted weights)": "`config.init_from` (converted weights)",
      "`flow.network_evaluations(steps, method)`": "`flow.evaluations(steps, method)`",
      "`Evaluator.compile`": "`Evaluator.precompile`",
      "`--mode=eval` on a": "`--modes=eval` on a",
      "`semflow_jax/models/sd_unet.py`": "`semflow_jax/models/sd_unet2.py`",
  }
  broken = design
  for good, bad in breakages.items():
    assert good in broken, good
    broken = broken.replace(good, bad, 1)
  problems = docs_check.check_names(broken, "docs/DESIGN.md")
  expected = {
      _line_of(broken, "`config.init_from`"): "no config has the key init_from",
      _line_of(broken, "`flow.evaluations("): "semflow_jax.flow has no evaluations",
      _line_of(broken, "`Evaluator.precompile`"): "class Evaluator has no attribute precompile",
      _line_of(broken, "`--modes=eval`"): "no entry point or launcher has the flag --modes",
      _line_of(broken, "sd_unet2.py"): "no file or folder semflow_jax/models/sd_unet2.py",
  }
  for line, message in expected.items():
    assert any(p.startswith(f"docs/DESIGN.md:{line}: ") and message in p for p in problems), (
        line, message, problems)
  assert len(problems) == len(expected), problems
