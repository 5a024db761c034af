"""Finding redirect-audit and talking to it.

The plugin asks the tool for everything that needs mitmproxy, a database or the rules
(analyzer/testbackend.py in redirect-audit): one call per JSON line, one answer per line.
The tool is found, in this order:

1. `--redirect-audit-tool CMD` or `REDIRECT_AUDIT_TOOL=CMD` (a command line, split as a
   shell would: `uvx --from ./redirect-audit redirect-audit`);
2. redirect-audit installed in this environment (run as a child all the same: the test
   process never imports the tool, its store or mitmproxy, whose warnings a suite with
   `filterwarnings = error` would turn into errors);
3. under `redirect-audit run`, the redirect-audit that runs the tests;
4. `redirect-audit` on PATH (an isolated install: `uv tool install`, `pipx install`);
5. `uvx redirect-audit`, then `pipx run redirect-audit`.

A child is started from its own environment: `PYTHONPATH` and `PYTHONHOME` of the test
environment are not passed on, so the tool's packages never mix with the tests'.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from typing import IO, Any

from pytest_redirect_audit import __version__

PROTOCOL = 3  # analyzer/testbackend.py's PROTOCOL: the calls both sides know
TOOL_ENV = "REDIRECT_AUDIT_TOOL"
RUN_TOOL_ENV = "REDIRECT_AUDIT_RUN_TOOL"  # set by `redirect-audit run` for the commands it runs
DISTRIBUTION = "redirect-audit"
# Calls sent before their answers are read, at most: past it, they are read first (a child
# blocked writing answers nobody reads would stop reading calls: both would wait forever).
DUE_MAX = 64
CLOSE_TIMEOUT = 90.0  # seconds the tool gets to stop its recorder (which stores what it holds)


class ToolError(Exception):
    """An answer that is an error: `kind` is usage (the user's to fix), lost (the recorder
    stopped answering) or internal."""

    def __init__(self, message: str, kind: str = "usage") -> None:
        super().__init__(message)
        self.kind = kind


class Tool:
    """redirect-audit, wherever it runs. `send` makes a call and reads its answer later
    (the tool works while the tests go on); `call` reads every answer due and returns its own."""

    where = ""  # how it was found, for messages

    def __init__(self) -> None:
        self._due: list[str] = []

    def send(self, name: str, **args: Any) -> None:
        if len(self._due) >= DUE_MAX:  # answers are read now and then: the pipe back never fills
            self.drain()
        self._write(name, args)
        self._due.append(name)

    def call(self, name: str, **args: Any) -> Any:
        self.send(name, **args)
        return self.drain()[name]

    def drain(self) -> dict[str, Any]:
        """Read every answer due: {call: its value}. A `hello` among them is checked first
        (a tool that speaks another protocol would answer the rest wrongly), then the first
        error is raised."""
        due, self._due = self._due, []
        answers = [(name, self._read()) for name in due]
        for name, answer in answers:
            if name == "hello" and "ok" in answer:
                self._checked(answer["ok"])
        for _, answer in answers:
            if "error" in answer:
                raise ToolError(str(answer["error"]), str(answer.get("kind", "internal")))
        return {name: answer.get("ok") for name, answer in answers}

    def _checked(self, hello: dict[str, Any]) -> None:
        if hello.get("protocol") != PROTOCOL:
            raise ToolError(
                f"{self.where} is redirect-audit {hello.get('version')}, which speaks protocol "
                f"{hello.get('protocol')}; pytest-redirect-audit {__version__} speaks {PROTOCOL}. "
                "Install versions released together (or name another with --redirect-audit-tool)."
            )

    def close(self) -> None:
        raise NotImplementedError

    def _write(self, name: str, args: dict[str, Any]) -> None:
        raise NotImplementedError

    def _read(self) -> dict[str, Any]:
        raise NotImplementedError


class Child(Tool):
    """redirect-audit in its own environment: `CMD pytest-backend`, over its stdin and stdout."""

    def __init__(self, argv: list[str], where: str) -> None:
        super().__init__()
        self.argv = argv
        self.where = where
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        self._errors: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115  # its stderr, shown if it gives up; closed by close()
        try:
            self.process = subprocess.Popen(
                [*argv, "pytest-backend"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._errors,
                env=env,
            )
        except OSError as exc:
            raise ToolError(f"could not start {where} ({shlex.join(argv)}): {exc.strerror or exc}") from None

    def _write(self, name: str, args: dict[str, Any]) -> None:
        stdin = self.process.stdin
        assert stdin is not None
        try:
            stdin.write(json.dumps({"call": name, "args": args}).encode() + b"\n")
            stdin.flush()
        except (BrokenPipeError, ValueError):
            raise self._gone() from None

    def _read(self) -> dict[str, Any]:
        stdout = self.process.stdout
        assert stdout is not None
        line = stdout.readline()
        if not line:
            raise self._gone()
        try:
            answer = json.loads(line)
        except ValueError:
            raise ToolError(
                f"{self.where} answered something else than a call's answer: {line[:200]!r}"
            ) from None
        return dict(answer)

    def _gone(self) -> ToolError:
        """The child stopped: why, from the end of its stderr."""
        try:
            code = self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        self._errors.seek(0)
        said = self._errors.read().decode("utf-8", "replace").strip().splitlines()[-12:]
        if code is not None and code != 0 and not said:
            said = [f"exit status {code}"]
        hint = ""
        if any(
            "pytest-backend" in line and ("No such command" in line or "invalid choice" in line)
            for line in said
        ):
            hint = " It is too old for this plugin: upgrade redirect-audit."
        return ToolError(
            f"{self.where} ({shlex.join(self.argv)}) stopped answering.{hint}"
            + ("\n" + "\n".join(said) if said else ""),
            kind="lost",
        )

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.call("close")
            except ToolError:
                pass
            for stream in (self.process.stdin, self.process.stdout):
                if stream is not None:
                    stream.close()
            try:
                self.process.wait(timeout=CLOSE_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._errors.close()


def find(given: str | None) -> Tool:
    """redirect-audit, where the module docstring says it is looked for."""
    given = given or os.environ.get(TOOL_ENV) or None
    if given:
        argv = shlex.split(given)
        if not argv:
            raise ToolError(f"--redirect-audit-tool / {TOOL_ENV} is empty")
        return Child(argv, f"redirect-audit ({given})")
    if _installed_here():  # still a child: nothing of the tool's is imported where the tests run
        return Child([sys.executable, "-m", "analyzer"], "redirect-audit (installed here)")
    given = os.environ.get(RUN_TOOL_ENV)
    if given:  # under `redirect-audit run`: the tool that runs the tests
        return Child(shlex.split(given), f"redirect-audit ({given}, which runs these tests)")
    found = shutil.which("redirect-audit")
    if found:
        return Child([found], f"redirect-audit ({found})")
    for runner in (["uvx", DISTRIBUTION], ["pipx", "run", DISTRIBUTION]):
        path = shutil.which(runner[0])
        if path:
            return Child([path, *runner[1:]], f"redirect-audit (through {runner[0]})")
    raise ToolError(
        "redirect-audit was not found: this plugin records and judges through it. Install it "
        "in an environment of its own (`uv tool install redirect-audit` or `pipx install "
        "redirect-audit`, which put it on PATH), or name it: --redirect-audit-tool "
        f"'/path/to/redirect-audit' (or {TOOL_ENV})."
    )


def _installed_here() -> bool:
    """redirect-audit is installed in this environment (not merely some package named `analyzer`)."""
    from importlib import metadata

    try:
        metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return False
    import importlib.util

    spec = importlib.util.find_spec("analyzer")  # found, not imported
    return spec is not None and any(
        os.path.exists(os.path.join(where, "testbackend.py"))
        for where in spec.submodule_search_locations or ()
    )
