"""README.md as a newcomer follows it: every shell command runs as pasted, and every file it names exists.

Every fenced shell block (the `<!-- ci:… -->` blocks aside: `.ci/run` runs those) is run command by command, in
order, with the venv's `bin` first on PATH (bare `fluxexport` works) and the session's tiny-model cache, as a user
pasting them would. The quick start (the first unmarked shell block) runs once per session in a scratch folder; each
later block is one test that runs in a copy of that folder, as a reader who did the quick start and then follows
one section (so the blocks spread over the xdist workers): a block uses the quick start's files or its own. The
quick start's commands are new processes (bash, then the console script); a later block's plain `fluxexport …`
command (no pipe, redirect, variable or glob) is forked from a python that has already imported fluxexport and its
libraries (`tests/fork_server.py`), everything else still goes through bash. An
HTML comment right before a block marks what cannot run here:

* `<!-- readme-test: help-only -->` — needs a GPU, TensorRT, the hub or a long time: each `fluxexport SUB …` is
  checked against `fluxexport SUB --help` (the subcommand and every option it passes exist), each
  `python scripts/NAME.py …` against the script's `--help`, each `bash scripts/NAME.sh` with `bash -n`; other
  programs (docker, kubectl, …) are not run. In a python block, only the import lines run.
* `<!-- readme-test: refusal -->` — runs, and either succeeds or refuses in one line (exit 1 or 2, one `Error:`
  line, last, no traceback): what a user without a GPU gets.

Unmarked shell and python blocks run whole and must succeed. Separately, every repository path the README names
(`fluxexport/…`, `tests/…`, `scripts/…`, a module path such as `runtime/flux2.py`, a bare `NAME.md`, the layout
block's files) must be a file or folder the repository holds.
"""

from __future__ import annotations

import os
import re
import resource
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SHELL = {"bash", "sh", "shell", "console"}
MARKER = re.compile(r"^<!--\s*(readme-test|ci):\s*([\w-]+)\s*-->$")
MARKERS = {"help-only", "refusal"}
TIMEOUT = 600  # seconds for one command: an export of a tiny model takes 20-60 s on 2 busy cores


@dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the opening fence
    language: str
    text: str
    marker: str | None  # "help-only", "refusal", "ci:install", … or None


def readme_blocks(text: str) -> list[Block]:
    """The fenced code blocks of a markdown text, each with the marker comment right before it (if any)."""
    blocks, lines, index = [], text.splitlines(), 0
    while index < len(lines):
        fence = re.match(r"^(\s*)```(\w*)\s*$", lines[index])
        if not fence:
            index += 1
            continue
        previous = next((line.strip() for line in reversed(lines[:index]) if line.strip()), "")
        marker = MARKER.match(previous)
        label = None if marker is None else (marker[2] if marker[1] == "readme-test" else f"ci:{marker[2]}")
        end = next(i for i in range(index + 1, len(lines)) if lines[i].strip().startswith("```"))
        indent = len(fence[1])
        body = "\n".join(line[indent:] for line in lines[index + 1 : end])
        blocks.append(Block(index + 1, fence[2], body, label))
        index = end + 1
    return blocks


def shell_commands(text: str) -> list[str]:
    """A shell block's commands: continuation lines joined, blank and comment-only lines dropped."""
    commands, current = [], ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip()[:-1] + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            commands.append(current.strip())
            current = ""
    return commands


def simple_commands(command: str) -> list[list[str]]:
    """`a && b | c; d  # note` → argv lists, environment assignments and `/usr/bin/time -v` dropped."""
    words = shlex.split(command, comments=True)
    result, current = [], []
    for word in [*words, "&&"]:
        if word in {"&&", "||", "|", ";"}:
            while current and re.match(r"^\w+=", current[0]):
                current.pop(0)
            if current[:2] == ["/usr/bin/time", "-v"]:
                current = current[2:]
            if current:
                result.append(current)
            current = []
        else:
            current.append(word)
    return result


def options_of(argv: list[str]) -> list[str]:
    return [word.split("=")[0] for word in argv if word.startswith("--")]


@pytest.fixture(scope="session")
def readme_env(cache_root) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        FLUXEXPORT_CACHE=str(cache_root), HF_HUB_OFFLINE="1", COLUMNS="80", CI="true", PYTHONUNBUFFERED="1",
    )  # fmt: skip
    env.pop("PYTHONPATH", None)  # as a user's shell: the package comes from the venv, not from pytest's path
    return env


TIMINGS: list[tuple[str, float, float]] = []  # (command, wall s, CPU s of its processes), printed at the end


