"""Token data for discrete diffusion: 2D toys on a grid (with exact probability tables), quantized digits,
and character-level English.

Tokens are integers ``0..K-1`` in a LongTensor of shape (B, D), as in :mod:`dmlib.discrete` (whose
mask token is the extra id ``K``):

* a 2D point becomes ``D = 2`` tokens, its cell on a ``K x K`` grid over ``[-lim, lim]^2``
  (:func:`quantize_grid`; points outside are clipped to the border cells). For a Gaussian-mixture toy
  the exact table ``P(cell)`` is known (:func:`toy_grid_distribution`), so a chapter can compare a
  model's likelihood with the data's exact entropy (:func:`table_entropy`);
* an 8x8 digit becomes ``D = 64`` tokens, its pixels quantized to a few grey levels
  (:func:`load_digit_tokens`);
* English text becomes one token per character (:func:`load_text`), from the Python documentation
  that ships with the standard library (``pydoc_data.topics``), so it works offline.
"""

from __future__ import annotations

import functools
import math
import numbers
import re
from dataclasses import dataclass, field

import torch

from .data import load_digits, toy_mixture
from .oracle import GaussianMixture


def _check_count(name: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be a whole number >= {low}; got {value!r}.")
    if high is not None and value > high:
        raise ValueError(f"{name} must lie in {low}..{high}; got {value!r}.")
    return int(value)


def _check_lim(lim) -> float:
    if isinstance(lim, bool) or not isinstance(lim, numbers.Real) or not 0 < lim < math.inf:
        raise ValueError(f"lim must be a positive number (the grid covers [-lim, lim]^2); got {lim!r}.")
    return float(lim)


def _check_tokens(tokens: torch.Tensor, K: int, what: str = "tokens") -> None:
    """A LongTensor of ids in ``0..K-1``; the values are checked on the CPU only (elsewhere it would wait
    for the device)."""
    if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.long:
        kind = tokens.dtype if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"{what} must be a LongTensor (torch.int64) of ids 0..{K - 1}; got {kind}.")
    if tokens.device.type == "cpu" and tokens.numel() and bool(((tokens < 0) | (tokens >= K)).any()):
        raise ValueError(
            f"{what} must lie in 0..{K - 1}; got values from {tokens.min().item()} to {tokens.max().item()}."
        )


# ---------------------------------------------------------------------------------------------
# 2D points on a K x K grid
# ---------------------------------------------------------------------------------------------


def quantize_grid(x: torch.Tensor, K: int, lim: float = 3.0) -> torch.Tensor:
    """Points ``x`` (n, 2) to tokens (n, 2) in ``0..K-1``: the column and row of their cell on a ``K x K``
    grid of equal cells over ``[-lim, lim]^2``. Points outside the square are clipped to the border cells.

    Token ``[i, 0]`` indexes the first coordinate, ``[i, 1]`` the second (``table[a, b]`` of
    :func:`toy_grid_distribution` is ``P(token 0 = a, token 1 = b)``).
    """
    K, lim = _check_count("K", K, 1), _check_lim(lim)
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[1] != 2 or not x.is_floating_point():
        got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be float points of shape (n, 2); got {got}.")
    cell = torch.floor((x.double() + lim) * (K / (2 * lim)))
    return cell.clamp(0, K - 1).long()


def grid_centers(tokens: torch.Tensor, K: int, lim: float = 3.0) -> torch.Tensor:
    """The centres (n, 2), float32, of the cells that :func:`quantize_grid` gives the tokens (n, 2)."""
    K, lim = _check_count("K", K, 1), _check_lim(lim)
    _check_tokens(tokens, K)
    if tokens.ndim != 2 or tokens.shape[1] != 2:
        raise ValueError(f"tokens must have shape (n, 2), two per point; got {tuple(tokens.shape)}.")
    return (-lim + (tokens.double() + 0.5) * (2 * lim / K)).float()


