"""Where the shared model runs (``engine.device``) and at what precision its matrix multiplies run (``engine.precision``)."""

from __future__ import annotations

import re
import resource
import sys
from pathlib import Path

import torch

from legend.errors import LegendError


def resolve_device(name: str, setting: str = "engine.device") -> torch.device:
    """'auto': the first CUDA device when torch sees one, else the CPU; 'cpu', 'cuda' or 'cuda:N' as asked, if present.
    ``setting``: what the user set, as the error line names it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise LegendError(f"{setting} '{name}' is not a device: use auto, cpu, cuda or cuda:N")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise LegendError(
                f"{setting} '{name}' but this torch sees no CUDA device ({torch.__version__}): use {setting}=cpu (or auto), "
                "or install a CUDA build of torch (pytorch.org/get-started/locally)"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise LegendError(
                f"{setting} '{name}' but this machine has {torch.cuda.device_count()} CUDA device(s): use cuda:0 to "
                f"cuda:{torch.cuda.device_count() - 1}"
            )
    return device


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """'auto': bfloat16 where the hardware multiplies it natively (a CUDA GPU that supports it; a CPU with AVX-512 BF16
    or AMX), else float32 (float16 only by name: it needs loss scaling and has no measured default); 'float32',
    'bfloat16' and 'float16' as asked."""
    if name not in ("float32", "bfloat16", "float16", "auto"):
        raise LegendError(f"precision '{name}' is not one: use float32, bfloat16, float16 or auto")
    if name != "auto":
        return getattr(torch, name)
    native = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_native_bfloat16()
    return torch.bfloat16 if native else torch.float32


QUANTIZED_BYTES = {"4bit": 4.127 / 8, "8bit": 1.0}  # per weight: NF4 with double-quantised scales (QLoRA, arXiv 2305.14314), LLM.int8


def quantization_config(quantize: str, device: torch.device, compute_dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for model.quantize (None for 'none'): 4-bit NF4 with double quantisation and
    ``compute_dtype`` matrix multiplies, or 8-bit. bitsandbytes quantizes on a CUDA GPU, so anything else is one line."""
    if quantize == "none":
        return None
    if device.type != "cuda":
        raise LegendError(
            f"model.quantize '{quantize}' needs a CUDA GPU (bitsandbytes quantizes there) and this run is on the {device.type}: "
            "set engine.device=cuda on a GPU machine, or model.quantize='none'"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise LegendError(f"model.quantize '{quantize}' needs bitsandbytes: pip install 'legend[gpu]'") from None
    from transformers import BitsAndBytesConfig

    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype
    )


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak on a GPU (a process's resident-memory peak on the CPU cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """MiB: on a GPU the most memory torch allocated there since ``reset_peak_memory``; on the CPU the process's peak
    resident memory so far (the OS's count, which never falls)."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def cpu_has_native_bfloat16() -> bool:
    """AVX-512 BF16 or AMX-BF16 in the CPU flags (Linux); elsewhere, float32 is the safe answer."""
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text() if cpuinfo.is_file() else ""
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))