SHELL_SYNTAX = re.compile(r"[$`*?~\[\]<>|;(){}\\!]|&(?!&)")  # what only a shell can run (beyond `&&`)


def fluxexport_calls(command: str) -> list[list[str]] | None:
    """The argv lists of a command that is nothing but `fluxexport …` calls joined by `&&`, which the fork server
    runs as bash would; None for anything else (a pipe, a redirect, a variable, a glob, another program)."""
    if SHELL_SYNTAX.search(command.split(" #")[0]):
        return None
    calls, current = [], []
    for word in [*shlex.split(command, comments=True), "&&"]:
        if word != "&&":
            current.append(word)
        elif current:
            calls.append(current)
            current = []
    return calls if calls and all(call[0] == "fluxexport" for call in calls) else None


class ForkServer:
    """The client of `tests/fork_server.py`: one per worker, for the README's `fluxexport …` commands."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.socket, self.folder = str(folder / "fork.sock"), folder
        self.program = shutil.which("fluxexport", path=env["PATH"])
        self.log = open(folder / "fork-server.log", "w")  # noqa: SIM115 - closed in close()
        self.process = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fork_server.py"), self.socket],
                                        env=env, stdout=subprocess.PIPE, stderr=self.log, text=True)  # fmt: skip
        ready = self.process.stdout.readline().strip()
        assert ready == "ready", f"the fork server did not start: {(folder / 'fork-server.log').read_text()[-2000:]}"

    def run(self, argv: list[str], cwd: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
        import json
        import socket

        out, err = self.folder / "stdout", self.folder / "stderr"
        request = {"argv": [self.program, *argv[1:]], "cwd": str(cwd), "env": env, "stdout": str(out),
                   "stderr": str(err)}  # fmt: skip
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.settimeout(TIMEOUT)
            connection.connect(self.socket)
            with connection.makefile("rw") as stream:
                stream.write(json.dumps(request) + "\n")
                stream.flush()
                reply = json.loads(stream.readline())
        result = subprocess.CompletedProcess(argv, reply["returncode"], out.read_text(), err.read_text())
        return result, reply["cpu"]

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self.log.close()


FORK_SERVER: list[ForkServer] = []  # this worker's, started by the `fork_server` fixture


@pytest.fixture(scope="session")
def fork_server(tmp_path_factory, readme_env):
    server = ForkServer(tmp_path_factory.mktemp("fork-server"), readme_env)
    FORK_SERVER.append(server)
    yield server
    FORK_SERVER.clear()
    server.close()


def _run(argv: list[str] | str, cwd: Path, env: dict[str, str], fork: bool = False) -> subprocess.CompletedProcess:
    """`argv` (a list: that program; a string: through bash). With `fork`, a string that is only `fluxexport …`
    calls goes to the worker's fork server instead of a new bash and python."""
    shell = isinstance(argv, str)
    calls = fluxexport_calls(argv) if shell and fork and FORK_SERVER else None
    start = time.perf_counter()
    if calls:
        outputs, cpu = [], 0.0
        for call in calls:
            result, seconds = FORK_SERVER[0].run(call, cwd, env)
            outputs.append(result)
            cpu += seconds
            if result.returncode != 0:
                break
        result = subprocess.CompletedProcess(argv, outputs[-1].returncode, "".join(r.stdout for r in outputs),
                                             "".join(r.stderr for r in outputs))  # fmt: skip
    else:
        args = ["bash", "-o", "pipefail", "-c", argv] if shell else argv
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    label = ("fork: " if calls else "") + (argv if shell else " ".join(argv))
    TIMINGS.append((label, time.perf_counter() - start, cpu))
    return result


def _tail(result: subprocess.CompletedProcess, lines: int = 12) -> str:
    return "\n".join((result.stdout + result.stderr).strip().splitlines()[-lines:])


