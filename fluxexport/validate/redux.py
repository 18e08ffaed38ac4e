"""`validate --redux`: a FLUX.1 Redux prior's exported graphs (`export --redux`) in ONNX Runtime against its PyTorch
modules, per component at the spec's validation batches (the export's and unseen ones), and along the prior's whole
chain on real pictures (processor, SigLIP, embedder: `image_embeds`), with the same thresholds as every fp32 graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from fluxexport.compare import THRESHOLDS, ValidationReport, compare_outputs
from fluxexport.models.redux import ReduxSource
from fluxexport.onnxruntime.redux import OnnxReduxBackend
from fluxexport.pytorch.redux import TorchReduxBackend
from fluxexport.runtime.redux import image_embeds
from fluxexport.specs.redux import redux_specs
from fluxexport.validate.graphs import compare_component

PRIOR = "redux_prior"  # the report's row for the whole chain


def sample_pictures() -> list[Image.Image]:
    """Two pictures of other sizes than the encoder's (the processor resizes both): gradients and a disc."""
    y, x = np.mgrid[0:200, 0:300].astype(np.float32)
    disc = ((x - 180) ** 2 + (y - 90) ** 2 < 50**2).astype(np.float32)
    picture = Image.fromarray((np.stack([x / 300, y / 200, disc], axis=-1) * 255).astype(np.uint8))
    return [picture, picture.rotate(90, expand=True)]


def validate_redux(redux: ReduxSource, folder: Path, max_rel_l2: float | None = None) -> ValidationReport:
    """The report: each graph's outputs at the validation batches, then `image_embeds` of two pictures."""
    graphs, reference = OnnxReduxBackend(redux, folder), TorchReduxBackend(redux, device="cpu")
    dtypes = {name: graph.dtype for name, graph in graphs.export.graphs.items()}
    report = ValidationReport(redux.name, str(folder), "+".join(sorted(set(dtypes.values()))))
    for name, spec in redux_specs(redux).items():
        limit = THRESHOLDS[dtypes[name]][0] if max_rel_l2 is None else max_rel_l2
        report.components += compare_component(
            spec, graphs.component(name), reference.component(name), limit,
            dtype=dtypes[name] if max_rel_l2 is None else None,
        )  # fmt: skip
    pictures = sample_pictures()
    limit = max(THRESHOLDS[dtype][0] for dtype in dtypes.values()) if max_rel_l2 is None else max_rel_l2
    actual = {"image_embeds": image_embeds(graphs, redux, pictures)}
    expected = {"image_embeds": image_embeds(reference, redux, pictures)}
    report.components += compare_outputs(PRIOR, actual, expected, {"B": len(pictures)}, False, limit)
    report.graphs = {name: graph.file for name, graph in graphs.export.graphs.items()}
    return report