def _cell_masses(mean: torch.Tensor, std: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """``P(edge_k <= X < edge_{k+1})`` for ``X ~ N(mean, std^2)``, per component: (components, cells)."""
    cdf = torch.special.ndtr((edges[None, :] - mean[:, None]) / std[:, None])
    return cdf[:, 1:] - cdf[:, :-1]


def toy_grid_distribution(name, K: int, lim: float = 3.0) -> torch.Tensor:
    """The exact law (K, K), float64, of :func:`quantize_grid` applied to a Gaussian-mixture toy.

    ``name``: a toy of ``dmlib.data.MIXTURES`` (e.g. ``"eight_gaussians"``) or a 2D
    :class:`~dmlib.oracle.GaussianMixture` with diagonal covariances. ``table[a, b]`` is the mass of the
    cell in column ``a`` (first coordinate) and row ``b``; the border cells hold the tails beyond
    ``[-lim, lim]`` as quantizing clips them there, so the table sums to 1. With diagonal covariances
    each component's mass factorizes, ``P(cell) = sum_k w_k P_k(X_1 in column) P_k(X_2 in row)``,
    computed with the Gaussian CDF: no quadrature error.
    """
    K, lim = _check_count("K", K, 1), _check_lim(lim)
    mix = name if isinstance(name, GaussianMixture) else toy_mixture(name)
    if mix.dim != 2:
        raise ValueError(f"the grid is 2D; the mixture has dimension {mix.dim}.")
    means, covs, weights = (v.detach().cpu().double() for v in (mix.means, mix.covs, mix.weights))
    if bool((covs[:, 0, 1] != 0).any() or (covs[:, 1, 0] != 0).any()):
        raise ValueError("toy_grid_distribution needs diagonal covariances (axis-aligned components).")
    edges = torch.linspace(-lim, lim, K + 1, dtype=torch.float64)
    edges[0], edges[-1] = -math.inf, math.inf  # clipped tails
    std = covs.diagonal(dim1=1, dim2=2).sqrt()
    px = _cell_masses(means[:, 0], std[:, 0], edges)  # (components, K)
    py = _cell_masses(means[:, 1], std[:, 1], edges)
    table = torch.einsum("c,ca,cb->ab", weights, px, py)
    return table / table.sum()  # the weights sum to 1 up to rounding


def table_entropy(table: torch.Tensor) -> float:
    """Entropy in nats, ``-sum p log p``, of a probability table (any shape; zero cells contribute 0)."""
    p = torch.as_tensor(table, dtype=torch.float64).flatten()
    if (p < 0).any() or abs(p.sum().item() - 1) > 1e-6:
        raise ValueError(f"table must be non-negative and sum to 1; it sums to {p.sum().item():g}.")
    return float(-torch.special.xlogy(p, p).sum())


def sample_grid(table: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` token pairs (n, 2) drawn exactly from a (K, K) table, by inverse CDF in float64."""
    n = _check_count("n", n, 0)
    if not isinstance(table, torch.Tensor) or table.ndim != 2 or table.shape[0] != table.shape[1]:
        got = tuple(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__
        raise ValueError(f"table must be a square (K, K) tensor; got {got}.")
    K = table.shape[0]
    p = table.detach().double().flatten()
    if table.device.type == "cpu" and ((p < 0).any() or abs(p.sum().item() - 1) > 1e-6):
        raise ValueError(f"table must be non-negative and sum to 1; it sums to {p.sum().item():g}.")
    cdf = p.cumsum(0)
    u = torch.rand(n, dtype=torch.float64, device=p.device, generator=generator) * cdf[-1]
    flat = torch.searchsorted(cdf, u, right=True).clamp_(max=K * K - 1)
    return torch.stack([flat // K, flat % K], dim=1)


# ---------------------------------------------------------------------------------------------
# Digits
# ---------------------------------------------------------------------------------------------


def load_digit_tokens(levels: int, with_labels: bool = False):
    """scikit-learn's 1797 8x8 digits as tokens, shape (1797, 64), ids in ``0..levels-1`` (row-major pixels).

    The pixels' 17 grey values 0..16 are cut into ``levels`` equal bins, ``token = floor(v * levels / 17)``
    (2 levels: ``v >= 9`` is ink). ``levels`` in 2..16. With ``with_labels=True``, ``(tokens, labels)``.
    :func:`digit_images` maps tokens back to images.
    """
    levels = _check_count("levels", levels, 2, 16)
    images, labels = load_digits(with_labels=True)
    values = torch.round((images.double() + 1) * 8).long()  # back to the original 0..16
    tokens = (values * levels).div(17, rounding_mode="floor").reshape(len(values), 64)
    return (tokens, labels) if with_labels else tokens


def digit_images(tokens: torch.Tensor, levels: int) -> torch.Tensor:
    """Tokens (B, 64) of :func:`load_digit_tokens` to images (B, 1, 8, 8) in [-1, 1], for plotting: each
    level becomes the middle of the grey values 0..16 its bin holds."""
    levels = _check_count("levels", levels, 2, 16)
    _check_tokens(tokens, levels)
    if tokens.ndim != 2 or tokens.shape[1] != 64:
        raise ValueError(f"tokens must have shape (B, 64); got {tuple(tokens.shape)}.")
    bins = (torch.arange(17) * levels).div(17, rounding_mode="floor")  # the level of each grey value
    middle = torch.bincount(bins, torch.arange(17.0)) / torch.bincount(bins)  # their mean, per level
    return (middle.to(tokens.device)[tokens] / 8 - 1).reshape(-1, 1, 8, 8)


# ---------------------------------------------------------------------------------------------
# Characters
# ---------------------------------------------------------------------------------------------

HELDOUT_FRACTION = 0.1
_ASCII = str.maketrans({"\u201c": '"', "\u201d": '"', "\u2018": "'", "\u2019": "'", "\u2013": "-",
                        "\u2014": "-", "\u2026": "..."})  # fmt: skip


def normalize_text(s: str) -> str:
    """Typographic quotes and dashes to ASCII, other non-ASCII and control characters dropped, every run
    of whitespace (newlines included) collapsed to one space, ends stripped."""
    s = re.sub(r"\s+", " ", s.translate(_ASCII))
    s = "".join(ch for ch in s if " " <= ch <= "~")
    return re.sub(" +", " ", s).strip()


@functools.lru_cache(maxsize=1)
def _corpus() -> tuple[str, str]:
    from pydoc_data.topics import topics

    text = normalize_text(" ".join(topics[k] for k in sorted(topics)))
    cut = len(text) - int(len(text) * HELDOUT_FRACTION)
    return text[:cut], text[cut:]


@dataclass(frozen=True)
class TextData:
    """One split of :func:`load_text`: ``text``, its ``ids`` (LongTensor (N,)), and the vocabulary.

    ``vocab`` is the train split's sorted characters; character ``vocab[i]`` has id ``i``
    (``stoi[vocab[i]] == i``), ``K = len(vocab)``. :meth:`encode` / :meth:`decode` convert.
    """

    split: str
    text: str
    vocab: str
    ids: torch.Tensor = field(repr=False)
    stoi: dict = field(repr=False)

    @property
    def K(self) -> int:
        return len(self.vocab)

    def encode(self, s: str) -> torch.Tensor:
        """Ids (len(s),) of a string; a character outside the vocabulary is a clear error."""
        try:
            return torch.tensor([self.stoi[ch] for ch in s], dtype=torch.long)
        except KeyError as err:
            raise ValueError(
                f"character {err.args[0]!r} is not in the {self.K}-character vocabulary."
            ) from None

    def decode(self, ids) -> str:
        """The string of ids (a 1D tensor or sequence of ints in ``0..K-1``)."""
        ids = torch.as_tensor(ids)
        if ids.ndim != 1:
            raise ValueError(f"decode takes one sequence of shape (N,); got {tuple(ids.shape)}.")
        _check_tokens(ids.long().cpu(), self.K, "ids")
        return "".join(self.vocab[i] for i in ids.tolist())


def load_text(split: str = "train") -> TextData:
    """Character-level English: the Python documentation topics of ``pydoc_data.topics`` (standard library).

    The topics are joined in sorted order and normalized (:func:`normalize_text`: printable ASCII, one
    space for any whitespace). The last 10% of the characters are the ``"heldout"`` split, the rest
    ``"train"``; the vocabulary is the train split's characters (it covers the held-out split). With
    Python 3.11.7 there are K = 93 characters, 389,963 train and 43,329 held-out characters (the
    documentation, and so these numbers, change a little between Python versions).
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout'; got {split!r}.")
    train, heldout = _corpus()
    vocab = "".join(sorted(set(train)))
    stoi = {ch: i for i, ch in enumerate(vocab)}
    text = train if split == "train" else "".join(ch for ch in heldout if ch in stoi)
    ids = torch.tensor([stoi[ch] for ch in text], dtype=torch.long)
    return TextData(split, text, vocab, ids, stoi)


def text_windows(
    ids: torch.Tensor, length: int, n: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``n`` random windows (n, length) of consecutive ids, starts uniform over ``0..len(ids)-length``,
    drawn on ``ids``' device from ``generator``."""
    length, n = _check_count("length", length, 1), _check_count("n", n, 0)
    if not isinstance(ids, torch.Tensor) or ids.ndim != 1 or ids.dtype != torch.long:
        got = f"{tuple(ids.shape)} {ids.dtype}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"ids must be a 1D LongTensor; got {got}.")
    if length > len(ids):
        raise ValueError(f"windows of length {length} do not fit in {len(ids)} ids.")
    starts = torch.randint(0, len(ids) - length + 1, (n,), device=ids.device, generator=generator)
    return ids[starts[:, None] + torch.arange(length, device=ids.device)]
