"""Start and stop a local tritonserver on 127.0.0.1 (development and tests).

The binary: `--tritonserver PATH`, `tritonserver` on $PATH, or the one the nvidia-pytriton wheel ships (which
has only the python backend). The python backend runs model.py files with the python found first on PATH,
so the chosen environment's bin goes first; its numpy must be < 2 (the stub is built against numpy 1).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

from fluxexport.errors import FluxExportError


def find_tritonserver(explicit: str | None = None) -> Path:
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise FluxExportError(f"--tritonserver {path} does not exist")
        return path
    found = shutil.which("tritonserver")
    if found:
        return Path(found)
    spec = importlib.util.find_spec("pytriton")  # located, not imported: it needs packages we do not
    if spec is not None and spec.submodule_search_locations:
        shipped = Path(next(iter(spec.submodule_search_locations))) / "tritonserver" / "bin" / "tritonserver"
        if shipped.is_file():
            return shipped
    raise FluxExportError(
        "no tritonserver binary found: pass --tritonserver PATH, put one on $PATH (NVIDIA's Triton image), "
        "or pip install --no-deps nvidia-pytriton"
    )


ENVIRONMENT_VARIABLE = "FLUXEXPORT_TRITON_ENV"  # the environment's prefix, when not --python-env


def checkout_root() -> Path | None:
    """The source checkout this fluxexport runs from (an editable install), or None for an installed wheel."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() and (root / "scripts" / "setup_triton_env.sh").is_file() else None


def environment_candidates(explicit: str | None = None) -> list[Path]:
    """Where the models' environment is looked for, in order: --python-env, $FLUXEXPORT_TRITON_ENV, then the
    checkout's own .venv-triton (found from this package's location, never from the working directory)."""
    root = checkout_root()
    named = [explicit, os.environ.get(ENVIRONMENT_VARIABLE), str(root / ".venv-triton") if root else None]
    return [Path(candidate).expanduser().absolute() for candidate in named if candidate]


def environment_hint() -> str:
    """How to make the environment, as a command that works from any directory."""
    root = checkout_root()
    made = f"create it with bash {root / 'scripts' / 'setup_triton_env.sh'}, or " if root else ""
    return (
        f"{made}pass --python-env PREFIX (or set {ENVIRONMENT_VARIABLE}=PREFIX) naming an environment with "
        "numpy<2, onnxruntime and fluxexport"
    )


def python_environment(explicit: str | None = None) -> Path:
    """The environment (prefix) whose python runs the models: the first of `environment_candidates` that has a
    python, or this one; refused when it cannot import the models' packages or its numpy is 2 or newer."""
    for given, named in ((explicit, "--python-env"), (os.environ.get(ENVIRONMENT_VARIABLE), ENVIRONMENT_VARIABLE)):
        if given and not (Path(given) / "bin" / "python").exists():
            raise FluxExportError(f"{named} {given} has no bin/python: {environment_hint()}")
        if given:
            break
    prefix = next(
        (path for path in environment_candidates(explicit) if (path / "bin" / "python").exists()), Path(sys.prefix)
    )
    try:
        version = subprocess.run(
            [str(prefix / "bin" / "python"), "-c", "import numpy, onnxruntime, fluxexport; print(numpy.__version__)"],
            capture_output=True, text=True, timeout=120, check=True,
        ).stdout.strip()  # fmt: skip
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError):
        raise FluxExportError(
            f"the python environment {prefix} cannot import numpy, onnxruntime and fluxexport: {environment_hint()}"
        ) from None
    if int(version.split(".")[0]) >= 2:
        raise FluxExportError(
            f"{prefix} has numpy {version}; Triton's python backend stub needs numpy<2: {environment_hint()}"
        )
    return prefix


def shared_libpython_dir(prefix: Path) -> str | None:
    """The folder of the environment's own libpython, when it has one: the stub links libpython dynamically and
    must load the one that matches the environment's standard library (not whichever the system has)."""
    query = "import sysconfig; print(sysconfig.get_config_var('LIBDIR') or '', sysconfig.get_config_var('Py_ENABLE_SHARED') or 0)"
    try:
        output = subprocess.run(
            [str(prefix / "bin" / "python"), "-c", query], capture_output=True, text=True, timeout=60, check=True
        ).stdout
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError):
        return None
    libdir, shared = output.split()
    return libdir if shared == "1" and any(Path(libdir).glob("libpython3*.so*")) else None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _backend_directory(binary: Path) -> Path | None:
    """For the pytriton binary: a folder laid out as Triton expects, with symlinks (the stub must not be
    copied). A regular Triton install finds its own backends."""
    root = binary.parent.parent
    stub = (
        root
        / "python_backend_stubs"
        / f"{sys.version_info.major}.{sys.version_info.minor}"
        / "triton_python_backend_stub"
    )
    library = root / "backends" / "python" / "libtriton_python.so"
    if not (stub.is_file() and library.is_file()):
        return None
    folder = Path(tempfile.mkdtemp(prefix="fluxexport-triton-backends-"))
    (folder / "python").mkdir()
    for path in (library, root / "backends" / "python" / "triton_python_backend_utils.py", stub):
        (folder / "python" / path.name).symlink_to(path)
    return folder


def check_repository(repository: Path) -> Path:
    repository = Path(repository)
    if not (repository.is_dir() and any(repository.glob("*/config.pbtxt"))):
        raise FluxExportError(
            f"{repository} is not a model repository: write one with fluxexport triton --model MODEL --engines DIR "
            f"--out {repository}"
        )
    return repository


class TritonServer:
    """A tritonserver process bound to 127.0.0.1 on free ports; use as a context manager."""

    def __init__(
        self, repository: Path, binary: Path | None = None, environment: Path | None = None, log: Path | None = None
    ):
        self.repository = check_repository(repository)
        self.binary = binary or find_tritonserver()
        self.environment = environment or python_environment()
        self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        self.shm_prefix = f"fluxexport_{os.getpid()}_{uuid.uuid4().hex[:8]}_"
        self.log = log or Path(tempfile.mkstemp(prefix="tritonserver-", suffix=".log")[1])
        self.process: subprocess.Popen | None = None
        self._backends: Path | None = None

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        """Triton's Prometheus metrics (nv_inference_count, queue and compute times per model)."""
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self, timeout: float = 300.0) -> TritonServer:
        self._backends = _backend_directory(self.binary)
        command = [
            str(self.binary), f"--model-repository={self.repository}",
            "--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1",
            f"--http-port={self.http_port}", f"--grpc-port={self.grpc_port}", f"--metrics-port={self.metrics_port}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}", "--log-verbose=0",
        ]  # fmt: skip
        if self._backends:
            command.append(f"--backend-directory={self._backends}")
        env = dict(os.environ, PATH=f"{self.environment / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
        libdir = shared_libpython_dir(self.environment)
        if libdir:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [libdir, os.environ.get("LD_LIBRARY_PATH")]))
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self.log.read_text(errors="replace")[-1500:]
                self.stop()
                raise FluxExportError(
                    f"tritonserver exited with {self.process.returncode} while loading models:\n{tail}"
                )
            try:
                with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise FluxExportError(f"tritonserver was not ready after {timeout:.0f} s (log: {self.log})")

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM by PID, SIGKILL past `timeout`; then the backend folder and any leftover shared memory go."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self._backends is not None:
            shutil.rmtree(self._backends, ignore_errors=True)
            self._backends = None
        for leftover in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
            leftover.unlink(missing_ok=True)

    def __enter__(self) -> TritonServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