def check_help_only(argv: list[str], cwd: Path, env: dict[str, str]) -> str | None:
    """What is wrong with a command that is only checked against its program's --help (None: nothing)."""
    program = Path(argv[0]).name
    if program == "fluxexport" and len(argv) > 1:  # in process: click renders the same help, without a new python
        from click.testing import CliRunner

        from fluxexport.cli import main

        subcommand = [argv[1]] if not argv[1].startswith("-") else []
        invoked = CliRunner().invoke(main, [*subcommand, "--help"])
        help_run = subprocess.CompletedProcess(argv, invoked.exit_code, invoked.output, "")
    elif program.startswith("python") and len(argv) > 1 and argv[1].endswith(".py"):
        script = ROOT / argv[1]
        if not script.is_file():
            return f"{argv[1]} is not in the repository"
        help_run = _run([sys.executable, str(script), "--help"], ROOT, env)
    elif program == "bash" and len(argv) > 1 and argv[1].endswith(".sh"):
        script = ROOT / argv[1]
        if not script.is_file():
            return f"{argv[1]} is not in the repository"
        syntax = _run(["bash", "-n", str(script)], ROOT, env)
        return None if syntax.returncode == 0 else f"bash -n {argv[1]}: {_tail(syntax)}"
    else:
        return None  # docker, kubectl, helm, aws, pytest on a GPU host: not run here
    if help_run.returncode != 0:
        return f"{' '.join(argv[:2])} --help exits {help_run.returncode}: {_tail(help_run)}"
    unknown = [option for option in options_of(argv) if option not in help_run.stdout]
    return f"{' '.join(argv[:2])} has no option {', '.join(unknown)}" if unknown else None


def check_refusal(result: subprocess.CompletedProcess) -> str | None:
    """None when the command succeeded or refused in one line: exit 1/2, one `Error:` line, last, no traceback."""
    if result.returncode == 0:
        return None
    output = (result.stdout + result.stderr).strip().splitlines()
    errors = [line for line in output if line.startswith("Error:")]
    if result.returncode not in (1, 2) or "Traceback" in result.stderr or len(errors) != 1 or output[-1] != errors[0]:
        return f"not a one-line refusal (exit {result.returncode}):\n{_tail(result)}"
    return None


def check_python_imports(code: str, cwd: Path, env: dict[str, str]) -> str | None:
    imports = "\n".join(line for line in code.splitlines() if re.match(r"^(from \S+ )?import ", line))
    result = _run([sys.executable, "-c", imports], cwd, env)
    return None if result.returncode == 0 else f"imports fail: {_tail(result)}"


def runnable_blocks(text: str) -> list[Block]:
    """The blocks the README test runs: shell and python blocks, the `ci:` ones aside (`.ci/run` runs those)."""
    runs = SHELL | {"python"}
    return [block for block in readme_blocks(text)
            if not (block.marker or "").startswith("ci:") and block.language in runs]  # fmt: skip


BLOCKS = runnable_blocks(README.read_text())
QUICK_START = next(block for block in BLOCKS if block.marker is None and block.language in SHELL)


def block_problems(block: Block, scratch: Path, env: dict[str, str], fork: bool = False) -> list[str]:
    """What fails in one block run in `scratch`: unmarked commands must succeed, `refusal` ones succeed or refuse
    in one line, `help-only` ones name a subcommand and options that exist. With `fork`, plain `fluxexport …`
    commands run in the worker's fork server (`tests/fork_server.py`)."""
    if block.language == "python":
        if block.marker == "help-only":
            problem = check_python_imports(block.text, scratch, env)
        else:
            result = _run([sys.executable, "-c", block.text], scratch, env)
            problem = None if result.returncode == 0 else f"exits {result.returncode}:\n{_tail(result)}"
        return [f"README.md:{block.line} (python): {problem}"] if problem else []
    failures = []
    for command in shell_commands(block.text):
        if block.marker == "help-only":
            problems = [check_help_only(argv, scratch, env) for argv in simple_commands(command)]
            problem = "; ".join(p for p in problems if p) or None
        else:
            result = _run(command, scratch, env, fork)
            if block.marker == "refusal":
                problem = check_refusal(result)
            else:
                problem = None if result.returncode == 0 else f"exits {result.returncode}:\n{_tail(result)}"
        if problem:
            failures.append(f"README.md:{block.line}: {command}\n  {problem}")
    return failures


def _print_timings() -> None:
    for command, wall, cpu in TIMINGS:  # where the time goes (pytest -s shows it)
        print(f"{wall:7.1f} s wall {cpu:7.1f} s CPU  {command[:100]}")
    print(f"{sum(t[1] for t in TIMINGS):7.1f} s wall {sum(t[2] for t in TIMINGS):7.1f} s CPU  in all")
    TIMINGS.clear()


@pytest.fixture(scope="session")
def quick_start(tmp_path_factory, readme_env) -> tuple[Path, list[str]]:
    """The scratch folder after the quick start's commands (its image, engines/tiny-dev/onnx, validation.json) and
    what failed in them: run once per session, shared by the session's xdist workers."""
    import json

    from helpers import once_per_session

    def make(folder: Path) -> None:
        (folder / "scratch").mkdir(parents=True)
        failures = block_problems(QUICK_START, folder / "scratch", readme_env)
        _print_timings()
        (folder / "failures.json").write_text(json.dumps(failures))

    folder = once_per_session(tmp_path_factory, "readme-quick-start", make)
    return folder / "scratch", json.loads((folder / "failures.json").read_text())


