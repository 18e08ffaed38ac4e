"""Helpers the test modules share (not tests themselves): diffusers' reference images, FLUX.1-shaped sources,
graph equality."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnx_ir as ir
import torch
from safetensors.torch import save_file

from fluxexport.models.source import ModelSource
from fluxexport.tensorrt.environment import Gpu


def truncated_clip_checkpoint(source: ModelSource, folder: Path) -> tuple[ModelSource, str]:
    """A copy of `source` in `folder` whose CLIP checkpoint lacks one tensor (a truncated download), and the
    tensor's name."""
    import shutil

    from safetensors.torch import load_file

    from fluxexport.models.source import load_folder

    shutil.copytree(source.root, folder)
    weights = folder / "text_encoder" / "model.safetensors"
    state = load_file(str(weights))
    dropped = sorted(state)[3]
    del state[dropped]
    save_file(state, str(weights))
    return load_folder(folder), dropped


def manifest_json(folder: Path) -> dict:
    """A folder's manifest.json as the file holds it: the tests read the format itself (what other tools read),
    the package reads it through `fluxexport.artifacts`."""
    import json

    return json.loads((Path(folder) / "manifest.json").read_text())


def diffusers_images(pipeline, prompt, height, width, steps, seed, num_images=1, **kwargs) -> np.ndarray:
    """uint8 [B,H,W,3] from a diffusers pipeline, rounded as its PIL output is."""
    from diffusers import FluxKontextPipeline

    if isinstance(pipeline, FluxKontextPipeline):
        kwargs.setdefault("max_area", height * width)  # keep the requested size, as our runtime does
    # our T5 length defaults are BFL's (256 schnell, 512 guidance-distilled); diffusers' is always 512
    kwargs.setdefault("max_sequence_length", 512 if pipeline.transformer.config.guidance_embeds else 256)
    images = pipeline(
        prompt=prompt,
        height=height,
        width=width,
        num_inference_steps=steps,
        num_images_per_prompt=num_images,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        **kwargs,
    ).images
    return (images * 255).round().astype(np.uint8)


def flux1_source(tmp_path, kontext=False, guidance=True) -> ModelSource:
    """FLUX.1's real configs (widths, vocabularies), without weights: specs read nothing else."""
    configs = {
        "model_index": {"_class_name": "FluxKontextPipeline" if kontext else "FluxPipeline"},
        "transformer": {
            "in_channels": 64,
            "joint_attention_dim": 4096,
            "pooled_projection_dim": 768,
            "guidance_embeds": guidance,
        },  # fmt: skip
        "vae": {"block_out_channels": [128, 256, 512, 512], "latent_channels": 16},
        "text_encoder": {"hidden_size": 768, "max_position_embeddings": 77, "vocab_size": 49408},
        "text_encoder_2": {"d_model": 4096, "vocab_size": 32128},
        "scheduler": {},
    }
    return ModelSource("flux1", tmp_path, configs=configs)


def canonical(model: ir.Model) -> list[tuple]:
    """The graph as a list of (op, attributes, inputs), each input named by what it is — a graph input, an
    initializer's dtype and bytes, or (producing node's position, output index) — not by its value name."""
    position = {node: index for index, node in enumerate(model.graph)}
    initializers = model.graph.initializers

    def reference(value):
        if value is None:
            return None
        if value.name in initializers and initializers[value.name].const_value is not None:
            tensor = initializers[value.name].const_value
            return ("initializer", tensor.dtype, tuple(tensor.shape), tensor.tobytes())
        if value.producer() is not None:
            return ("node", position[value.producer()], value.index())
        return ("input", value.name)

    return [
        (node.op_type, node.domain, sorted((k, repr(a.value)) for k, a in node.attributes.items()),
         tuple(reference(v) for v in node.inputs))
        for node in model.graph
    ]  # fmt: skip


def assert_same_graph(streamed_path, reference_path, same_names=True):
    """Same computation on bit-identical weights; with `same_names`, also the same node and value names."""
    streamed, reference = ir.load(streamed_path), ir.load(reference_path)
    assert canonical(streamed) == canonical(reference)
    assert [(v.name, v.dtype) for v in streamed.graph.inputs] == [(v.name, v.dtype) for v in reference.graph.inputs]
    assert [(v.name, v.dtype) for v in streamed.graph.outputs] == [(v.name, v.dtype) for v in reference.graph.outputs]
    if same_names:
        assert [(n.op_type, n.name) for n in streamed.graph] == [(n.op_type, n.name) for n in reference.graph]
        assert sorted(streamed.graph.initializers) == sorted(reference.graph.initializers)


