"""The house in layers: which project file may import which, checked on the source with `ast`.

Every file sits in a layer and imports only from the layers below it, at the top of the file.
projkd.py, the reference, reaches models.py lazily (so that it copies alone), and has the one upward
import the design allows: training opens the teacher cache. The subcommand table (projkd.COMMANDS)
names the tools' modules as strings, imported with importlib when a subcommand runs; that is the
other way up, and not an import statement.

The tools' command lines are checked here too, as one house rule across them: every option in every
--help has a description."""
import ast
import glob
import importlib
import os
import re

import pytest

from conftest import HERE

# Bottom to top: each file may import those before it.
LAYERS = ["models", "projkd", "teacher_cache", "bench", "figures", "tables", "fetch", "gpu_check",
          "torchrun_signals", "plan_cost", "smoke_docs"]
# (importer, imported) imports made inside a function rather than at the top of the file.
LAZY = {
    ("projkd", "models"):
        "copied alone, projkd.py imports anywhere: models.py only where it is used",
    ("projkd", "teacher_cache"):
        "the one place where training opens the teacher cache (setup_teacher)",
}


def project_files(folder):
    """{module name: path} of the project's own Python files (not the tests)."""
    paths = glob.glob(os.path.join(folder, "*.py"))
    return {os.path.basename(p)[:-3]: p for p in paths
            if not os.path.basename(p).startswith("test_") and os.path.basename(p) != "conftest.py"}


def project_imports(path, modules):
    """[(imported module, whether at module level, line)] of the imports of project modules in the
    file."""
    tree = ast.parse(open(path).read(), path)
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module.split(".")[0]]
        for name in names:
            if name in modules:
                found.append((name, id(node) in top_level, node.lineno))
    return found


def layer_violations(folder):
    """Every import that breaks the layers, as a readable line; [] for a house in order."""
    files = project_files(folder)
    problems = [f"{name}.py is in no layer: add it to LAYERS"
                for name in files if name not in LAYERS]
    for name, path in files.items():
        if name not in LAYERS:
            continue
        for imported, at_top, line in project_imports(path, files):
            where = f"{name}.py:{line} imports {imported}"
            if imported == name:
                problems.append(f"{where}: itself")
            elif (name, imported) in LAZY:
                if at_top:
                    problems.append(f"{where} at the top: {LAZY[name, imported]}")
            elif imported in LAYERS and LAYERS.index(imported) > LAYERS.index(name):
                problems.append(f"{where}, a layer above it")
            elif not at_top:
                problems.append(f"{where} inside a function: imports go at the top of the file")
        tree = ast.parse(open(path).read(), path)
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
                problems.append(f"{name}.py:{node.lineno} has a module-level __getattr__")
    return problems


def test_every_import_points_down_the_layers():
    assert layer_violations(HERE) == []


def test_models_imports_no_project_module():
    files = project_files(HERE)
    assert project_imports(files["models"], files) == []


@pytest.mark.parametrize("source, problem", [
    ("import tables\n", "models.py:1 imports tables, a layer above it"),
    ("def f():\n    import projkd\n", "models.py:2 imports projkd, a layer above it"),
    ("import models\n", "models.py:1 imports models: itself"),
    ("def __getattr__(name):\n    pass\n", "models.py:1 has a module-level __getattr__"),
])
def test_an_upward_or_circular_import_fails_the_layer_check(tmp_path, source, problem):
    for name, path in project_files(HERE).items():
        text = open(path).read()
        if name == "models":
            text = source + text
        (tmp_path / f"{name}.py").write_text(text)
    assert problem in layer_violations(tmp_path)


def test_a_lazy_import_of_a_lower_layer_and_a_new_file_fail_the_layer_check(tmp_path):
    for name, path in project_files(HERE).items():
        (tmp_path / f"{name}.py").write_text(open(path).read())
    (tmp_path / "tables.py").write_text("def f():\n    import projkd\n")
    (tmp_path / "helpers.py").write_text("import projkd\n")
    (tmp_path / "bench.py").write_text("import models\nimport projkd\nimport teacher_cache\n")
    (tmp_path / "projkd.py").write_text("import teacher_cache\n")
    problems = layer_violations(tmp_path)
    assert ("tables.py:2 imports projkd inside a function: imports go at the top of the file"
            in problems)
    assert "helpers.py is in no layer: add it to LAYERS" in problems
    assert not [p for p in problems if p.startswith("bench.py")]
    assert any(p.startswith("projkd.py:1 imports teacher_cache at the top") for p in problems)


# --- every tool's --help describes every option --------------------------------------------------

def described_options(help_text):
    """{option: its description without argparse's "(default: ...)"} of each entry in a --help's
    "options:" and "positional arguments:" sections."""
    entries = {}
    name = None
    section = False
    for line in help_text.splitlines():
        if line.endswith(":") and not line.startswith(" "):
            section = line in ("options:", "positional arguments:")
            name = None
            continue
        if not section or not line.strip():
            continue
        # argparse puts the option at column 2 and its help 2 or more spaces after it
        entry = re.match(r"^  (\S.*?)(?:\s{2,}(.*))?$", line)
        if entry and not line.startswith("   "):
            name = entry.group(1)
            entries[name] = entry.group(2) or ""
        elif name:
            entries[name] += " " + line.strip()
    return {name: re.sub(r"\(default: .*\)$", "", text.strip()).strip()
            for name, text in entries.items()}


def test_described_options_reads_argparse_help():
    text = ("usage: x\n\npositional arguments:\n  runs        the runs\n\noptions:\n"
            "  --pairs STR   (default: 'a b')\n  --synthetic-classes INT\n"
            "                classes of it (default: 10)\n  --x, --no-x  on or\n"
            "                off (default: off)\n")
    assert described_options(text) == {"runs": "the runs", "--pairs STR": "",
                                       "--synthetic-classes INT": "classes of it",
                                       "--x, --no-x": "on or off"}


# each tool's command lines that take options: the module, then its subcommand if any
HELPS = ["projkd", "projkd eval", "projkd cache", "projkd bench", "projkd fetch-weights",
         "projkd fetch-teachers", "projkd download", "tables", "plan_cost", "smoke_docs",
         "gpu_check start", "gpu_check step", "gpu_check random-teacher", "gpu_check report",
         "gpu_check preflight"]


@pytest.mark.parametrize("line", HELPS)
def test_every_tools_help_describes_every_option(line, capsys):
    module, *command = line.split()
    main = importlib.import_module(module).main
    try:
        status = main([*command, "--help"])
    except SystemExit as e:  # plain argparse exits after its help
        status = e.code
    assert status == 0
    options = described_options(capsys.readouterr().out)
    assert options or command == ["report"]
    assert [name for name, text in options.items() if not text] == []
