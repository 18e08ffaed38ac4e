"""The typed records of our folders: what `export`, `quantize`, `optimize`, `build` and `triton` write reads back
as the same JSON; an older manifest is refused with the command that rewrites it, and `upgrade` rewrites it."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner
from helpers import build_folder, manifest_json

from fluxexport.artifacts.files import FORMAT, MANIFEST
from fluxexport.artifacts.folders import EngineFolder, ExportFolder, open_engines, open_export, open_folder
from fluxexport.cli import main
from fluxexport.errors import FluxExportError


def _as_format_1(folder, legacy_fp8: bool = False) -> dict:
    """The manifest our code wrote, as the first format held it: no kind, no base dtype, and (`legacy_fp8`) the
    FP8 transformer kept among the components in place of the base one."""
    data = manifest_json(folder) | {"format": 1}
    data.pop("kind")
    for section in ("components", "fp8", "onnxruntime"):
        for entry in data.get(section, {}).values():
            if entry["dtype"] != "fp8":
                entry.pop("base_dtype")
    if legacy_fp8:
        data["components"]["transformer"] = data.pop("fp8")["transformer"]
    (folder / MANIFEST).write_text(json.dumps(data))
    return data


def test_every_record_reads_back_as_the_json_it_came_from(exports, fp8_exports):
    for folder in (exports["tiny-dev"], fp8_exports["tiny-dev"]):
        opened = open_export(folder)
        assert opened.to_json() == manifest_json(folder)
        assert opened.model.name == "tiny-dev" and opened.kind == "onnx"
    fp8 = open_export(fp8_exports["tiny-dev"]).fp8["transformer"]
    assert fp8.is_fp8 and fp8.base_dtype == "fp32" and fp8.describe() == "transformer.fp8.onnx (FP8 Q/DQ on fp32)"
    assert all(origin.fp8_scale > 0 for name, origin in fp8.weights.items() if name.endswith(".fp8"))


def test_engine_folders_read_back_and_name_the_graph_each_engine_came_from(sources, exports, tmp_path):
    engines = build_folder(
        sources["tiny-dev"], exports["tiny-dev"], tmp_path / "trt", components=["clip", "vae_decoder"]
    )
    folder = open_folder(engines, sources["tiny-dev"])
    assert isinstance(folder, EngineFolder) and folder.to_json() == manifest_json(engines)
    assert folder.built_from("clip") == open_export(exports["tiny-dev"]).components["clip"]
    with pytest.raises(FluxExportError) as error:
        open_engines(engines, sources["tiny-schnell"])
    assert str(error.value) == (
        f"the engines in {engines} were built from 'tiny-dev', not from 'tiny-schnell': "
        "pass the same --model as at build time"
    )
    with pytest.raises(FluxExportError, match="holds TensorRT engines, not exported graphs"):
        open_export(engines)


def test_which_graph_runs_is_answered_once(sources, fp8_exports, tmp_path):
    folder = open_export(fp8_exports["tiny-dev"])
    assert folder.graphs()["transformer"] is folder.fp8["transformer"]  # the FP8 one when there is one
    assert folder.graphs(fp8=False)["transformer"] is folder.components["transformer"]
    assert set(folder.graphs()) == set(folder.components)
    assert folder.graphs(optimized=None) == folder.graphs()  # nothing optimized: the portable graphs


def test_a_format_1_folder_is_refused_with_the_command_that_rewrites_it(fp8_exports, tmp_path):
    folder = tmp_path / "old"
    shutil.copytree(fp8_exports["tiny-dev"], folder)
    _as_format_1(folder, legacy_fp8=True)
    with pytest.raises(FluxExportError) as error:
        open_export(folder)
    assert str(error.value) == (
        f"{folder / MANIFEST} has format 1 (an older fluxexport), this one reads {FORMAT}: rewrite it with "
        f"`fluxexport upgrade {folder}`"
    )
    result = CliRunner().invoke(main, ["upgrade", str(folder)])
    assert result.exit_code == 0, result.output
    upgraded = open_export(folder)
    assert "transformer" not in upgraded.components  # the first layout held only the FP8 one
    assert upgraded.graphs()["transformer"].is_fp8 and upgraded.graphs()["transformer"].base_dtype == "fp32"
    assert "transformer" not in upgraded.graphs(fp8=False)
    assert upgraded.components["clip"].base_dtype == "fp32"
    again = manifest_json(folder)
    CliRunner().invoke(main, ["upgrade", str(folder)])
    assert manifest_json(folder) == again  # a format-2 manifest is left as it is


def test_broken_manifests_are_refused_in_one_line(tmp_path):
    with pytest.raises(FluxExportError, match=f"has no {MANIFEST}: export graphs into it"):
        open_folder(tmp_path)
    (tmp_path / MANIFEST).write_text("{")
    with pytest.raises(FluxExportError, match="is not valid JSON"):
        open_folder(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps({"format": 7}))
    with pytest.raises(FluxExportError, match=f"has format 7, this fluxexport reads {FORMAT}"):
        open_folder(tmp_path)


def test_a_record_keeps_what_it_does_not_type(exports, tmp_path):
    folder = open_export(exports["tiny-dev"])
    assert isinstance(folder, ExportFolder)
    clip = folder.components["clip"]
    assert clip.extra["nodes"] > 0 and "exported_at" in clip.extra  # for people: kept, not typed
    moved = ExportFolder(tmp_path, folder.model, folder.dtype, folder.bounds, {"clip": clip}, versions=folder.versions)
    moved.write()
    assert manifest_json(tmp_path)["components"]["clip"] == manifest_json(exports["tiny-dev"])["components"]["clip"]