def sanitized_tensorrt_stubs(destination: Path) -> Path:
    """A copy of tensorrt-stubs (TensorRT's Python API as .pyi, installed with --no-deps) that parses: the
    generated stubs name parameters after Python keywords (`in`) and put a required `channel_axis` after
    defaulted ones. Returns the folder to put on MYPYPATH."""
    import ast
    import importlib.util
    import re
    import shutil

    found = importlib.util.find_spec("tensorrt_stubs")
    if found is None or found.origin is None:
        raise RuntimeError("tensorrt-stubs is not installed: pip install --no-deps tensorrt-stubs (README install)")
    site = Path(found.origin).parent.parent
    for package in ("tensorrt", "tensorrt_bindings"):
        shutil.copytree(site / package, destination / package, dirs_exist_ok=True)
    for stub in destination.rglob("*.pyi"):
        text = stub.read_text()
        text = re.sub(r"(?m)^(\s*def .*[(,]\s*)(in|from|is|lambda)(\s*:)", r"\1\2_\3", text)
        text = text.replace("channel_axis: int) -> IScaleLayer", "channel_axis: int = ...) -> IScaleLayer")
        ast.parse(text)  # fails loudly if a newer stubs release breaks differently
        stub.write_text(text)
    return destination


# ---- tiny LoRA files in the three published formats ------------------------------------------------

RANK = 4


def write_peft(path, transformer, clip, seed=0):
    """diffusers/PEFT naming: transformer.<module>.lora_A/lora_B, no alphas (scale 1)."""
    generator, state = torch.Generator().manual_seed(seed), {}
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith(
            ("transformer_blocks.0.", "single_transformer_blocks.0.")
        ):
            state[f"transformer.{name}.lora_A.weight"] = (
                torch.randn(RANK, module.in_features, generator=generator) * 0.3
            )
            state[f"transformer.{name}.lora_B.weight"] = (
                torch.randn(module.out_features, RANK, generator=generator) * 0.3
            )
    save_file(state, str(path))
    return path


def write_kohya(path, transformer, clip, seed=1, with_clip=False):
    """kohya/sd-scripts naming on black-forest-labs' modules (fused qkv), with per-module alphas; with
    `with_clip`, also CLIP's first attention (`lora_te1_…`)."""
    width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    mlp = transformer.single_transformer_blocks[0].proj_mlp.out_features
    generator, state = torch.Generator().manual_seed(seed), {}
    # (single blocks' linear1 is left out: diffusers' conversion hard-codes FLUX.1's 3072/12288 split for it)
    for key, out, inp, alpha in (("double_blocks_0_img_attn_qkv", 3 * width, width, 2.0),
                                 ("double_blocks_0_img_attn_proj", width, width, 8.0),
                                 ("single_blocks_0_linear2", width, width + mlp, 4.0)):  # fmt: skip
        state[f"lora_unet_{key}.lora_down.weight"] = torch.randn(RANK, inp, generator=generator) * 0.3
        state[f"lora_unet_{key}.lora_up.weight"] = torch.randn(out, RANK, generator=generator) * 0.3
        state[f"lora_unet_{key}.alpha"] = torch.tensor(alpha)
    for name, module in clip.named_modules() if with_clip else ():
        if isinstance(module, torch.nn.Linear) and name.startswith("encoder.layers.0.self_attn."):
            key = "lora_te1_text_model_" + name.replace(".", "_")
            state[f"{key}.lora_down.weight"] = torch.randn(RANK, module.in_features, generator=generator) * 0.5
            state[f"{key}.lora_up.weight"] = torch.randn(module.out_features, RANK, generator=generator) * 0.5
            state[f"{key}.alpha"] = torch.tensor(2.0)
    save_file(state, str(path))
    return path


def write_xlabs(path, transformer, clip, seed=2):
    """XLabs naming: double_blocks.N.processor.{qkv,proj}_lora{1,2}.{down,up}."""
    width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    generator, state = torch.Generator().manual_seed(seed), {}
    for lora, out in (("qkv_lora1", 3 * width), ("qkv_lora2", 3 * width), ("proj_lora1", width), ("proj_lora2", width)):
        state[f"double_blocks.0.processor.{lora}.down.weight"] = torch.randn(RANK, width, generator=generator) * 0.3
        state[f"double_blocks.0.processor.{lora}.up.weight"] = torch.randn(out, RANK, generator=generator) * 0.3
    save_file(state, str(path))
    return path


