"""Regenerate fluxexport/data/tensorrt_onnx_ops.json from onnx-tensorrt's docs/operators.md.

Usage: python scripts/update_tensorrt_ops.py path/to/operators.md --tensorrt 10.1 --source "onnx/onnx-tensorrt@<sha>"
Only facts are kept: operator names, whether TensorRT's parser supports them, their types, the opset range.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "fluxexport" / "data" / "tensorrt_onnx_ops.json"


def parse(text: str) -> dict:
    opsets = re.search(r"range of opset (\d+) to opset (\d+)", text)
    supported, unsupported = {}, []
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not re.fullmatch(r"[A-Z][A-Za-z0-9]*", cells[0]) or cells[1] not in ("Y", "N"):
            continue
        if cells[1] == "Y":
            types = [t.strip() for t in cells[2].split(",")] if len(cells) > 2 and cells[2] else []
            supported[cells[0]] = types
        else:
            unsupported.append(cells[0])
    return {
        "opset_min": int(opsets.group(1)),
        "opset_max": int(opsets.group(2)),
        "supported": dict(sorted(supported.items())),
        "unsupported": sorted(unsupported),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("operators_md", type=Path)
    parser.add_argument("--tensorrt", required=True, help="TensorRT version the document describes")
    parser.add_argument("--source", required=True, help="where the document came from (repo@commit)")
    args = parser.parse_args()
    data = {"tensorrt": args.tensorrt, "source": args.source, **parse(args.operators_md.read_text())}
    OUT.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {OUT}: {len(data['supported'])} supported ops, opsets {data['opset_min']}-{data['opset_max']}")


if __name__ == "__main__":
    main()
