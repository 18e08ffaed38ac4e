"""One folder, one export: `export` refuses a folder of another checkpoint, dtype or bounds in one line and leaves
it untouched; `--replace` leaves it holding the new export alone; `quantize` keeps the folder's bounds."""

import hashlib
import shutil

from helpers import cli_invoke, cli_refusal

from fluxexport.artifacts.folders import open_export
from fluxexport.export.target_folder import prepare_quantize_folder

REPLACE = "choose another --out, or add --replace (the folder's graphs are then removed first)"


def _hashes(folder):
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


def test_an_export_never_mixes_into_a_folder_of_another_dtype_bounds_or_model(exports, sources, tmp_path):
    folder = tmp_path / "onnx"
    shutil.copytree(exports["tiny-dev"], folder)
    before = _hashes(folder)

    # the README's bf16 export of two components after its fp32 export, into the same folder
    assert cli_refusal("export", "--model", "tiny-dev", "--dtype", "bf16", "--components", "transformer,t5",
                    "--out", folder) == (
        f"Error: {folder} holds fp32 graphs (clip, t5, transformer, …), not bf16: {REPLACE}"
    )  # fmt: skip
    assert cli_refusal("export", "--model", "tiny-dev", "--components", "vae_decoder", "--max-resolution", "512",
                    "--out", folder) == (
        f"Error: {folder} holds graphs exported for max_resolution 1024, not 512: {REPLACE}"
    )  # fmt: skip
    assert cli_refusal("export", "--model", "tiny-schnell", "--components", "vae_decoder", "--out", folder) == (
        f"Error: {folder} holds graphs exported from 'tiny-dev', not from 'tiny-schnell': {REPLACE}"
    )
    assert cli_refusal("quantize", "--model", "tiny-schnell", "--out", folder) == (
        f"Error: {folder} holds graphs exported from 'tiny-dev', not from 'tiny-schnell': {REPLACE}"
    )
    assert _hashes(folder) == before  # refused before anything was written

    # --replace: the folder holds this export alone, its manifest true for it
    result = cli_invoke("export", "--model", "tiny-dev", "--components", "vae_decoder", "--max-resolution", "512",
                     "--replace", "--out", folder)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert {path.name for path in folder.iterdir()} == {"manifest.json", "vae_decoder.onnx"}
    record = open_export(folder, sources["tiny-dev"])
    assert list(record.components) == ["vae_decoder"] and not record.fp8 and not record.optimized
    assert record.bounds["max_resolution"] == 512 and record.dtype == "fp32"
    assert cli_invoke("check", folder).exit_code == 0  # every graph in it matches its manifest record
    # a matching export adds to it; quantize exports for the folder's bounds, not its own defaults
    result = cli_invoke(
        "export", "--model", "tiny-dev", "--components", "clip", "--max-resolution", "512", "--out", folder
    )
    assert result.exit_code == 0, result.output
    assert set(open_export(folder).components) == {"vae_decoder", "clip"}
    assert prepare_quantize_folder(folder, sources["tiny-dev"]).max_resolution == 512
