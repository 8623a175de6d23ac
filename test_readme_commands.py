"""The commands of the README and the docs run as written after `make test`: each is tried with a
stand-in for the long part (make -n for make; the parser and the resolved config for a training;
--help for a subcommand)."""

import glob
import os
import re
import shlex

import pytest

import projkd
from conftest import HERE, make

DOCS = ["README.md"] + sorted(
    os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "docs", "*.md"))
)
VENV_PYTHON = (
    ".venv/bin/python"  # what `make test` makes, with no PY given (the Makefile's VENV_PY)
)


def commands(doc):
    """Each command of the doc's bash blocks, without its comment; a line ending in a backslash
    continues on the next."""
    text = open(os.path.join(HERE, doc)).read()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        block = block.replace("\\\n", " ")
        for line in block.splitlines():
            command = re.sub(r"\s+#.*$", "", line).strip()
            if command and not command.startswith("#"):
                lines.append(command)
    return lines


ALL = [(doc, c) for doc in DOCS for c in commands(doc)]


def test_the_docs_name_the_python_that_make_test_makes():
    assert (
        re.search(r"^VENV_PY := (.*)$", open(os.path.join(HERE, "Makefile")).read(), re.M)[1]
        == VENV_PYTHON
    )
    bare = [(doc, c) for doc, c in ALL if re.match(r"(srun )?python3? \S+\.py", c)]
    assert not bare  # `python` after the set-up has no torch: the venv's is named
    readme = [c for doc, c in ALL if doc == "README.md"]
    assert readme[:2] == ["make test", "make smoke"]  # the set-up, then a first result


@pytest.mark.parametrize(
    "doc,command", [(d, c) for d, c in ALL if c.startswith(f"{VENV_PYTHON} projkd.py")]
)
def test_each_projkd_command_parses_as_written(doc, command, capsys):
    if "timm:" in command:
        pytest.importorskip("timm")  # the name is checked against timm's models
    args = shlex.split(command)[2:]
    if args == ["--help"] or args[0] in projkd.COMMANDS:
        assert projkd.main(args[:1] + ["--help"] if args[0] in projkd.COMMANDS else args) == 0
        helped = capsys.readouterr().out
        flags = [a for a in args[1:] if a.startswith("--")]
        assert all(f"{flag} " in helped or f"{flag}\n" in helped for flag in flags), (doc, command)
        return
    projkd.resolve_config(
        projkd.parse_args(args)
    )  # a UserError (unknown arch, flag, value) fails the test


@pytest.mark.parametrize(
    "doc,command", [(d, c) for d, c in ALL if re.match(r"(touch \.deps-installed && )?make ", c)]
)
def test_each_make_command_plans_as_written(doc, command):
    words = shlex.split(command.replace("touch .deps-installed && ", ""))
    if words[1] == "gpu-check":
        pytest.skip("needs CUDA; test_gpu_check.py plans it")
    planned = make("-n", *words[1:], "DEPS=", "DATA=")
    assert planned.returncode == 0, (doc, command, planned.stderr)


@pytest.mark.parametrize("doc", DOCS)
def test_the_docs_quote_no_unfilled_figure(doc):
    """A measured time or number is written in, never left as a placeholder (TIME_EPOCH, ...)."""
    text = open(os.path.join(HERE, doc)).read()
    assert re.findall(r"\bTIME_[A-Z]+\b", text) == []
