"""LoRA initialisation: PEFT's default (A random, B = 0) or FeDeRA's (arXiv 2404.18848): A and B from the SVD of W.

FeDeRA starts each adapter at the principal part of the pre-trained weight and subtracts that part
from the frozen weight, so the model computes the same function before training:

    W = U S V^T (exact, float64),  B = U_r diag(sqrt(S_r / s)),  A = diag(sqrt(S_r / s)) V_r^T,
    W_res = W - s B A,             so W_res + s B A = W.

The initial adapter must be identical on every client and on the server. A randomised SVD (PEFT's
"pissa_niter_k") would differ between them; an exact SVD does not, and fixing each singular pair's
sign (the largest entry of u positive, as scikit-learn's ``svd_flip``) removes the one freedom an
exact SVD leaves, so every process derives the same A, B and W_res from the same W.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer

LORA_INITS = ("default", "federa")


def federa_factors(weight: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A (r x in), B (out x r), W_res (out x in)) of one weight W (out x in), in W's dtype."""
    w = weight.detach().double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)  # (out, k), (k,), (k, in)
    u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    sign = torch.sign(u.gather(0, u.abs().argmax(dim=0, keepdim=True))).squeeze(0)  # (r,): one sign per pair
    u, vh = u * sign, vh * sign[:, None]
    root = torch.sqrt(s / scaling)
    b, a = u * root, root[:, None] * vh
    residual = w - scaling * (b @ a)
    return a.to(weight.dtype), b.to(weight.dtype), residual.to(weight.dtype)


@torch.no_grad()
def apply_federa(module: torch.nn.Module, adapter: str = "default") -> None:
    """Re-initialise every LoRA layer of ``module`` in place: FeDeRA factors, residual frozen weight."""
    for layer in module.modules():
        if isinstance(layer, LoraLayer) and adapter in layer.lora_A:
            a, b, residual = federa_factors(layer.get_base_layer().weight, layer.r[adapter], layer.scaling[adapter])
            layer.lora_A[adapter].weight.copy_(a)
            layer.lora_B[adapter].weight.copy_(b)
            layer.get_base_layer().weight.copy_(residual)
