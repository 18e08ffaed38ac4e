"""Fuzzing every request value (issue 29), with Hypothesis: random values for every `run` option (and `bench`'s
request options) through the CLI in-process, and random tensors of every dtype and shape for every flux_pipeline
input through the Triton model in-process. The property: an image of the size asked for, or a refusal in one line
with no traceback; never a hang (each case under CASE_SECONDS), never a NaN image (the runtime refuses to
convert one), nothing half-written. The suite runs a bounded, derandomized number of examples;
`scripts/fuzz_requests.py` runs the same properties longer."""

from __future__ import annotations

import contextlib
import re
import signal
from pathlib import Path

import numpy as np
import pytest
from helpers import cli_invoke
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

CASE_SECONDS = 120  # a case that takes longer hangs, as far as the property is concerned
TINY_SIDE, TINY_STEPS, TINY_MAX_SIDE = 256, 4, 1024  # tiny-schnell's defaults and the largest side it serves
BUDGET = 16 * 2 * 2  # image tokens × steps × images of a case that runs (the suite's time, not a limit of ours)
SUITE = settings(
    max_examples=12,
    derandomize=True,
    deadline=None,  # each case is bounded by time_limit instead (a model load is seconds on a loaded machine)
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture],
)


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise TimeoutError in this (the main) thread if the block runs past `seconds`."""

    def expire(*_args):
        raise TimeoutError(f"the case ran past {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ---- values: mostly small valid ones (so that cases run), and anything at all ----------------------------------

ANY_INT = st.integers(-(2**70), 2**70)
SIDES = st.one_of(st.none(), st.sampled_from([16, 32, 48, 64]), st.sampled_from([0, 8, 17, 1024, 1040]), ANY_INT)
STEPS = st.one_of(st.none(), st.integers(1, 2), st.sampled_from([0, 1000, 1001]), ANY_INT)
COUNTS = st.one_of(st.integers(1, 2), st.sampled_from([0, 64, 65]), ANY_INT)
FLOATS = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True))
TEXTS = st.one_of(st.text(max_size=40), st.sampled_from(["", "  ", "a red fox", "x" * 20000, "-x", "日本語の猫"]))
CACHES = st.one_of(
    st.none(),
    st.sampled_from(["none", "taylorseer", "taylorseer:interval=2,order=2,warmup=1", "first-block:threshold=0.2",
                     "magcache:ratios=flux-dev", "magcache", "magic", "taylorseer:interval=0", "taylorseer:interval",
                     "first-block:threshold=nan", "taylorseer:order=1e400", "magcache:ratios=/etc/passwd"]),
    st.text(max_size=30),
)  # fmt: skip


def valid_side(value) -> bool:
    return value is None or (16 <= value <= TINY_MAX_SIDE and value % 16 == 0)


def affordable(height, width, steps, count) -> bool:
    """Whether a request that may be valid is small enough for the suite (refused ones always are)."""
    valid = valid_side(height) and valid_side(width) and (steps is None or 1 <= steps <= 1000) and 1 <= count <= 64
    if not valid:
        return True
    tokens = ((height or TINY_SIDE) // 16) * ((width or TINY_SIDE) // 16)
    return tokens * (steps or TINY_STEPS) * count <= BUDGET


# `run`'s request options: values tiny-schnell serves (None: left out) and anything of the option's type
RUN_SERVED = {
    "prompt": st.sampled_from(["a red fox", "a cat", "日本語の猫"]), "prompt-2": st.none() | st.just("a fox"),
    "negative-prompt": st.none(), "height": st.sampled_from([16, 32, 48, 64]),
    "width": st.sampled_from([16, 32, 48, 64]), "steps": st.integers(1, 2),
    "guidance": st.none() | st.floats(-10, 10), "seed": st.none() | st.integers(0, 2**32),
    "num-images": st.integers(1, 2), "max-sequence-length": st.none() | st.integers(1, 512),
    "cache": st.none() | st.sampled_from(["none", "taylorseer", "taylorseer:interval=2,order=2,warmup=1"]),
    "image": st.none(),
}  # fmt: skip
RUN_ANY = {
    "prompt": TEXTS, "prompt-2": TEXTS, "negative-prompt": TEXTS, "height": SIDES, "width": SIDES, "steps": STEPS,
    "guidance": FLOATS, "seed": ANY_INT, "num-images": COUNTS, "max-sequence-length": ANY_INT, "cache": CACHES,
    "image": st.sampled_from(["picture.png", "notes.txt", "empty.png", "missing.png"]),
}  # fmt: skip


@st.composite
def one_fault(draw, served: dict, anything: dict) -> dict:
    """Every option at a value the model serves; then, in three requests of four, one (or, now and then, each)
    option at any value of its type, so that refusals are met one at a time and together."""
    options = {name: draw(strategy) for name, strategy in served.items()}
    faults = draw(st.sampled_from(["none", "one", "one", "all"]))
    names = list(anything) if faults == "all" else [draw(st.sampled_from(list(anything)))] if faults == "one" else []
    for name in names:
        options[name] = draw(anything[name])
    return options


@st.composite
def run_options(draw) -> dict:
    """`run`'s request options, each left out (None) or a value."""
    options = draw(one_fault(RUN_SERVED, RUN_ANY))
    assume(affordable(options["height"], options["width"], options["steps"], options["num-images"]))
    return options