def test_every_readme_marker_is_known():
    blocks = [block for block in readme_blocks(README.read_text()) if not (block.marker or "").startswith("ci:")]
    unknown = [f"README.md:{block.line}: unknown marker {block.marker!r}" for block in blocks
               if block.marker not in MARKERS | {None}]  # fmt: skip
    assert not unknown, "\n".join(unknown)


@pytest.mark.slow
@pytest.mark.parametrize("block", BLOCKS, ids=[f"README.md:{block.line}" for block in BLOCKS])
def test_every_readme_command_runs_as_pasted(block, tmp_path, readme_env, request):
    """Each shell and python block, its commands in order, as a reader who did the quick start and then follows
    one section: every block after the quick start that runs commands runs in a copy of the quick start's folder
    (the sections use its image and graphs), so the blocks spread over the session's workers. The quick start's
    commands run as new processes (bash, then the `fluxexport` console script); the later blocks' plain
    `fluxexport …` commands run in the worker's fork server, which saves each one its ~4 s of imports."""

    scratch = tmp_path / "readme"
    if block.marker == "help-only":  # checked against --help: nothing of the quick start's is read
        scratch.mkdir()
    else:
        folder, quick_start_failures = request.getfixturevalue("quick_start")
        if block is QUICK_START:
            assert not quick_start_failures, "\n\n".join(quick_start_failures)
            return
        if quick_start_failures:
            pytest.fail(f"the quick start (README.md:{QUICK_START.line}) failed, which this block starts from")
        shutil.copytree(folder, scratch, symlinks=True)
        request.getfixturevalue("fork_server")
    failures = block_problems(block, scratch, readme_env, fork=True)
    _print_timings()
    assert not failures, "\n\n".join(failures)


# --- every file the README names is in the repository -------------------------------------------------------

PATH_TOKEN = re.compile(r"(?<![\w./\-…<])((?:\.?[\w-]+/)+[\w.-]*[\w/]|[\w.-]+\.(?:md|py|sh|toml)\b|Dockerfile[\w.]*)")


def repository_files() -> set[str]:
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    files = set(listed.split())
    folders = {str(Path(file).parents[i]) + "/" for file in files for i in range(len(Path(file).parents) - 1)}
    return files | folders


def named_path_problem(token: str, files: set[str]) -> str | None:
    """Whether a path-like token of the README names something the repository lacks (None: fine, or not ours)."""
    token = token.rstrip(".,:;)")
    package = {entry.split("/")[1] for entry in files if entry.startswith("fluxexport/") and entry.count("/") >= 2}
    top = {entry.split("/")[0] for entry in files if "/" in entry} - {"engines"}
    first = token.split("/")[0]
    if "/" not in token:
        if token.endswith(".md") or token.startswith("Dockerfile"):
            return None if token in files else f"{token} is not in the repository"
        if token.endswith((".py", ".sh")):  # a bare module name: somewhere in the repository
            return None if any(f == token or f.endswith("/" + token) for f in files) else f"no {token} anywhere"
        return None
    candidates = []
    if first in top:
        candidates.append(token)
    if first in package:
        candidates.append(f"fluxexport/{token}")
    if not candidates:
        return None  # engines/…, k8s/…, a hub id, a path on the user's side
    if any(c in files or c.rstrip("/") + "/" in files for c in candidates):
        return None
    return f"{token} is not in the repository"


def layout_listing(layout: str) -> list[str]:
    """The repository paths the layout block lists: folders at the left margin and two spaces in, and each
    `name.py` under the folder (and sub-folder) it is listed in; files at the left margin as they are."""
    listed, top, sub = [], "", ""
    for line in layout.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        first = line.split()[0]
        if indent == 0:
            top, sub = (first if first.endswith("/") else ""), ""
            listed.append(first)
        elif indent == 2:
            sub = first if first.endswith("/") else ""
            if sub:
                listed.append(f"{top}{sub}")
        for name in re.findall(r"(?<![\w/.-])([\w-]+\.py)\b", line):
            listed.append(f"{top}{sub}{name}")
    return listed


