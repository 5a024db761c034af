"""A test environment as users have one: a virtualenv of a suite's own requirements, without
redirect-audit, into which only the light plugin (plugin/, pytest-redirect-audit) is
installed, the way the README says. Made with uv from its cache (the versions this
project's environment has, so nothing is downloaded where the cache has them).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from conftest import ROOT


def uv() -> str:
    found = os.environ.get("UV") or shutil.which("uv")  # `uv run` names itself in UV
    assert found, "uv makes the test environments (README: set-up)"
    return found


def _uv(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "UV_PROJECT_ENVIRONMENT")}
    env["UV_PYTHON_DOWNLOADS"] = "never"
    return subprocess.run([uv(), *args], capture_output=True, text=True, timeout=timeout, env=env)


def pinned(*names: str) -> list[str]:
    """`name==version` as this project's environment has each."""
    return [f"{name}=={metadata.version(name)}" for name in names]


class LightEnv:
    def __init__(self, where: Path) -> None:
        self.where = where
        done = _uv("venv", "--quiet", "--python", sys.executable, str(where))
        assert done.returncode == 0, done.stderr
        self.python = where / "bin" / "python"

    def install(self, *requirements: str) -> None:
        # compiled once here: the suites run in it several times (CI may not write bytecode)
        args = (
            "pip",
            "install",
            "--quiet",
            "--compile-bytecode",
            "--python",
            str(self.python),
            *requirements,
        )
        done = _uv(*args, "--offline")
        if done.returncode != 0:  # not all in the cache: from the index
            done = _uv(*args)
        assert done.returncode == 0, done.stderr

    def install_plugin(self) -> None:
        self.install(str(ROOT / "plugin"))

    def freeze(self) -> set[str]:
        done = _uv("pip", "freeze", "--python", str(self.python))
        assert done.returncode == 0, done.stderr
        return {line.strip() for line in done.stdout.splitlines() if line.strip()}

    def check(self) -> subprocess.CompletedProcess[str]:
        """`uv pip check`: the environment's requirements are all met, nothing conflicts."""
        return _uv("pip", "check", "--python", str(self.python))

    def importable(self, module: str) -> bool:
        done = subprocess.run(
            [
                str(self.python),
                "-c",
                f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)",
            ],
            capture_output=True,
            timeout=60,
            cwd=self.where,  # not this checkout, whose packages `-c` would find
        )
        return done.returncode == 0


def tool_on_path(where: Path) -> str:
    """A PATH on which `redirect-audit` is this project's (an isolated tool install, as users
    have it) and `python` is not this project's."""
    where.mkdir(parents=True, exist_ok=True)
    tool = Path(sys.executable).parent / "redirect-audit"
    assert tool.exists(), tool
    (where / "redirect-audit").symlink_to(tool)
    return os.pathsep.join([str(where), "/usr/local/bin", "/usr/bin", "/bin"])