def command_line(options: dict, files: Path) -> list[str]:
    args = []
    for name, value in options.items():
        if value is not None:
            args.append(f"--{name}={files / value if name == 'image' else value}")
    return args


def write_files(folder: Path) -> Path:
    """The files `--image` may name: a picture, text, an empty .png; `missing.png` is not written."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (96, 80), (200, 30, 40)).save(folder / "picture.png")
    (folder / "notes.txt").write_text("not a picture")
    (folder / "empty.png").write_bytes(b"")
    return folder


def check_cli_outcome(result, out: Path, options: dict, count_flag: str = "num-images") -> None:
    """The property for one command: exit 0 with every image written whole at its size, or exit 1 with one line
    `Error: …`, no traceback, nothing written."""
    assert result.exception is None or isinstance(result.exception, SystemExit), (options, result.exception)
    assert "Traceback" not in result.output, options
    written = sorted(out.iterdir())
    if result.exit_code == 0:
        height, width = options.get("height") or TINY_SIDE, options.get("width") or TINY_SIDE
        assert len(written) == options[count_flag], (options, written)
        for path in written:
            with Image.open(path) as image:
                image.load()
                assert image.size == (width, height) and image.mode == "RGB", (options, image.size)
        return
    check_refusal(result, options)
    assert written == [], (options, written)


def check_refusal(result, options: dict) -> None:
    """Exit 1 and one line `Error: …` (refused before any work: nothing else printed), or click's own refusal of a
    value it parses (exit 2: its usage hint, then one `Error: Invalid value …` line)."""
    lines = result.output.strip().splitlines()
    assert lines and lines[-1].startswith("Error: "), (options, result.output)
    if result.exit_code == 2:
        assert lines[0].startswith("Usage: ") and lines[-1].startswith("Error: Invalid value"), (options, lines)
    else:
        assert result.exit_code == 1 and len(lines) == 1, (options, result.output)


def fuzz_run_case(options: dict, root: Path, case: int) -> str:
    """One `run`; "image" or "refused" once the property holds."""
    files, out = write_files(root / "files"), root / f"out{case}"
    out.mkdir(parents=True)
    with time_limit(CASE_SECONDS):
        result = cli_invoke("run", *command_line(options, files), f"--output={out / 'image.png'}")
    check_cli_outcome(result, out, options)
    return "image" if result.exit_code == 0 else "refused"


@pytest.mark.slow
def test_run_fuzzed_answers_an_image_or_one_line(tmp_path):
    cases = iter(range(10**6))

    @SUITE
    @given(run_options())
    def run_case(options):
        fuzz_run_case(options, tmp_path, next(cases))

    run_case()


BENCH_NAMES = {"height": "height", "width": "width", "steps": "steps", "batch": "num-images", "cache": "cache"}


@st.composite
def bench_options(draw) -> dict:
    served = {flag: RUN_SERVED[name] for flag, name in BENCH_NAMES.items()}
    options = draw(one_fault(served, {flag: RUN_ANY[name] for flag, name in BENCH_NAMES.items()}))
    assume(affordable(options["height"], options["width"], options["steps"], options["batch"]))
    return options


def fuzz_bench_case(options: dict, root: Path, case: int) -> str:
    """bench with --warmup 0 --repeats 1: its JSON written ("measured"), or one line ("refused")."""
    out = root / f"bench{case}"
    out.mkdir(parents=True)
    args = [f"--{name}={value}" for name, value in options.items() if value is not None]
    with time_limit(CASE_SECONDS):
        result = cli_invoke("bench", *args, "--warmup=0", "--repeats=1", f"--json={out / 'bench.json'}")
    assert result.exception is None or isinstance(result.exception, SystemExit), (options, result.exception)
    if result.exit_code == 0:
        assert [p.name for p in out.iterdir()] == ["bench.json"], options
        return "measured"
    check_refusal(result, options)
    assert list(out.iterdir()) == [], options
    return "refused"


@pytest.mark.slow
def test_bench_fuzzed_answers_or_refuses_in_one_line(tmp_path):
    cases = iter(range(10**6))

    @settings(SUITE, max_examples=6)
    @given(bench_options())
    def bench_case(options):
        fuzz_bench_case(options, tmp_path, next(cases))

    bench_case()


# ---- flux_pipeline's inputs as tensors, in-process -------------------------------------------------------------

DTYPES = [np.uint8, np.int32, np.int64, np.float32, np.float16, np.bool_, np.object_]
PIPELINE_TYPES = {"TYPE_STRING": np.object_, "TYPE_INT32": np.int32, "TYPE_INT64": np.int64, "TYPE_FP32": np.float32,
                  "TYPE_UINT8": np.uint8}  # fmt: skip
TEXT_VALUES = st.one_of(
    st.binary(max_size=40), st.text(max_size=40).map(str.encode),
    st.sampled_from([b"", b"a red fox", b"\xff\xfe", b"x" * 70000, b"magic", b"taylorseer:interval=2",
                     b"magcache:ratios=../../etc/passwd.json", b"first-block:threshold=0.1", b"ink"]),
)  # fmt: skip
INT32 = st.integers(-(2**31), 2**31 - 1)
SMALL = {np.int32: st.one_of(st.sampled_from([0, 1, 2, -1, 17, 2000]), INT32),
         np.int64: st.one_of(st.sampled_from([0, 1, 7, -1]), st.integers(-(2**63), 2**63 - 1)),
         np.float32: st.floats(width=32, allow_nan=True, allow_infinity=True),
         np.float16: st.floats(width=16, allow_nan=True, allow_infinity=True),
         np.uint8: st.integers(0, 255), np.bool_: st.booleans()}  # fmt: skip


# per flux_pipeline input, values tiny-schnell's deployment serves (64..1024 px); None leaves the input out
PIPELINE_SERVED = {
    "prompt": st.sampled_from(["a red fox", "a cat", "日本語の猫"]).map(str.encode),
    "prompt_2": st.none() | st.just(b"a fox"), "height": st.sampled_from([64, 80]), "width": st.sampled_from([64, 96]),
    "num_inference_steps": st.integers(1, 2), "guidance_scale": st.none() | st.floats(-10, 10, width=32),
    "seed": st.none() | st.integers(0, 2**32), "num_images": st.none() | st.just(1),
    "cache": st.none() | st.sampled_from([b"none", b"taylorseer:interval=2"]),
    "lora": st.none() | st.just(b"ink"),  # the repository's one LoRA (conftest's schnell_repository)
}  # fmt: skip


@st.composite
def tensor(draw, dtype: type, reference: bool, shapes=((1,),), values=None):
    """A tensor of `dtype` for one input: one value (a shape of `shapes`), or [H,W,C] for a reference image."""
    if reference and dtype is np.uint8:
        shape = draw(st.tuples(st.integers(0, 90), st.integers(0, 90), st.sampled_from([3, 3, 1, 4])))
        return np.asarray(draw(hnp.arrays(np.uint8, shape)), dtype=np.uint8)
    shape = draw(st.sampled_from(shapes))
    size = int(np.prod(shape))
    if dtype is np.object_:
        texts = draw(st.lists(TEXT_VALUES if values is None else values, min_size=size, max_size=size))
        return np.array([*texts, None], dtype=object)[:-1].reshape(shape)  # keeps bytes objects as they are
    numbers = draw(st.lists(SMALL[dtype] if values is None else values, min_size=size, max_size=size))
    with np.errstate(over="ignore"):
        return np.array(numbers, dtype=dtype).reshape(shape)


@st.composite
def pipeline_tensors(draw, config) -> dict[str, np.ndarray]:
    """A request the deployment serves; then, in three of four, one input (now and then each) replaced by a
    tensor of its type with any value, of any dtype and shape, or left out (the prompt too)."""
    types = {item.name: PIPELINE_TYPES[config_type(item)] for item in config.input}
    tensors = {}
    for name, strategy in PIPELINE_SERVED.items():
        value = draw(strategy)
        if name in types and value is not None:
            tensors[name] = np.array([value], dtype=types[name])
    faults = draw(st.sampled_from(["none", "one", "one", "all"]))
    names = list(types) if faults == "all" else [draw(st.sampled_from(list(types)))] if faults == "one" else []
    for name in names:
        tensors.pop(name, None)
        kind = draw(st.sampled_from(["value", "value", "any", "out"]))
        shapes = ((1,), (), (0,), (2,), (1, 1), (3, 1, 2))
        if kind == "value":
            tensors[name] = draw(tensor(types[name], name.startswith("image")))
        elif kind == "any":
            tensors[name] = draw(tensor(draw(st.sampled_from(DTYPES)), name.startswith("image"), shapes))
    return tensors


def config_type(item) -> str:
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2.DataType.Name(item.data_type)


def triton_accepts(config, tensors: dict[str, np.ndarray]) -> bool:
    """What Triton itself checks against config.pbtxt before model.py sees a request (else it answers 400):
    known names, required inputs present, dtypes, ranks and fixed dims."""
    inputs = {item.name: item for item in config.input}
    if set(tensors) - set(inputs) or any(not i.optional and n not in tensors for n, i in inputs.items()):
        return False
    for name, array in tensors.items():
        item = inputs[name]
        if array.dtype != np.dtype(PIPELINE_TYPES[config_type(item)]) or array.ndim != len(item.dims):
            return False
        if any(d not in (-1, n) for d, n in zip(item.dims, array.shape, strict=True)):
            return False
    return True


def one(tensors, name):
    array = tensors.get(name)
    return None if array is None or array.size != 1 else array.reshape(-1)[0]


def pipeline_affordable(tensors) -> bool:
    """The cost guard of `affordable`, on the values a request's tensors hold."""

    def value(name):
        v = one(tensors, name)
        return None if v is None or not isinstance(v, np.integer) else int(v)

    count = value("num_images")
    return affordable(value("height"), value("width"), value("num_inference_steps"), 1 if count is None else count)


