"""constraints.txt (what `make install` pins) covers every dependency and matches what this suite runs with."""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version

import tomllib

from helpers import REPO


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_constraints_pin_every_dependency_at_the_installed_version() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = {_name(r) for r in project["dependencies"]}
    wanted |= {_name(r) for extra in project["optional-dependencies"].values() for r in extra
               if not r.startswith("chatrl")}
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, pinned = line.partition("==")
            pins[_name(name)] = pinned.strip()
    assert not wanted - set(pins), f"not pinned in constraints.txt: {sorted(wanted - set(pins))}"
    stale = {}
    for name, pinned in pins.items():
        try:
            installed = version(name).split("+")[0]  # torch's local "+cpu" tag is not part of the pin
        except PackageNotFoundError:
            continue  # pinned for another platform's resolution; nothing installed here to compare
        if installed != pinned:
            stale[name] = (pinned, installed)
    assert not stale, f"constraints.txt differs from the installed versions (pinned, installed): {stale}; " \
                      "run `make constraints` after a green test run"
