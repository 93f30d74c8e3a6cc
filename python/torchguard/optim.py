"""Adam and AdamW whose step() does LibTorch's C++ arithmetic, for runs that cross between C++
and Python bit for bit.

PyTorch 2.x's torch.optim.Adam and AdamW update the first moment with
`exp_avg.lerp_(grad, 1 - beta1)`; LibTorch's C++ torch::optim::Adam and AdamW (and PyTorch 1.13's
Python ones) with `exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)`. The two round differently in
the last bit, and training amplifies it: a demo run that crossed C++ -> Python -> C++ with
torch.optim.Adam (200 steps on each side) ended with weights 0.07 away from the run done in C++
alone. These classes are torch.optim.Adam and AdamW (the same state_dict, the same settings) with
LibTorch's arithmetic; with them the crossing is exact. SGD, Adagrad and RMSprop already agree,
but for centered RMSprop on PyTorch 2.x (its grad_avg is updated with lerp_ too).
"""
import math

import torch


def _libtorch_step(optimizer, decoupled):
    for group in optimizer.param_groups:
        beta1, beta2 = group["betas"]
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            grad = p.grad
            state = optimizer.state[p]
            if len(state) == 0:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["amsgrad"]:
                    state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            step = state["step"].item()
            if weight_decay != 0:
                if decoupled:  # AdamW: the decay on the parameter, before the update
                    p.mul_(1 - lr * weight_decay)
                else:
                    grad = grad.add(p, alpha=weight_decay)
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            bias_correction1 = 1 - beta1 ** step
            bias_correction2_sqrt = math.sqrt(1 - beta2 ** step)
            if group["amsgrad"]:
                torch.maximum(state["max_exp_avg_sq"], exp_avg_sq, out=state["max_exp_avg_sq"])
                denom = (state["max_exp_avg_sq"].sqrt() / bias_correction2_sqrt).add_(eps)
            else:
                denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
            p.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


class _LibTorchStep:
    """LibTorch's C++ step, for Adam (_decoupled False) and AdamW (True) below."""

    _decoupled = False

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        _libtorch_step(self, decoupled=self._decoupled)
        return loss


class Adam(_LibTorchStep, torch.optim.Adam):
    """torch.optim.Adam with LibTorch's C++ step (see the module's comment)."""


class AdamW(_LibTorchStep, torch.optim.AdamW):
    """torch.optim.AdamW with LibTorch's C++ step (see the module's comment)."""

    _decoupled = True