def check_pipeline_outcome(response, tensors, TritonError) -> str:
    """An image of the size asked for ("image"), or INVALID_ARG in one line ("invalid"); never INTERNAL for what a
    client sent."""
    if response.has_error():
        error = response.error()
        assert error.code() == TritonError.INVALID_ARG, (error.message(), {k: v.dtype for k, v in tensors.items()})
        assert "\n" not in error.message() and error.message()
        return "invalid"
    images = response.outputs["images"].as_numpy()
    assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[3] == 3
    height = one(tensors, "height")
    assert height is None or images.shape[1] == height
    return "image"


def fuzz_pipeline_case(server, config, tensors, standin) -> str:
    """One request through flux_pipeline's model.py as Triton would pass it (after its own config checks):
    "triton" (refused by Triton itself), "invalid" or "image"."""
    if not triton_accepts(config, tensors):
        return "triton"  # Triton answers 400 before model.py runs
    request = standin.InferenceRequest("flux_pipeline", [], [standin.Tensor(n, a) for n, a in tensors.items()])
    with time_limit(CASE_SECONDS):
        response = server.models["flux_pipeline"].execute([request])[0]
    return check_pipeline_outcome(response, tensors, standin.TritonError)


@contextlib.contextmanager
def in_process(repository: Path):
    """The repository's models loaded in this process behind the stand-in python backend (test_triton_flux2's)."""
    import sys

    from test_triton_flux2 import InferenceRequest, InProcessServer, standin_pb_utils

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "triton_python_backend_utils", standin_pb_utils())
        server = InProcessServer(repository)
        patch.setattr(InferenceRequest, "server", server)
        yield server, sys.modules["triton_python_backend_utils"]


