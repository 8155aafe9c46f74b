"""The trtexec and polygraphy command lines that build / compare a TensorRT-target export.

Written next to every ``target="tensorrt"`` file as ``<name>.trt.txt``, so a user can build
the engine and compare it with onnxruntime on their GPU machine without attnopt:

    trtexec --onnx=m.onnx --saveEngine=m.plan --minShapes=... --optShapes=... --maxShapes=...
            --stronglyTyped
    polygraphy run m.onnx --trt --onnxrt --strongly-typed --trt-min-shapes ... --input-shapes ...
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from attnopt.tensorrt.engine import Profile, profiles_from_onnx


def commands_path(onnx_path: str | os.PathLike) -> Path:
    """``m.onnx`` → ``m.trt.txt``."""
    p = Path(onnx_path)
    return p.with_name(p.stem + ".trt.txt")


def _trtexec_shapes(profile: Profile, which: int) -> str:
    return ",".join(f"{name}:{'x'.join(str(d) for d in dims[which])}"
                    for name, dims in profile.shapes.items())


def _polygraphy_shapes(profile: Profile, which: int) -> list[str]:
    return [f"{name}:[{','.join(str(d) for d in dims[which])}]"
            for name, dims in profile.shapes.items()]


def trtexec_command(onnx_path: str | os.PathLike, profile: Profile | None,
                    plan_path: str | os.PathLike | None = None) -> list[str]:
    """``trtexec`` arguments: build a strongly typed engine over the profile's shapes."""
    onnx_path = Path(onnx_path)
    plan = Path(plan_path) if plan_path else onnx_path.with_suffix(".plan")
    cmd = ["trtexec", f"--onnx={onnx_path.name}", f"--saveEngine={plan.name}"]
    if profile is not None and profile.shapes:
        cmd += [f"--minShapes={_trtexec_shapes(profile, 0)}",
                f"--optShapes={_trtexec_shapes(profile, 1)}",
                f"--maxShapes={_trtexec_shapes(profile, 2)}"]
    cmd += ["--stronglyTyped", f"--timingCacheFile={onnx_path.stem}.timing.cache"]
    return cmd


def polygraphy_command(onnx_path: str | os.PathLike, profile: Profile | None) -> list[str]:
    """``polygraphy run --trt --onnxrt``: build the same engine and compare it with ORT."""
    cmd = ["polygraphy", "run", Path(onnx_path).name, "--trt", "--onnxrt", "--strongly-typed"]
    if profile is not None and profile.shapes:
        cmd += ["--trt-min-shapes", *_polygraphy_shapes(profile, 0),
                "--trt-opt-shapes", *_polygraphy_shapes(profile, 1),
                "--trt-max-shapes", *_polygraphy_shapes(profile, 2),
                "--input-shapes", *_polygraphy_shapes(profile, 1)]
        masks = [n for n in profile.shapes if "mask" in n]
        if masks:  # random 0/1 masks would hide whole rows, where runtimes legitimately differ
            cmd += ["--val-range", *(f"{n}:[1,1]" for n in masks)]
    return cmd


def commands_text(onnx_path: str | os.PathLike) -> str:
    """The text of ``<name>.trt.txt`` for an export (profiles from its recorded ranges)."""
    profiles = profiles_from_onnx(onnx_path)
    profile = profiles[0] if profiles else None
    lines = [
        f"# Build and check {Path(onnx_path).name} with TensorRT on a GPU machine (run in this",
        "# directory). Shapes: the ranges attnopt verified the export on; widen them as needed.",
        "# Build the engine (strongly typed: the precision is the ONNX graph's):",
        shlex.join(trtexec_command(onnx_path, profile)),
        "# Compare TensorRT with onnxruntime on random inputs:",
        shlex.join(polygraphy_command(onnx_path, profile)),
        "# Or from Python:",
        f"#   attnopt.tensorrt.build_engine({Path(onnx_path).name!r}, "
        f"{Path(onnx_path).with_suffix('.plan').name!r})",
    ]
    return "\n".join(lines) + "\n"
