"""`fluxexport validate`: a table, a JSON report, and a non-zero exit past the thresholds."""

import json

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
