"""HF model files next to an exported ``.onnx``: ``config.json`` and the tokenizer's files.

Runtimes that serve an ONNX export of a transformers model (onnxruntime-genai, Optimum, a
tokenizer in the serving code) read them from the same directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def write_hf_files(model: Any, tokenizer: Any, directory: str | Path) -> list[str]:
    """Write ``model.config`` (a transformers config) and ``tokenizer`` into ``directory``.

    Args:
        model: the original model; nothing is written unless it has a transformers config.
        tokenizer: a transformers tokenizer, or None.
        directory: where the ``.onnx`` file is.

    Returns:
        The names of the files written (empty for non-HF models).
    """
    directory = Path(directory)
    before = {p.name for p in directory.iterdir()} if directory.is_dir() else set()
    written: list[str] = []
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "save_pretrained"):
        config.save_pretrained(directory)
        written.append("config.json")
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(directory)
        after = {p.name for p in directory.iterdir()}
        written += sorted((after - before) - {"config.json"}) or ["tokenizer files"]
    return written
