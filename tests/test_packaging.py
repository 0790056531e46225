"""What `pip install teachercache` installs: every package of the tree listed in pyproject.toml, the student
package inside the teachercache namespace, the demo teacher and corpus as package data, one version string.
(.ci/run builds the wheel itself, installs it outside the checkout and runs a short demo from it.)"""

from __future__ import annotations

import tomllib
from pathlib import Path

import teachercache
from teachercache.student import demo

ROOT = Path(__file__).resolve().parents[1]


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_of_the_tree_is_listed_and_installs_under_teachercache():
    cfg = _setuptools()
    dirs = cfg["package-dir"]
    assert dirs == {"teachercache": "teachercache", "teachercache.student": "student", "teachercache.bundled": "data"}
    tree = {"teachercache." + ".".join(p.parent.relative_to(ROOT / "teachercache").parts)
            for p in (ROOT / "teachercache").rglob("__init__.py")} - {"teachercache."}
    tree |= {"teachercache", "teachercache.student", "teachercache.bundled"}
    assert set(cfg["packages"]) == tree
    assert not any(name == "student" or name.startswith("student.") for name in cfg["packages"])


def test_the_demo_finds_its_data_through_the_package():
    assert demo.DATA.resolve() == (ROOT / "data").resolve()       # in a checkout: data/ itself
    for pattern in _setuptools()["package-data"]["teachercache.bundled"]:
        assert list(demo.DATA.glob(pattern)), pattern
    assert (demo.DATA / "teacher" / "model.safetensors").is_file()
    assert Path(demo.DemoOptions().teacher) == demo.DATA / "teacher"


def test_one_version_string():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and project["dynamic"] == ["version"]
    assert _setuptools()["dynamic"]["version"] == {"attr": "teachercache.__version__"}
    assert teachercache.__version__ == "0.3.0"
