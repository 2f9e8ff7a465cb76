"""Packaging: one version, no generic top-level module, and a clear exit where Linux 5.3+ is missing."""
import ast
import os
import subprocess
import sys
import zipfile

import pytest

import socketproxy_core
from support import ROOT, scaled

PROXY = os.path.join(ROOT, "socketproxy.py")


def run_pretending(patch):
    """Run the command after patch (Python source) has changed what it can see of the system."""
    code = ("import os, runpy, sys\n%s\nsys.argv = ['socketproxy.py', '--listen-port', '8000', '127.0.0.1:9']\n"
            "runpy.run_path(%r, run_name='__main__')\n" % (patch, PROXY))
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=scaled(30))


@pytest.mark.parametrize("patch, named", [
    ("sys.platform = 'darwin'", "this is"),
    ("del os.pidfd_open", "no os.pidfd_open"),
    ("def refuse(pid): raise OSError(38, 'Function not implemented')\nos.pidfd_open = refuse", "pidfd_open fails"),
])
def test_a_system_without_pidfds_gets_one_line_and_exit_1(patch, named):
    result = run_pretending(patch)
    assert result.returncode == 1, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("socketproxy: needs Linux 5.3 or later") and named in lines[0], result


def declared_version():
    """The version pyproject.toml builds with: its literal, or the literal of the attribute it names."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as file:
        pyproject = tomllib.load(file)
    if "version" in pyproject["project"]:
        return pyproject["project"]["version"]
    assert "version" in pyproject["project"]["dynamic"]
    module, name = pyproject["tool"]["setuptools"]["dynamic"]["version"]["attr"].rsplit(".", 1)
    path = os.path.join(ROOT, *module.split("."))
    path = os.path.join(path, "__init__.py") if os.path.isdir(path) else path + ".py"
    with open(path) as file:
        tree = ast.parse(file.read())
    [value] = [node.value.value for node in tree.body if isinstance(node, ast.Assign)
               and [getattr(target, "id", None) for target in node.targets] == [name]]
    return value


def test_one_version_everywhere():
    """--version, socketproxy_core.__version__ and what pyproject.toml builds with are one version."""
    declared = declared_version()
    version = subprocess.run([sys.executable, PROXY, "--version"], capture_output=True, text=True, timeout=30)
    assert version.stdout.strip() == "socketproxy %s" % declared
    assert socketproxy_core.__version__ == declared


def test_the_wheel_puts_no_generic_name_at_the_top(tmp_path):
    """Built as pipx would build it: only the command, the forwarder and two prefixed packages."""
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), ROOT],
                            capture_output=True, text=True, timeout=scaled(300))
    if result.returncode and ("No matching distribution" in result.stderr or "Could not find" in result.stderr):
        pytest.skip("cannot fetch the build backend (setuptools) here: %s" % result.stderr.strip()[-200:])
    assert result.returncode == 0, result.stderr
    [wheel] = list(tmp_path.glob("socketproxy-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        top = {name.split("/")[0] for name in archive.namelist() if ".dist-info" not in name.split("/")[0]}
        entry_points = archive.read(next(n for n in archive.namelist() if n.endswith("entry_points.txt"))).decode()
    assert top == {"socketproxy.py", "forwarder.py", "socketproxy_core", "socketproxy_fakes"}, top
    assert "socketproxy = socketproxy:main" in entry_points
