"""What every check shares: the failure type, the call that turns a stub into feedback, the comparison."""

from __future__ import annotations

import torch


class ExerciseFailed(AssertionError):
    """The student's function is not yet right; the message says how."""


def _call(name: str, fn, *args):
    try:
        return fn(*args)
    except NotImplementedError as err:
        raise ExerciseFailed(
            f"{name}: not implemented yet. Replace the `raise NotImplementedError` with your code."
        ) from err


def _expect_tensor(name: str, got, shape, what: str) -> torch.Tensor:
    """``got`` must be a tensor of ``shape`` (``what`` says what it holds); returned detached, in float64."""
    if not torch.is_tensor(got) or tuple(got.shape) != tuple(shape):
        found = tuple(got.shape) if torch.is_tensor(got) else type(got).__name__
        raise ExerciseFailed(f"{name}: return {what}, a tensor of shape {tuple(shape)}; got {found}.")
    return got.detach().double()


def _compare(name: str, got, want, what: str, hint: str, atol: float = 1e-5):
    if not torch.is_tensor(got):
        raise ExerciseFailed(f"{name}: {what} should be a torch.Tensor; got {type(got).__name__}.")
    if got.shape != want.shape:
        raise ExerciseFailed(f"{name}: {what} has shape {tuple(got.shape)}; expected {tuple(want.shape)}.")
    err = (got.double() - want.double()).abs().max().item()
    if not err <= atol:  # also catches NaN
        raise ExerciseFailed(f"{name}: {what} is off by up to {err:.3g} (tolerance {atol:g}). Hint: {hint}")
