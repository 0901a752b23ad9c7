"""A fresh clone installs the versions the suite last passed with: the README's test command (which `.ci/run` runs
verbatim) installs with ``-c constraints.txt``, and constraints.txt pins every declared dependency, exactly, within
pyproject.toml's ranges. ``.ci/deps.py`` (freeze / diff / blame for ``.ci/newest``) is checked on fakes."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from tests.conftest import REPO

tomllib = pytest.importorskip("tomllib")  # Python 3.11+ (and .ci/deps.py with it)

TEST_COMMAND = (
    'pip install torch==2.13.0 -c constraints.txt && pip install -e ".[test]" -c constraints.txt && python -m pytest'
)


def _deps() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ci_deps", REPO / ".ci" / "deps.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclass looks itself up there
    spec.loader.exec_module(mod)
    return mod


deps = _deps()


def _readme_test_command() -> str:
    text = (REPO / "README.md").read_text()
    block = text.split("Run the tests:", 1)[1].split("```bash\n", 1)[1].split("\n```", 1)[0]
    return block.strip()


def _ci_run_command() -> str:
    lines = [ln for ln in (REPO / ".ci" / "run").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    return lines[-1].strip()


def test_readme_and_ci_run_share_the_test_command() -> None:
    assert _readme_test_command() == _ci_run_command() == TEST_COMMAND


def test_the_test_command_installs_with_the_constraints() -> None:
    installs = [part.strip() for part in TEST_COMMAND.split("&&") if part.strip().startswith("pip install")]
    assert len(installs) == 2 and all(part.endswith("-c constraints.txt") for part in installs)
    torch = re.search(r"torch==(\S+)", TEST_COMMAND)
    assert torch is not None and deps.read_constraints()["torch"] == torch.group(1)


def _declared() -> dict[str, SpecifierSet]:
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in meta["dependencies"]]
    reqs += [Requirement(r) for extra in meta["optional-dependencies"].values() for r in extra]
    want: dict[str, SpecifierSet] = {}
    for r in reqs:
        want[deps.norm(r.name)] = want.get(deps.norm(r.name), SpecifierSet()) & r.specifier
    return want


def test_constraints_pin_every_declared_dependency_within_its_range() -> None:
    pins = deps.read_constraints()  # raises on anything but name==version
    declared = _declared()
    assert {"torch", "ray", "optuna", "rasterio", "pyarrow", "pytest"} <= declared.keys()
    missing = sorted(declared.keys() - pins.keys())
    assert not missing, f"constraints.txt lacks {missing}: run `bash .ci/newest --freeze` and commit constraints.txt"
    outside = {n: f"{pins[n]} not in {spec}" for n, spec in declared.items() if not spec.contains(pins[n], True)}
    assert not outside, f"constraints.txt pins outside pyproject.toml's ranges: {outside}"
    assert "tune-agb" not in pins and "pip" not in pins


def test_constraints_lines_apply_on_the_python_they_were_made_with() -> None:
    markers = [Requirement(ln).marker for ln in (REPO / "constraints.txt").read_text().splitlines() if ln[:1].isalnum()]
    env = {"python_version": "3.11", "extra": ""}
    assert markers and all(m is not None and m.evaluate(env) for m in markers)
    assert not any(m is not None and m.evaluate({**env, "python_version": "3.10"}) for m in markers)


def test_read_constraints_takes_exact_pins_only(tmp_path: Path) -> None:
    f = tmp_path / "c.txt"
    f.write_text('# comment\n\nTorch==2.13.0 ; python_version >= "3.11"\nruamel.yaml==0.18.6  # why\n')
    assert deps.read_constraints(f) == {"torch": "2.13.0", "ruamel-yaml": "0.18.6"}
    f.write_text("numpy>=2\n")
    with pytest.raises(ValueError, match="not an exact pin"):
        deps.read_constraints(f)


def test_render_round_trips_and_drops_local_labels(tmp_path: Path) -> None:
    f = tmp_path / "c.txt"
    f.write_text(deps.render({"numpy": "2.4.6", "torch": "2.13.0+cpu"}))
    assert deps.read_constraints(f) == {"numpy": "2.4.6", "torch": "2.13.0"}


def test_changes_name_new_gone_and_moved_packages() -> None:
    pins = {"pytest": "9.0.3", "torch": "2.13.0", "old": "1.0", "same": "2.0"}
    now = {"pytest": "9.2.0", "torch": "2.13.0+cpu", "new": "0.1", "same": "2.0.0"}
    got = {c.name: str(c) for c in deps.changes(pins, now)}
    assert got == {
        "new": "new 0.1 (new: not in constraints.txt)",
        "old": "old (pinned 1.0, no longer installed)",
        "pytest": "pytest 9.0.3 -> 9.2.0",
    }


def test_closure_follows_requirements_of_the_installed_distributions() -> None:
    got = deps.closure(["pytest"], deps.installed())
    assert {"pytest", "pluggy", "iniconfig", "packaging"} <= got.keys()
    with pytest.raises(SystemExit, match="no-such-dist"):
        deps.closure(["no-such-dist>=1"], deps.installed())


class _FakeEnv:
    """Installed versions that ``pip`` changes, and failing tests that pass once ``fixes`` holds."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, now: dict[str, str], fixes, flaky: bool = False) -> None:
        self.now, self.calls = dict(now), []
        pins = {"pytest": "9.0.3", "ray": "2.59.0", "numpy": "2.4.6"}
        monkeypatch.setattr(deps, "read_constraints", lambda: pins)
        monkeypatch.setattr(deps, "wanted", lambda: dict(self.now))
        monkeypatch.setattr(deps, "pip", self.pip)
        self.runs = 0

        def passes(nodeids: list[str]) -> bool:
            self.runs += 1
            return (flaky and self.runs == 1) or fixes(self.now)

        monkeypatch.setattr(deps, "passes", passes)

    def pip(self, *specs: str) -> None:
        self.calls.append(specs)
        for s in specs:
            name, version = s.split("==")
            self.now[name] = version


NEWEST = {"pytest": "9.2.0", "ray": "2.60.0", "numpy": "2.4.6"}


def test_blame_names_the_package_whose_pinned_version_fixes_the_tests(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    env = _FakeEnv(monkeypatch, NEWEST, lambda now: now["pytest"] == "9.0.3")
    got = deps.blame(["tests/test_data.py::test_x"])
    assert [c.name for c in got] == ["pytest"]
    assert env.now == NEWEST  # each package put back to its newest version after its try
    out = capsys.readouterr().out
    assert "BROKEN BY pytest 9.2.0: the failing tests pass with pytest==9.0.3" in out and "ray 2.59.0 -> 2.60.0" in out


def test_blame_tells_flaky_combined_and_not_a_release(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _FakeEnv(monkeypatch, NEWEST, lambda now: False, flaky=True)
    assert deps.blame(["t"]) == [] and "flaky" in capsys.readouterr().out
    _FakeEnv(monkeypatch, NEWEST, lambda now: now["pytest"] == "9.0.3" and now["ray"] == "2.59.0")
    assert deps.blame(["t"]) == [] and "only with all of these" in capsys.readouterr().out
    _FakeEnv(monkeypatch, NEWEST, lambda now: False)
    assert deps.blame(["t"]) == [] and "fail with the pinned versions too" in capsys.readouterr().out
    env = _FakeEnv(monkeypatch, {**NEWEST, "pytest": "9.0.3", "ray": "2.59.0"}, lambda now: False)
    assert deps.blame(["t"]) == [] and "not a new release" in capsys.readouterr().out and env.calls == []
