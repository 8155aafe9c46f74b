"""Regenerate ``attnopt/tensorrt/operator_matrix.json`` from onnx-tensorrt ``docs/operators.md``.

    python scripts/tensorrt_matrix.py 10.1=operators_10.1.md 10.15=operators_10.15.md

Each ``VERSION=FILE`` is one release branch's ``docs/operators.md`` (onnx/onnx-tensorrt,
``release/<VERSION>-GA``), parsed verbatim: operator, supported (Y/N), data types, restrictions.
The versions whose matrix could not be read (10.14, 10.16, 11.x) are written as deltas on a
parsed one, each naming the release note it comes from (``DERIVED`` below). The
machine-checkable restriction rules are kept in the JSON file itself and preserved on
regeneration.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "attnopt" / "tensorrt" / "operator_matrix.json"
REPO = "https://github.com/onnx/onnx-tensorrt"
TRT_CHANGELOG = "https://github.com/NVIDIA/TensorRT/blob/main/CHANGELOG.md"

VERBATIM = {
    "10.1": {"branch": "release/10.1-GA", "commit": "96e781103cfc4adf4a6bb557e94bac8e693f6f4c"},
    "10.15": {"branch": "release/10.15-GA", "commit": None},
}

#: versions whose operators.md was not available here: a parsed matrix plus release-note deltas.
DERIVED = {
    "10.14": {
        "base": "10.15", "remove": ["RotaryEmbedding", "RMSNormalization", "TensorScatter"],
        "opset": [9, 23],
        "note": "10.15's matrix minus the three ops the 10.15 parser added (CHANGELOG 10.15 GA); "
                "Attention (opset 23) is parsed since 10.14 GA (CHANGELOG 10.14 GA), so the "
                "opset range reaches at least 23; its upper end is not documented here.",
        "url": TRT_CHANGELOG,
    },
    "10.16": {
        "base": "10.15",
        "note": "10.15's matrix; the 10.16 parser added only DistCollective (multi-device, not "
                "modelled) and the kADJUST_FOR_DLA flag (CHANGELOG 10.16 GA).",
        "url": TRT_CHANGELOG,
    },
    "11.0": {
        "base": "10.16", "add": {"Swish": {"types": None, "restrictions": ""}},
        "note": "10.16 plus Swish (opset 24) and the custom TRT_Attention / TRT_MoE / "
                "TRT_KVCacheUpdate ops (not modelled: attnopt never emits them) (CHANGELOG "
                "11.0 GA). Swish's data types are not documented here: not checked.",
        "url": "https://github.com/NVIDIA/TensorRT/releases/tag/v11.0",
    },
    "11.1": {"base": "11.0", "note": "11.0; the 11.1 parser changed only TRT_Attention "
                                     "(raggedness).",
             "url": "https://github.com/NVIDIA/TensorRT/releases/tag/v11.1"},
    "11.2": {
        "base": "11.1",
        "add": {"DFT": {"types": None, "restrictions": "Runs through the cuFFT-backed FFTPlugin."}},
        "note": "11.1 plus DFT and 5-D GridSample (release notes 11.2).",
        "url": "https://github.com/NVIDIA/TensorRT/releases/tag/v11.2",
        "restrictions": {"GridSample": ""},
    },
    "11.3": {"base": "11.2", "note": "11.2; no operator changes in the 11.3 parser notes.",
             "url": "https://github.com/NVIDIA/TensorRT/releases/tag/v11.3"},
    "11.4": {"base": "11.3", "note": "11.3; no operator changes in the 11.4 parser notes "
                                     "(IRefitterObserver only).",
             "url": "https://github.com/NVIDIA/TensorRT/releases/tag/v11.4"},
    "11.5": {
        "base": "11.4", "opset": [9, 25],
        "note": "11.4 plus ONNX opset 25 (ONNX 1.22) and Squeeze without an axes input "
                "(onnx-tensorrt release/11.5-GA notes).",
        "url": f"{REPO}/releases/tag/release%2F11.5-GA",
    },
}

_HEADER = re.compile(r"inclusive range of opset\s+(\d+)\s+to opset\s+(\d+)", re.I)
_TYPES = re.compile(r"following ONNX data types:\s*(.+)")


def parse(text: str) -> dict:
    """``{"opset": [lo, hi], "data_types": [...], "ops": {op: {...}}}`` from operators.md."""
    m = _HEADER.search(text)
    if not m:
        raise SystemExit("no 'inclusive range of opset' header found")
    types = _TYPES.search(text)
    ops = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) < 2 or cells[1] not in ("Y", "N"):
            continue
        name, supported = cells[0], cells[1] == "Y"
        kinds = [t.strip() for t in cells[2].split(",") if t.strip()] if len(cells) > 2 else []
        restr = re.sub(r"<br\s*/?>", " ", cells[3]).strip() if len(cells) > 3 else ""
        ops[name] = {"supported": supported, "types": kinds if supported else [],
                     "restrictions": restr}
    dtypes = []
    if types:
        dtypes = [t.strip(" .") for t in re.split(r",\s*(?:and\s+)?|\s+and\s+", types.group(1))
                  if t.strip(" .")]
    return {"opset": [int(m.group(1)), int(m.group(2))], "data_types": dtypes, "ops": ops}


def main(argv: list[str]) -> None:
    """Parse each VERSION=FILE, add the derived versions, rewrite the JSON (rules kept)."""
    data = json.loads(OUT.read_text()) if OUT.exists() else {}
    versions = {}
    for arg in argv:
        version, _, path = arg.partition("=")
        parsed = parse(Path(path).read_text())
        src = VERBATIM[version]
        versions[version] = {
            "source": {"basis": "verbatim", "url": f"{REPO}/blob/{src['branch']}/docs/operators.md",
                       "branch": src["branch"], "commit": src["commit"]},
            **parsed,
        }
    for version, d in DERIVED.items():
        entry = {"source": {"basis": "derived", "url": d["url"], "note": d["note"]},
                 "base": d["base"]}
        for key in ("add", "remove", "opset", "restrictions"):
            if key in d:
                entry[key] = d[key]
        versions[version] = entry
    data["versions"] = dict(sorted(versions.items(), key=lambda kv: tuple(
        int(x) for x in kv[0].split("."))))
    OUT.write_text(_dump(data))
    print(f"wrote {OUT} ({len(versions)} versions)")


def _dump(data: dict) -> str:
    """JSON with one line per operator and per rule (readable diffs, a short file)."""
    def block(d: dict, indent: str) -> str:
        rows = [f'{indent}{json.dumps(k)}: {json.dumps(v)}' for k, v in d.items()]
        return "{\n" + ",\n".join(rows) + "\n" + indent[:-1] + "}"

    parts = []
    for key, value in data.items():
        if key == "versions":
            vs = []
            for v, entry in value.items():
                fields = [f'   {json.dumps(k)}: ' + (block(x, "    ") if k == "ops"
                                                      else json.dumps(x))
                          for k, x in entry.items()]
                vs.append(f'  {json.dumps(v)}: {{\n' + ",\n".join(fields) + "\n  }")
            parts.append(' "versions": {\n' + ",\n".join(vs) + "\n }")
        elif key == "rules":
            rules = [f'  {json.dumps(op)}: [\n' + ",\n".join(f"   {json.dumps(r)}" for r in rs)
                     + "\n  ]" for op, rs in value.items()]
            parts.append(' "rules": {\n' + ",\n".join(rules) + "\n }")
        else:
            parts.append(f" {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


if __name__ == "__main__":
    main(sys.argv[1:])
