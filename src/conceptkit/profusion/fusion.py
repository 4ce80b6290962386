"""Fusion sampling's latent update (ALGORITHMS.md §3.6 b), as plain functions of tensors.

One fusion sub-step is a stochastic DDIM step x_t → x_{t'} with η = refine_eta, followed by re-noising x_{t'} → x_t
with the Bayes-consistent reverse q_σ(x_t | x_{t'}, x̂0). Both are Gaussian, so the pair collapses into one update
(`fusion_update`); `fusion_two_stage` is the two-stage definition it must agree with (tested in mean and variance).
"""
from __future__ import annotations

import math

import torch

MAX_ETA = math.sqrt(2.0)  # beyond it 2 − 2ā' − σ² can be negative


def fusion_sigma(a: float, a_prev: float, eta: float) -> float:
    """σ of the DDIM step t → t' scaled by η: σ² = η² (1−ā')/(1−ā) (1 − ā/ā')."""
    return eta * math.sqrt(max((1 - a_prev) / (1 - a) * (1 - a / a_prev), 0.0))


def check_fusion_alphas(a_prev: float, eta: float) -> None:
    if eta > MAX_ETA:
        raise ValueError(f"refine_eta {eta} > sqrt(2): the fusion update's variance would be negative")
    if 1 - a_prev <= 0:
        raise ValueError("ᾱ_{t'} = 1 (set_alpha_to_one at the last step): the fusion update divides by 1 − ᾱ_{t'}")


def fusion_update(x: torch.Tensor, eps: torch.Tensor, a: float, a_prev: float, eta: float,
                  noise: torch.Tensor) -> torch.Tensor:
    """x̃_t = x_t − ε̃ σ²√(1−ā)/(1−ā') + σ z √((1−ā)(2 − 2ā' − σ²))/(1−ā')."""
    check_fusion_alphas(a_prev, eta)
    s = fusion_sigma(a, a_prev, eta)
    mean = x - eps * (s**2 * math.sqrt(1 - a) / (1 - a_prev))
    std = s * math.sqrt(max((1 - a) * (2 - 2 * a_prev - s**2), 0.0)) / (1 - a_prev)
    return mean + std * noise


def fusion_two_stage(x: torch.Tensor, eps: torch.Tensor, a: float, a_prev: float, eta: float,
                     noise_step: torch.Tensor, noise_back: torch.Tensor) -> torch.Tensor:
    """The definition: x_{t'} ~ q_σ(x_{t'} | x_t, x̂0(ε̃)), then x_t ~ q_σ(x_t | x_{t'}, x̂0)."""
    s = fusion_sigma(a, a_prev, eta)
    x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
    k = math.sqrt(max(1 - a_prev - s**2, 0.0))
    x_prev = math.sqrt(a_prev) * x0 + k * eps + s * noise_step
    # posterior of the standardised noise e_t = (x_t − √ā x̂0)/√(1−ā), given x_{t'} − √ā' x̂0 = k e_t + σ n
    y = x_prev - math.sqrt(a_prev) * x0
    e = k * y / (1 - a_prev) + s / math.sqrt(1 - a_prev) * noise_back
    return math.sqrt(a) * x0 + math.sqrt(1 - a) * e


def to_epsilon(output: torch.Tensor, x: torch.Tensor, a: float, prediction_type: str) -> torch.Tensor:
    """The UNet's output as ε, whatever it predicts."""
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return math.sqrt(a) * output + math.sqrt(1 - a) * x
    if prediction_type == "sample":
        return (x - math.sqrt(a) * output) / math.sqrt(1 - a)
    raise ValueError(f"unknown prediction_type {prediction_type}")
