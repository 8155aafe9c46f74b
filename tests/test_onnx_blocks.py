"""The shared ONNX building blocks: one module, imported lazily, used by every variant."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import attnopt

VARIANTS = Path(attnopt.__file__).parent / "variants"
SHARED = {"_ints", "_const", "_static_or_none", "_scalar_i", "_scalar_f", "_i", "_f"}


def test_import_attnopt_does_not_import_onnxscript():
    code = ("import sys, attnopt; "
            "print(sorted(m for m in ('onnxscript', 'onnx_ir', 'onnx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=True).stdout.strip()
    assert out == "[]", f"import attnopt pulled in {out}"


def test_variant_modules_do_not_copy_the_onnx_helpers():
    for path in VARIANTS.glob("*.py"):
        tree = ast.parse(path.read_text())
        defs = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assigned = {t.id for n in tree.body if isinstance(n, ast.Assign)
                    for t in n.targets if isinstance(t, ast.Name)}
        assert not defs & SHARED, f"{path.name} redefines {defs & SHARED}"
        assert "HARD_FILL" not in assigned, f"{path.name} redefines HARD_FILL"
        imports = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                   and n.module == "onnxscript" and n.col_offset == 0 for a in n.names}
        assert not imports, f"{path.name} imports onnxscript at module level"
