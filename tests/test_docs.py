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
