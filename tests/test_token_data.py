"""Token data (dmlib.token_data): grid quantization and exact grid laws, digit tokens, character text."""

import math
import re
import sys

import pytest
import torch
from test_device import StrictDevices

from dmlib import token_data as td
from dmlib.data import load_digits, make_toy

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# Grid
# ---------------------------------------------------------------------------------------------


def test_quantize_and_centers_round_trip(gen):
    K, lim = 17, 2.5
    tokens = torch.randint(0, K, (500, 2), generator=gen)
    centers = td.grid_centers(tokens, K, lim)
    assert centers.shape == (500, 2) and centers.dtype == torch.float32
    assert torch.equal(td.quantize_grid(centers, K, lim), tokens)
    # a point inside the square lies within half a cell of its cell's centre
    x = (2 * torch.rand(1000, 2, generator=gen) - 1) * lim
    q = td.quantize_grid(x, K, lim)
    assert q.dtype == torch.long and q.min() >= 0 and q.max() <= K - 1
    assert ((td.grid_centers(q, K, lim) - x).abs() <= lim / K + 1e-6).all()
    # outside points are clipped to the border cells
    far = torch.tensor([[-100.0, 100.0], [3.0, -2.6], [2.5, 0.0]])
    assert td.quantize_grid(far, K, lim).tolist() == [[0, K - 1], [K - 1, 0], [K - 1, K // 2]]


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic over the cells expecting >= 5 counts, the rest lumped into one cell."""
    n = counts.sum()
    expected = n * probs.flatten().double()
    counts = counts.flatten().double()
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum().item()
    return stat, int(keep.sum()) - 1


def _histogram(tokens: torch.Tensor, K: int) -> torch.Tensor:
    return torch.bincount(tokens[:, 0] * K + tokens[:, 1], minlength=K * K).reshape(K, K)


def asymmetric():
    """Unequal weights and axis-aligned anisotropic components: its table is not symmetric."""
    from dmlib.oracle import GaussianMixture

    covs = [[[0.09, 0], [0, 0.25]], [[0.5, 0], [0, 0.1]]]
    return GaussianMixture([[-1.0, 0.5], [1.0, 1.5]], covs, weights=[0.7, 0.3])


@pytest.mark.parametrize("name", ["eight_gaussians", "twenty_five_gaussians", "asymmetric"])
def test_grid_table_is_the_law_of_quantized_samples(name):
    K, lim, n = 24, 3.0, 200_000
    mix = asymmetric() if name == "asymmetric" else name
    if name == "asymmetric":
        lim = 2.0  # the border cells hold visible tails (clipped points)
    table = td.toy_grid_distribution(mix, K, lim)
    assert table.shape == (K, K) and table.dtype == torch.float64 and (table >= 0).all()
    assert abs(table.sum().item() - 1) < 1e-12
    g = torch.Generator().manual_seed(0)
    x = asymmetric().sample(n, g) if name == "asymmetric" else make_toy(name, n, g)
    counts = _histogram(td.quantize_grid(x, K, lim), K)
    stat, df = _chi_square(counts, table)
    assert stat < df + 6 * math.sqrt(2 * df), (stat, df)
    # the same statistic rejects a slightly wrong table (a grid over another square)
    stat, df = _chi_square(counts, td.toy_grid_distribution(mix, K, 1.05 * lim))
    assert stat > df + 6 * math.sqrt(2 * df), (stat, df)


def test_grid_sampler_draws_from_the_table():
    K = 12
    table = td.toy_grid_distribution(asymmetric(), K, 3.0)  # its transpose is another law
    tokens = td.sample_grid(table, 100_000, torch.Generator().manual_seed(1))
    assert tokens.shape == (100_000, 2) and tokens.dtype == torch.long
    stat, df = _chi_square(_histogram(tokens, K), table)
    assert stat < df + 6 * math.sqrt(2 * df), (stat, df)
    stat, df = _chi_square(_histogram(tokens, K), table.T)
    assert stat > df + 6 * math.sqrt(2 * df), (stat, df)
    again = td.sample_grid(table, 100, torch.Generator().manual_seed(1))
    assert torch.equal(again, tokens[:100])  # seeded
    one_cell = torch.zeros(K, K, dtype=torch.float64)
    one_cell[3, 7] = 1
    assert (td.sample_grid(one_cell, 50) == torch.tensor([3, 7])).all()


def test_grid_entropy_approaches_the_differential_entropy():
    """A fine grid's entropy is ``h - log(cell area)``; eight well-separated Gaussians of std 0.1 have
    ``h = log 8 + log(2 pi e 0.1^2)``."""
    K, lim = 256, 3.0
    H = td.table_entropy(td.toy_grid_distribution("eight_gaussians", K, lim))
    h = math.log(8) + math.log(2 * math.pi * math.e * 0.01)
    assert abs(H + math.log((2 * lim / K) ** 2) - h) < 5e-3
    assert td.table_entropy(torch.full((4, 4), 1 / 16)) == pytest.approx(math.log(16))


def test_grid_bad_inputs():
    x = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="shape \\(n, 2\\)"):
        td.quantize_grid(torch.zeros(4, 3), 8)
    with pytest.raises(ValueError, match="float points"):
        td.quantize_grid(torch.zeros(4, 2, dtype=torch.long), 8)
    with pytest.raises(ValueError, match="K must be"):
        td.quantize_grid(x, 0)
    with pytest.raises(ValueError, match="lim must be"):
        td.quantize_grid(x, 8, -1.0)
    with pytest.raises(ValueError, match="0..7"):
        td.grid_centers(torch.tensor([[0, 8]]), 8)
    with pytest.raises(ValueError, match="LongTensor"):
        td.grid_centers(torch.zeros(3, 2), 8)
    with pytest.raises(ValueError, match="no closed-form density"):
        td.toy_grid_distribution("two_moons", 8)
    from dmlib.oracle import GaussianMixture

    tilted = GaussianMixture([[0.0, 0.0]], [[[1.0, 0.5], [0.5, 1.0]]])
    with pytest.raises(ValueError, match="diagonal"):
        td.toy_grid_distribution(tilted, 8)
    with pytest.raises(ValueError, match="sum to 1"):
        td.sample_grid(torch.ones(3, 3), 5)
    with pytest.raises(ValueError, match="square"):
        td.sample_grid(torch.ones(9), 5)


# ---------------------------------------------------------------------------------------------
# Digits
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("levels", [2, 4, 16])
def test_digit_tokens(levels):
    tokens, labels = td.load_digit_tokens(levels, with_labels=True)
    assert tokens.shape == (1797, 64) and tokens.dtype == torch.long and labels.shape == (1797,)
    assert sorted(tokens.unique().tolist()) == list(range(levels))  # every level used, none beyond
    images = load_digits()
    # decoded tokens lie within half a bin (at most ceil(17 / levels) grey values, 8 per unit) of the images
    err = (td.digit_images(tokens, levels) - images).abs()
    assert (err <= (math.ceil(17 / levels) - 1) / 16 + 1e-6).all()
    if levels == 2:  # ink is a grey value >= 9 of 16
        assert torch.equal(tokens, ((images.reshape(1797, 64) + 1) * 8 >= 8.5).long())


def test_digit_tokens_bad_levels():
    for bad in (1, 17, 2.5, True, "4"):
        with pytest.raises(ValueError, match="levels must"):
            td.load_digit_tokens(bad)
    with pytest.raises(ValueError, match="0..3"):
        td.digit_images(torch.full((2, 64), 4), 4)


# ---------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------


def test_normalize_text():
    assert td.normalize_text("  a\n\n\tb \u201cc\u201d \u2014 \u00dfd\u2026 ") == 'a b "c" - d...'


def test_text_split_vocab_and_round_trip():
    train, heldout = td.load_text("train"), td.load_text("heldout")
    td._corpus.cache_clear()  # rebuilt from the standard library: the same split again
    assert td.load_text("train").text == train.text and td.load_text("heldout").text == heldout.text
    from pydoc_data.topics import topics

    # disjoint and contiguous: the held-out split is the end of the text, about 10% of it
    whole = td.normalize_text(" ".join(topics[k] for k in sorted(topics)))
    assert train.text + heldout.text == whole
    assert len(heldout.text) == int(0.1 * len(whole))
    assert heldout.vocab == train.vocab and set(train.text) == set(train.vocab)
    assert set(heldout.text) <= set(train.vocab)
    assert len(train.vocab) == train.K and train.K <= 95 and train.vocab == "".join(sorted(train.vocab))
    for split in (train, heldout):
        assert split.ids.dtype == torch.long and split.ids.shape == (len(split.text),)
        assert split.decode(split.ids) == split.text
        assert torch.equal(split.encode(split.text), split.ids)
    assert all(train.stoi[ch] == i for i, ch in enumerate(train.vocab))
    with pytest.raises(ValueError, match="not in the"):
        train.encode("caf\u00e9")
    with pytest.raises(ValueError, match="0..92|ids must lie"):
        train.decode([0, train.K])
    with pytest.raises(ValueError, match="split must be"):
        td.load_text("test")


@pytest.mark.skipif(sys.version_info[:3] != (3, 11, 7), reason="the sizes are stated for Python 3.11.7")
def test_text_sizes_are_stated():
    train, heldout = td.load_text("train"), td.load_text("heldout")
    stated = (
        f"K = {train.K} characters, {len(train.text):,} train and {len(heldout.text):,} held-out characters"
    )
    assert stated in re.sub(r"\s+", " ", td.load_text.__doc__), stated


def test_text_windows(gen):
    ids = torch.arange(100)
    w = td.text_windows(ids, 7, 50, torch.Generator().manual_seed(3))
    assert w.shape == (50, 7) and w.dtype == torch.long
    assert (w[:, 1:] - w[:, :-1] == 1).all() and w.min() >= 0 and w.max() <= 99  # consecutive, in range
    assert torch.equal(w, td.text_windows(ids, 7, 50, torch.Generator().manual_seed(3)))
    assert len(set(w[:, 0].tolist())) > 20  # random starts
    assert td.text_windows(ids, 100, 3).eq(ids).all()  # the only window
    with pytest.raises(ValueError, match="do not fit"):
        td.text_windows(ids, 101, 3)
    with pytest.raises(ValueError, match="1D LongTensor"):
        td.text_windows(ids.float(), 5, 3)
    with pytest.raises(ValueError, match="length must"):
        td.text_windows(ids, 0, 3)


def test_token_data_on_meta():
    """Quantizing, decoding, windows and grid sampling create nothing on the CPU beside their inputs."""
    with StrictDevices():
        x = torch.zeros(16, 2, device="meta")
        q = td.quantize_grid(x, 8)
        c = td.grid_centers(q, 8)
        w = td.text_windows(torch.zeros(200, dtype=torch.long, device="meta"), 9, 5)
        s = td.sample_grid(torch.full((4, 4), 1 / 16, dtype=torch.float64, device="meta"), 7)
        im = td.digit_images(torch.zeros(3, 64, dtype=torch.long, device="meta"), 4)
    for out, shape in ((q, (16, 2)), (c, (16, 2)), (w, (5, 9)), (s, (7, 2)), (im, (3, 1, 8, 8))):
        assert out.device.type == "meta" and out.shape == shape
