"""Terminal output: tables readable at 80 columns, ONNX Runtime's optimizer quiet."""

from __future__ import annotations

import logging
import sys

from rich.console import Console

from fluxexport.console import table
from fluxexport.onnxruntime.optimize import quiet_optimizer

# validate's columns and rows as `fluxexport validate` prints them (graphs against PyTorch on CPU)
VALIDATE_COLUMNS = ["component", "output", "shape", "against", "max abs", "rel-L2", "cosine", ""]
VALIDATE_ROWS = [
    ["transformer_head", "pooled_embeddings", "B=2 N=1536 L=512 (export)", "PyTorch fp32", "1.23e-06", "4.56e-07",
     "1.000000", "ok"],
    ["vae_decoder", "images", "B=1 h=32 w=48", "PyTorch fp32", "3.21e-05", "7.10e-07", "0.999999", "[red]FAIL[/red]"],
]  # fmt: skip


def render(result, width: int) -> list[str]:
    console = Console(width=width, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(result)
    return console.export_text().splitlines()


def test_validate_table_fits_80_columns_and_cuts_nothing():
    lines = render(table("fp32 engines/tiny-dev/onnx", VALIDATE_COLUMNS, VALIDATE_ROWS, width=80), 80)
    text = "\n".join(lines)
    assert max(len(line) for line in lines) <= 80
    assert "…" not in text
    for row in VALIDATE_ROWS:  # every name and number whole, on one line
        for cell in (row[0], row[4], row[5], row[6]):
            assert any(cell in line for line in lines), cell
    # the column with one value in every row is said once, in the title
    assert lines[0].startswith("fp32 engines/tiny-dev/onnx · against PyTorch fp32")
    assert "against" not in "\n".join(lines[1:])


def test_wide_console_keeps_every_column():
    lines = render(table("fp32 engines/tiny-dev/onnx", VALIDATE_COLUMNS, VALIDATE_ROWS, width=200), 200)
    assert lines[0].rstrip() == "fp32 engines/tiny-dev/onnx"
    assert "against" in lines[2] and "PyTorch fp32" in "\n".join(lines)


def test_differing_text_columns_stay_and_wrap():
    rows = [["transformer", "4 SkipLayerNormalization, 12 LayerNormalization, 3 FastGelu, 2 BiasGelu", "1.2e-07", "3.1"],
            ["vae_decoder", "none", "0.0e+00", "1.1"]]  # fmt: skip
    lines = render(table("engines/tiny-dev/onnx/ort (cpu)", ["component", "fused ops", "rel-L2", "s"], rows, 80), 80)
    text = "\n".join(lines)
    assert max(len(line) for line in lines) <= 80 and "…" not in text
    assert "BiasGelu" in text and "fused ops" in text


def test_quiet_optimizer_silences_the_optimizer_only_while_it_runs(capfd):
    import tqdm

    with quiet_optimizer():
        print("failed in shape inference <class 'TypeError'>")
        logging.getLogger("onnxruntime.transformers.onnx_model_mmdit").warning("requires onnxruntime-gpu>=1.21")
        for _ in tqdm.tqdm(range(3), desc="fusion"):
            pass
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""
    print("after")
    sys.stdout.flush()
    assert capfd.readouterr().out == "after\n"
    assert logging.getLogger("onnxruntime.transformers").level == logging.NOTSET


def test_a_short_last_row_renders():
    """calibrate-magcache's ratios table: seven ratios a row, the last row shorter."""
    rows = [["1–7", *(f"{0.9 + i / 100:.4f}" for i in range(7))], ["8–9", "1.0123", "0.9876"]]
    lines = render(table("magcache ratios (9 steps)", ["steps", "ratios", *[""] * 6], rows, width=80), 80)
    text = "\n".join(lines)
    assert max(len(line) for line in lines) <= 80 and "0.9600" in text and "0.9876" in text


def test_names_stay_whole_when_a_constant_number_column_makes_room():
    """validate on CPU: every row against PyTorch fp32, cosine 1.000000 everywhere; output names stay whole."""
    rows = [
        ["clip", "pooled_embeddings", "B=3", "PyTorch fp32", "7.15e-07", "2.54e-07", "1.000000", "ok"],
        ["t5", "text_embeddings", "B=2 L=11 (export)", "PyTorch fp32", "9.09e-07", "2.72e-07", "1.000000", "ok"],
        ["vae_decoder", "images", "B=3 h=23 w=33", "PyTorch fp32", "1.12e-05", "3.82e-06", "1.000000", "ok"],
    ]
    lines = render(table("fp32 engines/tiny-schnell/onnx", VALIDATE_COLUMNS, rows, width=80), 80)
    assert max(len(line) for line in lines) <= 80
    assert any("pooled_embeddings" in line for line in lines) and any("text_embeddings" in line for line in lines)
    assert "against PyTorch fp32" in lines[0] + lines[1] and "1.12e-05" in "\n".join(lines)