@pytest.fixture(scope="module")
def in_process_schnell(schnell_repository):
    """tiny-schnell's repository (the session's, conftest), its models loaded in this process."""
    with in_process(schnell_repository) as served:
        yield served


def test_pipeline_inputs_fuzzed_answer_an_image_or_invalid_argument(in_process_schnell):
    server, standin = in_process_schnell
    config = server.configs["flux_pipeline"]

    @settings(SUITE, max_examples=40)
    @given(pipeline_tensors(config))
    def pipeline_case(tensors):
        assume(pipeline_affordable(tensors))
        fuzz_pipeline_case(server, config, tensors, standin)

    pipeline_case()


# ---- `--lora` lists, `--image` sets, `validate`'s request options ---------------------------------------------

LORA_MODELS = {"tiny-schnell": "tiny-klein", "tiny-klein": "tiny-schnell"}  # a model and the other family's
SCALES = st.one_of(
    st.none(), st.floats(-2, 2), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -1.0, 10.0, 10.5, -10.5, 1e308, float("nan"), float("inf"), float("-inf")]),
)  # fmt: skip
MALFORMED_LORAS = st.sampled_from(["", ":", ":1", "{own}:", "{own}:abc", "{own}:1:2", "{own}: 1", "{own}:0x10",
                                   "{own}:1e", "{own},{own}", "{own}:nan:inf"])  # fmt: skip


