"""`fluxexport validate`: a table, a JSON report, and a non-zero exit past the thresholds."""

import json

import pytest
from click.testing import CliRunner

from fluxexport.cli import main


def test_validate_passes_and_writes_a_report(tmp_path, exports):
    report = tmp_path / "report.json"
    result = CliRunner().invoke(
        main,
        ["validate", "--model", "tiny-schnell", "--engines", str(exports["tiny-schnell"]), "--report", str(report)],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["passed"] is True and data["dtype"] == "fp32"
    assert {c["component"] for c in data["components"]} == {"clip", "t5", "transformer", "vae_decoder", "vae_encoder"}
    assert all(c["rel_l2"] <= 1e-5 for c in data["components"])
    assert any(not c["seen_at_export"] for c in data["components"])
    assert [(i["height"], i["width"]) for i in data["images"]] == [(256, 256), (192, 320)]
    assert all(i["psnr"] >= 50 for i in data["images"])


def test_validate_fails_past_the_threshold(tmp_path, exports):
    report = tmp_path / "report.json"
    result = CliRunner().invoke(
        main,
        ["validate", "--model", "tiny-dev", "--engines", str(exports["tiny-dev"]), "--components", "transformer",
         "--max-rel-l2", "1e-12", "--report", str(report)],
    )  # fmt: skip
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        f"Error: {exports['tiny-dev']} does not match PyTorch within the fp32 thresholds (see {report})"
    )
    data = json.loads(report.read_text())
    assert data["passed"] is False and all(not c["passed"] for c in data["components"])


