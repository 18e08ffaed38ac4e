"""Our TensorRT and polygraphy code, type-checked against TensorRT's own API (tensorrt-stubs 10.13) and
polygraphy's signatures, on machines where neither TensorRT nor a GPU exists."""

import os
from pathlib import Path

import pytest
from helpers import sanitized_tensorrt_stubs

ROOT = Path(__file__).resolve().parent.parent
CHECKED = ["fluxexport/tensorrt", "fluxexport/validate/engines.py"]  # every TensorRT and polygraphy call


@pytest.fixture(scope="module")
def mypy(tmp_path_factory):
    """Run mypy with the project's config and the sanitized stubs on MYPYPATH; returns (report, exit status)."""
    from mypy import api

    stubs = sanitized_tensorrt_stubs(tmp_path_factory.mktemp("stubs"))
    cache = tmp_path_factory.mktemp("mypy-cache")

    def run(*paths: str) -> tuple[str, int]:
        previous = os.environ.get("MYPYPATH")
        os.environ["MYPYPATH"] = str(stubs)
        try:
            stdout, stderr, status = api.run(
                ["--config-file", str(ROOT / "pyproject.toml"), "--cache-dir", str(cache), *paths]
            )
        finally:
            os.environ.pop("MYPYPATH") if previous is None else os.environ.__setitem__("MYPYPATH", previous)
        return stdout + stderr, status

    return run


def test_our_tensorrt_code_type_checks_against_tensorrt_and_polygraphy(mypy):
    report, status = mypy(*(str(ROOT / path) for path in CHECKED))
    assert status == 0, report
    assert "Success: no issues found" in report


def test_the_checker_sees_tensorrt_and_polygraphy(mypy, tmp_path):
    """Not vacuous: a misspelt TensorRT attribute and a wrong polygraphy keyword are errors."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import tensorrt as trt\n"
        "from polygraphy.backend.trt import NetworkFromOnnxPath\n"
        "severity = trt.Logger.WARNNG\n"
        "loader = NetworkFromOnnxPath('model.onnx', strongly_typd=True)\n"
        "context: trt.IExecutionContext\n"
        "context.execute_async_v3(stream=0)\n"
    )
    report, status = mypy(str(probe))
    assert status == 1
    assert 'has no attribute "WARNNG"' in report
    assert 'Unexpected keyword argument "strongly_typd" for "NetworkFromOnnxPath"' in report
    assert 'Unexpected keyword argument "stream" for "execute_async_v3"' in report