def write_lora_files(folder: Path) -> Path:
    """The files `--lora` may name: a tiny LoRA per model of LORA_MODELS (written by our own tiny_lora), a junk
    .safetensors, a folder named like a LoRA; `missing.safetensors` is not written."""
    from fluxexport.models.source import resolve_model
    from fluxexport.models.tiny_lora import write_tiny_lora

    folder.mkdir(parents=True, exist_ok=True)
    for model in LORA_MODELS:
        if not (folder / f"{model}.safetensors").exists():
            write_tiny_lora(resolve_model(model), folder / f"{model}.safetensors")
    (folder / "junk.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    (folder / "folder.safetensors").mkdir(exist_ok=True)
    return folder


@st.composite
def lora_entry(draw, model: str, files: Path) -> str:
    """One `--lora` value: a file of some kind with or without a scale, or a malformed FILE:SCALE."""
    names = {"own": f"{model}.safetensors", "other": f"{LORA_MODELS[model]}.safetensors",
             "junk": "junk.safetensors", "missing": "missing.safetensors", "dir": "folder.safetensors"}  # fmt: skip
    kind = draw(st.sampled_from(["own", "own", "own", "other", "junk", "missing", "dir", "malformed"]))
    if kind == "malformed":
        return draw(MALFORMED_LORAS).format(own=files / names["own"])
    scale = draw(SCALES)
    return f"{files / names[kind]}" + ("" if scale is None else f":{scale}")


@st.composite
def lora_run_options(draw, files: Path) -> dict:
    """A small request `run` serves, on tiny-schnell or tiny-klein, with a list of 0–3 `--lora` values."""
    model = draw(st.sampled_from(list(LORA_MODELS)))
    loras = draw(st.lists(lora_entry(model, files), max_size=3))
    return {"model": model, "height": 16, "width": 16, "steps": 1, "num-images": 1, "lora": loras}


def repeated(options: dict) -> list[str]:
    """The command line of `options`, a list value repeating its flag."""
    args = []
    for name, value in options.items():
        for item in value if isinstance(value, list) else [value]:
            args.append(f"--{name}={item}")
    return args


PROGRESS_LINE = re.compile(r"^\S.* \d+/\d+ \d+:\d\d:\d\d$")  # the progress bar's line, as click's runner sees it


def check_files_outcome(result, out: Path, options: dict) -> str:
    """check_cli_outcome, counted: a LoRA made for another model's layers too is refused before any weight is
    read (checked against the modules built on the meta device), in one line."""
    check_cli_outcome(result, out, options)
    return "image" if result.exit_code == 0 else "refused"


def fuzz_lora_case(options: dict, root: Path, case: int) -> str:
    """One `run` with a fuzzed `--lora` list: "image" or "refused" once the property holds."""
    out = root / f"lora{case}"
    out.mkdir(parents=True)
    with time_limit(CASE_SECONDS):
        result = cli_invoke("run", *repeated(options), "--prompt=a cat", f"--output={out / 'image.png'}")
    return check_files_outcome(result, out, options)


IMAGE_MODES = {"RGB": ("PNG", "JPEG"), "RGBA": ("PNG",), "L": ("PNG", "JPEG"), "P": ("PNG",), "I;16": ("PNG",),
               "1": ("PNG",), "CMYK": ("JPEG",), "LA": ("PNG",)}  # fmt: skip
IMAGE_SIDES = st.one_of(  # sides FLUX.2 takes (at least 64 px) as often as any others
    st.sampled_from([64, 80, 96]), st.integers(1, 96), st.sampled_from([1, 2, 3, 15, 16, 63, 4000])
)


@st.composite
def image_spec(draw) -> tuple:
    """One `--image` file: ("picture", mode, format, width, height), or a truncated picture, a text file, a
    missing path."""
    kind = draw(st.sampled_from(["picture", "picture", "picture", "picture", "truncated", "text", "missing"]))
    if kind != "picture":
        return (kind,)
    mode = draw(st.sampled_from(list(IMAGE_MODES)))
    width, height = draw(IMAGE_SIDES), draw(IMAGE_SIDES)
    assume(width * height <= 4000 * 8)  # extreme aspects, not huge pictures
    return ("picture", mode, draw(st.sampled_from(IMAGE_MODES[mode])), width, height)


def write_image(spec: tuple, path: Path) -> Path:
    """The file of an image_spec, written by PIL (a picture of random content), or by hand (text, truncated)."""
    if spec[0] == "missing":
        return path.with_suffix(".png")
    if spec[0] == "text":
        path.with_suffix(".png").write_text("not a picture")
        return path.with_suffix(".png")
    if spec[0] == "truncated":
        Image.new("RGB", (64, 48), (10, 200, 30)).save(path.with_suffix(".png"))
        whole = path.with_suffix(".png").read_bytes()
        path.with_suffix(".png").write_bytes(whole[: len(whole) // 2])
        return path.with_suffix(".png")
    _, mode, fmt, width, height = spec
    noise = np.random.default_rng(width * 7919 + height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    picture = Image.fromarray(noise).convert(mode) if mode != "I;16" else Image.fromarray(
        noise[..., 0].astype(np.uint16) * 257).convert("I;16")  # fmt: skip
    target = path.with_suffix(".png" if fmt == "PNG" else ".jpg")
    picture.save(target, fmt)
    return target


@st.composite
def image_run_options(draw) -> dict:
    """A small request on tiny-kontext, tiny-klein (references) or tiny-schnell (which takes none) with 0–3
    `--image` files."""
    model = draw(st.sampled_from(["tiny-kontext", "tiny-klein", "tiny-schnell"]))
    images = draw(st.lists(image_spec(), max_size=3))
    return {"model": model, "height": 16, "width": 16, "steps": 1, "num-images": 1, "image": images}


def fuzz_image_case(options: dict, root: Path, case: int) -> str:
    """One `run` with fuzzed `--image` files: "image" or "refused" once the property holds."""
    files, out = root / f"images{case}", root / f"imageout{case}"
    files.mkdir(parents=True)
    out.mkdir(parents=True)
    paths = [write_image(spec, files / f"reference{i}") for i, spec in enumerate(options["image"])]
    with time_limit(CASE_SECONDS):
        result = cli_invoke("run", *repeated({**options, "image": paths}), "--prompt=a cat",
                            f"--output={out / 'image.png'}")  # fmt: skip
    return check_files_outcome(result, out, options)


VALIDATE_SERVED = {
    "steps": st.just(1), "components": st.none(), "max-rel-l2": st.none(), "min-psnr": st.none(),
    "cache": st.none(), "report": st.just("report.json"),
}  # fmt: skip
VALIDATE_ANY = {
    "steps": STEPS, "max-rel-l2": FLOATS, "min-psnr": FLOATS, "cache": CACHES,
    "components": st.one_of(st.sampled_from(["clip", "vae_decoder", "clip,vae_decoder", "magic", ",", "", "clip,clip",
                                             "transformer_head"]), st.text(max_size=20)),
    "report": st.sampled_from(["report.json", "folder", "missing/report.json", ""]),
    "text-encoder-layers": st.sampled_from(["9,18,27", "1,2", "x", ""]),
    "lora": st.sampled_from(["junk.safetensors", "missing.safetensors", "tiny-schnell.safetensors:nan"]),
}  # fmt: skip


@st.composite
def validate_options(draw) -> dict:
    """`validate`'s request options: a cheap valid comparison (one step), with one (or each) option fuzzed."""
    options = draw(one_fault(VALIDATE_SERVED, VALIDATE_ANY))
    steps = options["steps"]
    assume(steps is not None or len(options) > 0)
    if steps is None or 1 <= steps <= 1000:  # a comparison that may run: keep it cheap
        assume(steps is not None and steps <= 1)
    return options


def fuzz_validate_case(options: dict, engines: Path, files: Path, root: Path, case: int) -> str:
    """One `validate` on an exported folder: its report written ("passed", or "failed": thresholds missed, one
    `Error:` line last), or refused in one line with nothing written ("refused")."""
    out = root / f"validate{case}"
    (out / "folder").mkdir(parents=True)
    values = {}
    for name, value in options.items():
        if value is not None:
            values[name] = out / value if name == "report" and value else files / value if name == "lora" else value
    before = sorted(p.name for p in engines.iterdir())
    with time_limit(CASE_SECONDS):
        result = cli_invoke("validate", "--model=tiny-schnell", f"--engines={engines}", *repeated(values))
    assert result.exception is None or isinstance(result.exception, SystemExit), (options, result.exception)
    assert "Traceback" not in result.output, options
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    after = sorted(p.name for p in engines.iterdir())
    assert set(after) - set(before) <= {"validation.json"}, (options, after)
    if result.exit_code == 0 or "does not match PyTorch" in result.output:
        assert result.output.strip().splitlines()[-1].startswith("Error: ") == (result.exit_code != 0), options
        assert options["report"] != "report.json" or "report.json" in written, (options, written)
        return "passed" if result.exit_code == 0 else "failed"
    lines = result.output.strip().splitlines()
    if len(lines) > 1 and all(PROGRESS_LINE.match(line) for line in lines[:-1]):
        # a graph the comparison needs that the folder lacks is found once it opens, under the progress bar
        assert result.exit_code == 1 and lines[-1].startswith("Error: ") and "has no" in lines[-1], lines
        assert written == ["folder"], (options, written)
        return "refused late"
    check_refusal(result, options)
    assert written == ["folder"], (options, written)
    return "refused"


@pytest.fixture(scope="module")
def lora_files(cache_root, tmp_path_factory) -> Path:
    return write_lora_files(tmp_path_factory.mktemp("loras"))


@pytest.mark.slow
def test_run_fuzzed_lora_lists_answer_an_image_or_one_line(lora_files, tmp_path):
    cases = iter(range(10**6))

    @settings(SUITE, max_examples=6)
    @given(lora_run_options(lora_files))
    def lora_case(options):
        fuzz_lora_case(options, tmp_path, next(cases))

    lora_case()


@pytest.mark.slow
def test_run_fuzzed_reference_images_answer_an_image_or_one_line(cache_root, tmp_path):
    cases = iter(range(10**6))

    @settings(SUITE, max_examples=6)
    @given(image_run_options())
    def image_case(options):
        fuzz_image_case(options, tmp_path, next(cases))

    image_case()


@pytest.mark.slow
def test_validate_fuzzed_reports_or_refuses_in_one_line(exports, lora_files, tmp_path):
    engines = exports["tiny-schnell"]
    cases = iter(range(10**6))

    @settings(SUITE, max_examples=5)
    @given(validate_options())
    def validate_case(options):
        fuzz_validate_case(options, engines, lora_files, tmp_path, next(cases))

    validate_case()


def test_what_the_fuzzing_found_is_refused_in_one_line(cache_root, tmp_path):
    """The cases fuzzing found, each refused before work in the line that names it: a Kontext reference under
    16 px (was ZeroDivisionError), validate's NaN threshold (ran the whole comparison), a --report folder or a
    --report in a missing folder (a traceback after the comparison)."""
    from helpers import cli_refusal

    one = write_image(("picture", "RGB", "PNG", 1, 1), tmp_path / "one")
    refusal = cli_refusal("run", "--model=tiny-kontext", "--prompt=a cat", "--height=16", "--width=16", "--steps=1", f"--image={one}",
                          f"--output={tmp_path / 'out.png'}")  # fmt: skip
    assert refusal == "Error: the reference image is 1×1: both sides must be at least 16 px (--image)"
    assert not (tmp_path / "out.png").exists()
    engines = tmp_path / "no-graphs"  # never opened: the request values are refused first
    for args, message in (
        (["--max-rel-l2=nan"], "--max-rel-l2 must be a finite number at least 0, got nan"),
        (["--max-rel-l2=-1"], "--max-rel-l2 must be a finite number at least 0, got -1.0"),
        (["--min-psnr=inf"], "--min-psnr must be a finite number of dB, got inf"),
        ([f"--report={tmp_path}"], f"--report {tmp_path} is a folder: name the JSON file to write"),
        ([f"--report={tmp_path / 'a' / 'r.json'}"], f"--report {tmp_path / 'a' / 'r.json'}: folder {tmp_path / 'a'} does not exist"),
    ):  # fmt: skip
        assert cli_refusal("validate", f"--engines={engines}", *args) == f"Error: {message}"