def test_validate_bf16_graphs_through_the_upcast(tmp_path, bf16_export):
    result = CliRunner().invoke(
        main,
        ["validate", "--model", "tiny-dev", "--engines", str(bf16_export), "--components", "transformer,vae_decoder",
         "--report", str(tmp_path / "r.json")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["dtype"] == "bf16"
    assert all(1e-4 < c["rel_l2"] <= 5e-2 for c in data["components"])  # bf16 rounding, not fp32 agreement


def _bf16_matmul_graph(folder, rows=64, cols=48):
    """A bf16 graph (x @ W, cast to float32) with W's data beside it, written by onnx_ir; returns (path, W)."""
    import numpy as np
    import onnx_ir as ir
    import torch

    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    bf16, fp32 = ir.DataType.BFLOAT16, ir.DataType.FLOAT
    x = ir.Value(name="x", type=ir.TensorType(fp32), shape=ir.Shape([2, rows]))
    w = ir.Value(name="w", type=ir.TensorType(bf16), shape=ir.Shape([rows, cols]),
                 const_value=ir.tensor(weight.view(torch.uint16).numpy().view(np.uint16), dtype=bf16, name="w"))  # fmt: skip
    cast = ir.node("Cast", [x], {"to": bf16})
    product = ir.node("MatMul", [cast.outputs[0], w])
    cast.outputs[0].dtype = product.outputs[0].dtype = bf16  # typed, as the exporter types every value
    out = ir.node("Cast", [product.outputs[0]], {"to": fp32})
    out.outputs[0].name = "y"
    out.outputs[0].type, out.outputs[0].shape = ir.TensorType(fp32), ir.Shape([2, cols])
    graph = ir.Graph([x], [out.outputs[0]], nodes=[cast, product, out], initializers=[w], opset_imports={"": 20})
    path = folder / "g.onnx"
    ir.save(ir.Model(graph, ir_version=10), path, external_data="g.onnx_data", size_threshold_bytes=0)
    return path, weight


def test_the_upcast_copy_is_written_with_its_weights_beside_it(tmp_path):
    """The float32 copy ONNX Runtime runs a bf16 graph from is a file whose weights are external data (so no
    protobuf message ever holds them: past 2 GB it could not), computes x @ W with W's bf16-rounded values, and a
    second write into the same folder reuses it."""
    import numpy as np
    import onnx
    import onnxruntime
    import torch

    from fluxexport.onnxruntime.upcast import write_upcast

    path, weight = _bf16_matmul_graph(tmp_path)
    copy = write_upcast(path, tmp_path / "up")
    assert sorted(p.name for p in (tmp_path / "up").iterdir()) == ["g.onnx", "g.onnx_data"]
    proto = onnx.load(str(copy), load_external_data=False)
    (initializer,) = proto.graph.initializer
    assert initializer.data_type == onnx.TensorProto.FLOAT and initializer.data_location == onnx.TensorProto.EXTERNAL
    assert (tmp_path / "up" / "g.onnx_data").stat().st_size >= 4 * weight.numel()
    assert copy.stat().st_size < weight.numel()  # the graph file holds no weights
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    (y,) = onnxruntime.InferenceSession(str(copy)).run(None, {"x": x})
    # computed in float32, rounded to bf16 where the graph is: x at its cast, the product at the MatMul
    expected = (torch.from_numpy(x).bfloat16().float() @ weight.float()).bfloat16().float()
    np.testing.assert_allclose(y, expected.numpy(), rtol=2**-8, atol=0)  # a float32 sum may round to a neighbour
    stamp = copy.stat().st_mtime_ns
    assert write_upcast(path, tmp_path / "up") == copy and copy.stat().st_mtime_ns == stamp


def test_the_upcast_copy_is_refused_in_one_line_without_room(tmp_path, monkeypatch):
    import shutil

    import pytest

    from fluxexport.errors import FluxExportError
    from fluxexport.onnxruntime.backend import create_session

    path, _ = _bf16_matmul_graph(tmp_path)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _folder: usage._replace(free=1000))
    needed = 2 * sum(p.stat().st_size for p in tmp_path.glob("g.onnx*")) / 1e9
    with pytest.raises(FluxExportError) as error:
        create_session(path, upcast=True, providers=["CPUExecutionProvider"])
    assert str(error.value) == (
        f"the float32 copy ONNX Runtime runs a bf16 graph from needs {needed:.1f} GB in {tmp_path}, which has 0.0 GB "
        "free: free some space there (or set TMPDIR to a larger disk)"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.onnx", "g.onnx_data"]  # nothing half-written


def _bf16_timestep_graph(folder):
    """The head of FLUX.1's time embedding as the bf16 graph has it: a bf16 `timestep` input × 1000 (in bf16, as
    diffusers' `timestep.to(hidden_states.dtype) * 1000`), cast to float32 for the sinusoid, sin out."""
    import onnx_ir as ir
    import torch

    bf16, fp32 = ir.DataType.BFLOAT16, ir.DataType.FLOAT
    t = ir.Value(name="timestep", type=ir.TensorType(bf16), shape=ir.Shape([3]))
    thousand = ir.tensor(torch.tensor([1000.0], dtype=torch.bfloat16), name="thousand")
    scale = ir.Value(name="thousand", type=ir.TensorType(bf16), shape=ir.Shape([1]), const_value=thousand)
    product = ir.node("Mul", [t, scale])
    product.outputs[0].dtype = bf16
    phase = ir.node("Cast", [product.outputs[0]], {"to": fp32})
    out = ir.node("Sin", [phase.outputs[0]])
    out.outputs[0].name, out.outputs[0].type, out.outputs[0].shape = "sin", ir.TensorType(fp32), ir.Shape([3])
    graph = ir.Graph([t], [out.outputs[0]], nodes=[product, phase, out], initializers=[scale],
                     opset_imports={"": 20})  # fmt: skip
    path = folder / "t.onnx"
    ir.save(ir.Model(graph, ir_version=10), path)
    return path


def test_the_upcast_copy_rounds_to_bf16_where_the_graph_does(tmp_path):
    """The float32 copy rounds the bf16 input and the bf16 product timestep × 1000 as PyTorch bf16 (and TensorRT
    on the bf16 graph) do: the phases equal PyTorch's exactly. Computed in float32 throughout, the copy put them
    up to 2 rad away (sin 0.3 rel-L2 from PyTorch; `temb` of FLUX.1's head 0.3 at tiny-dev, 0.5 at full width)."""
    import numpy as np
    import onnxruntime
    import torch

    from fluxexport.onnxruntime.upcast import write_upcast

    copy = write_upcast(_bf16_timestep_graph(tmp_path), tmp_path / "up")
    sigmas = torch.tensor([0.3741496, 0.7551685, 0.8993], dtype=torch.float32)  # none exactly a bf16
    (y,) = onnxruntime.InferenceSession(str(copy)).run(None, {"timestep": sigmas.numpy()})
    expected = torch.sin((sigmas.bfloat16() * 1000).float())
    assert np.array_equal(y, expected.numpy()), (y, expected)


def test_bf16_transformer_graph_matches_pytorch_bf16_at_unrounded_sigmas(bf16_export, sources):
    """The tiny-dev bf16 transformer run from its float32 copy against PyTorch bf16 at sigmas and a guidance that
    bf16 cannot hold: within 1e-2 rel-L2 (bf16 rounding; 0.0051–0.0052 measured). Without the copy's bf16 rounding:
    0.048–0.051, as far as the bf16 bound (5e-2)."""
    from fluxexport.compare import metrics
    from fluxexport.onnxruntime.backend import OnnxRuntimeBackend
    from fluxexport.pytorch.backend import TorchBackend
    from fluxexport.specs import component_specs, sample_inputs, validation_sizes

    source = sources["tiny-dev"]
    spec = component_specs(source)["transformer"]
    candidate = OnnxRuntimeBackend(source, bf16_export, upcast_bf16=True).component("transformer")
    reference = TorchBackend(source, dtype="bf16", device="cpu").component("transformer")
    sizes, _ = validation_sizes(spec)[0]
    feeds = sample_inputs(spec, sizes, seed=0)
    batch = feeds["timestep"].shape[0]
    feeds["timestep"] = torch_full(batch, 0.3741496)
    feeds["guidance"] = torch_full(batch, 3.3)
    errors = [metrics(candidate(feeds)["latent"], reference(feeds)["latent"])[1]]
    feeds["timestep"] = torch_full(batch, 0.8993)
    errors.append(metrics(candidate(feeds)["latent"], reference(feeds)["latent"])[1])
    assert all(1e-4 < error < 1e-2 for error in errors), errors


def torch_full(batch, value):
    import torch

    return torch.full((batch,), value, dtype=torch.float32)


def test_validation_holds_one_side_and_one_module_at_a_time(sources):
    """Each side of a validation runs alone (the reference first, closed before the candidate opens) and holds one
    module's components at a time (the transformer's parts together): its peak is the largest module's, not
    both models'. Two PyTorch fp32 sides agree exactly."""
    from fluxexport.pytorch.backend import TorchBackend
    from fluxexport.validate.graphs import validate

    source = sources["tiny-dev"]
    live, events = [], []

    def opener(side):
        def open_backend():
            backend = TorchBackend(source, "fp32", "cpu")
            load, close = backend._load, backend.close

            def loading(name):
                events.append((side, name, len(live)))
                return load(name)

            def closing():
                if backend in live:
                    live.remove(backend)
                close()

            backend._load, backend.close = loading, closing
            live.append(backend)
            return backend

        return open_backend

    dtypes = {"clip": "fp32", "transformer_head": "fp32", "transformer_tail": "fp32", "vae_decoder": "fp32"}
    report = validate(source, opener("candidate"), opener("reference"), dtypes, steps=1)
    assert report.passed and all(row.rel_l2 == 0 for row in report.components)
    assert all(image.max_abs_diff == 0 for image in report.images)
    assert not live and all(open_before == 1 for *_, open_before in events)  # never two backends
    sides = [side for side, *_ in events]
    assert sides == sorted(sides, key=lambda side: side == "candidate")  # the whole reference side first
    component_loads = [name for side, name, _ in events if side == "reference"][:4]
    assert component_loads == list(dtypes)


def test_a_component_of_another_module_closes_the_loaded_one(sources):
    from fluxexport.pytorch.backend import TorchBackend
    from fluxexport.validate.graphs import OneModuleAtATime

    opened = []

    def open_backend():
        opened.append(TorchBackend(sources["tiny-dev"], "fp32", "cpu"))
        return opened[-1]

    backend = OneModuleAtATime(open_backend)
    backend.component("transformer_head"), backend.component("transformer_tail")
    assert len(opened) == 1 and set(opened[0]._modules) == {"transformer"}
    backend.component("clip")
    assert len(opened) == 2 and not opened[0]._modules and set(opened[1]._modules) == {"clip"}
    backend.close()
    assert not opened[1]._modules


def test_the_fp32_bound_of_temb_alone_is_loosened():
    from fluxexport.compare import compare_outputs, output_limit

    assert output_limit("temb", "fp32", 1e-5) == 1e-4
    assert output_limit("temb", "bf16", 5e-2) == 5e-2 and output_limit("temb", "fp32", 1e-3) == 1e-3
    assert output_limit("image_hidden", "fp32", 1e-5) == 1e-5
    expected = {"temb": torch_ones(), "image_hidden": torch_ones()}
    actual = {name: value * (1 + 3e-5) for name, value in expected.items()}
    rows = compare_outputs("transformer_head", actual, expected, {"B": 1}, False, 1e-5, dtype="fp32")
    assert [(row.output, row.passed) for row in rows] == [("temb", True), ("image_hidden", False)]
    rows = compare_outputs("transformer_head", actual, expected, {"B": 1}, False, 1e-5)  # --max-rel-l2: as given
    assert not any(row.passed for row in rows)


def torch_ones():
    import torch

    return torch.ones(4, 8)


@pytest.mark.slow
def test_tiny_dev_head_temb_differs_by_its_folded_frequencies(tmp_path, sources, torch_backends):
    """Why tiny-dev's head fails the plain fp32 bound: its `temb` (timestep and guidance × 1000 through
    sinusoids) is 1.2–1.35e-5 rel-L2 from PyTorch because the exporter folded the sinusoid frequencies with
    another exp than PyTorch's (a few ulp apart, times phases up to ~4000 rad). Every other output of the head
    stays within 1e-5; temb within its own bound; validation passes."""
    import math

    import numpy as np
    import onnx_ir as ir
    import torch
    from click.testing import CliRunner

    from fluxexport.compare import THRESHOLDS
    from fluxexport.onnxruntime.backend import OnnxRuntimeBackend
    from fluxexport.specs import component_specs
    from fluxexport.validate.graphs import compare_component

    source = sources["tiny-dev"]
    result = CliRunner().invoke(main, ["export", "--model", "tiny-dev", "--components", "transformer_head",
                                       "--out", str(tmp_path), "--no-check"])  # fmt: skip
    assert result.exit_code == 0, result.output
    spec = component_specs(source)["transformer_head"]
    graph = OnnxRuntimeBackend(source, tmp_path).component("transformer_head")
    rows = compare_component(spec, graph, torch_backends["tiny-dev"].component("transformer_head"),
                             THRESHOLDS["fp32"][0], dtype="fp32")  # fmt: skip
    assert all(row.passed for row in rows)
    assert all(row.rel_l2 <= 1e-5 for row in rows if row.output != "temb")
    assert max(row.rel_l2 for row in rows if row.output == "temb") > 1e-5
    half = 128  # the time projection's 256 channels
    frequencies = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half).numpy()
    folded = [value.const_value.numpy().reshape(-1) for value in ir.load(tmp_path / "transformer_head.onnx").graph.initializers.values()
              if value.const_value is not None and value.const_value.numpy().size == half]  # fmt: skip
    (folded,) = [values for values in folded if np.allclose(values, frequencies, rtol=1e-6)]
    assert (folded != frequencies).any() and np.abs(folded / frequencies - 1).max() < 1e-6