def layout_problems(layout: str, files: set[str]) -> list[str]:
    """Paths the layout block lists that the repository lacks, and package modules it does not list."""
    listed = layout_listing(layout)
    problems = [f"layout: {path} is not in the repository" for path in listed if path not in files
                and not (path.endswith(".py") and path.rsplit("/", 2)[0] + "/" + path.rsplit("/", 1)[1] in files)]  # fmt: skip
    modules = sorted(f for f in files if re.match(r"^fluxexport/([\w]+/)?[\w]+\.py$", f) and "__init__" not in f)
    problems += [f"layout: {module} is missing" for module in modules if module not in listed]
    return problems


def test_readme_names_only_files_the_repository_holds():
    text = README.read_text()
    files = repository_files()
    problems = []
    layout = next(block for block in readme_blocks(text) if block.language == "" and "fluxexport/" in block.text)
    problems += layout_problems(layout.text, files)
    prose = text.replace(layout.text, "")
    for line in prose.splitlines():
        for target in re.findall(r"\]\(([^)#]+)\)", line):  # markdown links
            if not re.match(r"^[a-z]+://", target) and not (ROOT / target).exists():
                problems.append(f"link {target} is not in the repository")
        for token in PATH_TOKEN.findall(line):
            problem = named_path_problem(token, files)
            if problem:
                problems.append(f"{problem}: {line.strip()[:100]}")
    assert not problems, "\n".join(sorted(set(problems)))


def test_the_path_check_catches_what_the_issue_found():
    """The check sees the README's old mistakes: a link to a file outside the repository, modules that do not
    exist, and a module missing from the layout block."""
    files = repository_files()
    assert named_path_problem("ARCHITECTURE.md", files) == "ARCHITECTURE.md is not in the repository"
    assert named_path_problem("fluxexport/specs.py", files) == "fluxexport/specs.py is not in the repository"
    assert named_path_problem("triton/releases.py", files) == "triton/releases.py is not in the repository"
    assert named_path_problem("runtime/pipeline.py", files) is None
    assert named_path_problem("engines/tiny-dev/onnx", files) is None
    layout = "fluxexport/\n  triton/  config.py, bls.py,\n           missing.py\n  spam.py  nothing\n"
    problems = layout_problems(layout, files)
    assert "layout: fluxexport/triton/missing.py is not in the repository" in problems
    assert "layout: fluxexport/spam.py is not in the repository" in problems
    assert "layout: fluxexport/triton/client.py is missing" in problems
    assert "layout: fluxexport/triton/config.py is missing" not in problems


def test_block_parsing():
    text = "x\n<!-- readme-test: help-only -->\n```bash\nfluxexport build --model M \\\n    --out X  # c\n# only\n```\n"
    (block,) = readme_blocks(text)
    assert (block.line, block.language, block.marker) == (3, "bash", "help-only")
    assert shell_commands(block.text) == ["fluxexport build --model M      --out X  # c"]
    assert simple_commands("COLUMNS=80 /usr/bin/time -v fluxexport a --b=1 && kubectl x | y  # z") == [
        ["fluxexport", "a", "--b=1"], ["kubectl", "x"], ["y"]
    ]  # fmt: skip
    assert options_of(["fluxexport", "a", "--b=1", "-c", "--d"]) == ["--b", "--d"]


def test_the_command_checks_fail_when_they_should(tmp_path):
    """help-only: an unknown subcommand or option fails; refusal: a traceback or a second error line fails."""
    env = dict(os.environ)
    assert check_help_only(["fluxexport", "build", "--precision", "fp8", "--weight-streaming"], tmp_path, env) is None
    assert check_help_only(["fluxexport", "build", "--nonsense", "1"], tmp_path, env) == (
        "fluxexport build has no option --nonsense"
    )
    assert "exits 2" in check_help_only(["fluxexport", "nosuch"], tmp_path, env)
    assert (
        check_help_only(["python", "scripts/nosuch.py"], tmp_path, env) == "scripts/nosuch.py is not in the repository"
    )
    assert check_help_only(["kubectl", "apply", "-f", "x.yaml"], tmp_path, env) is None

    def done(code: int, err: str) -> subprocess.CompletedProcess:
        return subprocess.CompletedProcess([], code, "", err)

    assert check_refusal(done(0, "")) is None
    assert check_refusal(done(1, "export tiny-dev → engines\nError: TensorRT is not installed: …\n")) is None
    assert check_refusal(done(1, "Traceback (most recent call last):\nValueError: x\n")) is not None
    assert check_refusal(done(1, "Error: one\nError: two\n")) is not None
    assert check_refusal(done(1, "Error: one\nmore text after it\n")) is not None
    assert check_refusal(done(137, "Error: killed\n")) is not None