@contextlib.contextmanager
def standin_tensorrt(version: str = "10.13.0.35"):
    """The stand-in TensorRT (tests/standin_tensorrt.py) as `import tensorrt` for the duration of the block."""
    from standin_tensorrt import make_tensorrt

    trt = make_tensorrt(version)
    previous = sys.modules.get("tensorrt")
    sys.modules["tensorrt"] = trt
    try:
        yield trt
    finally:
        if previous is None:
            sys.modules.pop("tensorrt", None)
        else:
            sys.modules["tensorrt"] = previous


H100 = Gpu("NVIDIA H100 80GB HBM3", (9, 0), 80 * 2**30)


def build_folder(source, onnx_folder: Path, out: Path, tensorrt: str = "10.13.0.35", **options) -> Path:
    """An engine folder written by `fluxexport build`'s own code (`build_engines`: polygraphy's real loaders and
    config, our profiles, names and manifest) over the stand-in TensorRT, whose plans run with ONNX Runtime.
    `options` are BuildOptions fields; fp32 engines by default, from the session's fp32 exports, so that their
    answers can equal ONNX Runtime's on the same graphs."""
    from fluxexport.specs import ExportBounds
    from fluxexport.tensorrt.builder import BuildOptions, build_engines

    options.setdefault("precision", "fp32")
    options.setdefault("bounds", ExportBounds.for_model(source, max_batch=2))
    options.setdefault("optimization_level", 2)
    components = options.pop("components", None)
    with standin_tensorrt(tensorrt):
        build_engines(source, onnx_folder, out, BuildOptions(**options), components, device_gpu=lambda: H100)
    return out


def has_tritonserver() -> bool:
    """Whether a `tritonserver` binary can be found (tests that start a real server skip without one)."""
    from fluxexport.errors import FluxExportError
    from fluxexport.triton.server import find_tritonserver

    try:
        find_tritonserver()
    except FluxExportError:
        return False
    return True


def cli_invoke(*args):
    """Run `fluxexport ARGS…` in process (click's runner), every argument as text."""
    from click.testing import CliRunner

    from fluxexport.cli import main

    return CliRunner().invoke(main, [str(arg) for arg in args])


def cli_refusal(*args) -> str:
    """The one-line `Error: …` of a command that must be refused (exit status 1)."""
    result = cli_invoke(*args)
    assert result.exit_code == 1, result.output
    return result.output.strip().splitlines()[-1]


def assert_engines_equal_onnx_runtime(source, engines: Path, graphs: Path, requests) -> None:
    """Each request generated on the stand-in TensorRT engines in `engines` gives the images ONNX Runtime gives
    on the graphs they were built from, bit for bit."""
    from standin_tensorrt import HostDevice

    from fluxexport.onnxruntime.backend import OnnxRuntimeBackend
    from fluxexport.runtime.pipeline import generate
    from fluxexport.tensorrt.backend import TensorRTBackend

    with standin_tensorrt() as trt:
        backend = TensorRTBackend(source, engines, device=HostDevice(trt))
        for request in requests:
            ours = generate(backend, source, request).images
            theirs = generate(OnnxRuntimeBackend(source, graphs), source, request).images
            assert np.array_equal(ours, theirs), request


Value = TypeVar("Value")


class OnDemand(Mapping[str, Value]):
    """A session fixture's per-variant values, each made the first time a test asks for it: a run of the tests
    that need tiny-dev's export alone exports tiny-dev alone (a whole run still makes each once)."""

    def __init__(self, names, make: Callable[[str], Value]):
        self._names, self._make, self._made = tuple(names), make, {}

    def __getitem__(self, name: str) -> Value:
        if name not in self._names:
            raise KeyError(name)
        if name not in self._made:
            self._made[name] = self._make(name)
        return self._made[name]

    def __contains__(self, name: object) -> bool:
        return name in self._names  # without making it

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def once_per_session(tmp_path_factory, name: str, make: Callable[[Path], object]) -> Path:
    """The folder `make(folder)` writes, made once per test session. Under pytest-xdist the session's workers share
    it: the first worker that asks makes it behind a file lock, the others wait for it and reuse it, so a session
    export is made once however the tests spread over the workers (read-only: a test that changes it works on a
    copy). A `make` that raises leaves nothing behind, and the next test that asks tries again."""
    import os
    import shutil

    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # pytest-N/, above each worker's popen-gwK/
    folder, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            try:
                make(folder)
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)
                raise
            done.touch()
    return folder
