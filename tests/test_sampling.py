"""Sampling: each filter keeps exactly the tokens its definition names, draws follow the resulting
probabilities, and a seed fixes the sequence. Expected sets are computed here from the definitions
(sorting probabilities), not with the module's own helpers."""

import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyoss.errors import TinyossError
from tinyoss.sampling import Sampler, SamplingError, draw

N_VOCAB = 201088


def random_logits(seed: int, n: int = 50, scale: float = 3.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)


def reference_probs(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    e = np.exp(z - z.max())
    return e / e.sum()


def support(probs: np.ndarray) -> set[int]:
    return set(np.flatnonzero(probs > 0).tolist())


def assert_frequencies_match(counts: np.ndarray, probs: np.ndarray, n_draws: int) -> None:
    """Each count within 5 binomial standard deviations of n*p (a false alarm is ~1e-6 per token)."""
    expected = n_draws * probs
    sigma = np.sqrt(n_draws * probs * (1 - probs))
    assert np.all(np.abs(counts - expected) <= 5 * sigma + 1e-9), (counts, expected)


@pytest.mark.parametrize("seed", range(5))
def test_greedy_is_argmax(seed: int) -> None:
    logits = random_logits(seed, n=1000)
    sampler = Sampler(temperature=0.0, top_k=3, top_p=0.5, seed=seed)  # filters are irrelevant when greedy
    assert [sampler.sample(logits) for _ in range(5)] == [int(np.argmax(logits))] * 5


def test_greedy_tie_takes_the_lowest_id() -> None:
    assert Sampler(temperature=0).sample(np.array([0.0, 5.0, 1.0, 5.0], np.float32)) == 1


def test_same_seed_same_tokens_different_seed_different_tokens() -> None:
    logits = np.zeros(1000, np.float32)  # uniform: every draw is pure randomness
    runs = [[Sampler(seed=s).sample(logits) for _ in range(50)] for s in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_a_shared_generator_is_used_as_given() -> None:
    logits = random_logits(1)
    a = Sampler(seed=np.random.default_rng(3))
    b = Sampler(seed=3)
    assert [a.sample(logits) for _ in range(20)] == [b.sample(logits) for _ in range(20)]


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_frequencies_follow_softmax_of_logits_over_temperature(temperature: float) -> None:
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0], np.float32)
    sampler, n_draws = Sampler(temperature=temperature, seed=123), 20000
    counts = np.bincount([sampler.sample(logits) for _ in range(n_draws)], minlength=logits.size)
    assert_frequencies_match(counts, reference_probs(logits, temperature), n_draws)


@pytest.mark.parametrize("k", [1, 3, 10])
def test_top_k_keeps_exactly_the_k_most_likely(k: int) -> None:
    logits = random_logits(k, n=200)
    top = set(np.argsort(-logits)[:k].tolist())
    sampler = Sampler(top_k=k, seed=0)
    kept = sampler.probabilities(logits)
    assert support(kept) == top
    draws = {sampler.sample(logits) for _ in range(3000)}
    likely = {t for t in top if kept[t] * 3000 > 30}  # expected 30+ times: missing them would be a bug
    assert likely <= draws <= top


def test_top_k_keeps_ties_with_the_kth() -> None:
    logits = np.array([3.0, 2.0, 2.0, 2.0, 1.0], np.float32)
    assert support(Sampler(top_k=2).probabilities(logits)) == {0, 1, 2, 3}


def test_top_k_frequencies_are_the_renormalised_top_k() -> None:
    logits = np.array([1.5, 1.0, 0.8, 0.2, -0.5, -2.0], np.float32)
    kept = reference_probs(logits)
    kept[3:] = 0
    kept /= kept.sum()
    sampler, n_draws = Sampler(top_k=3, seed=5), 20000
    counts = np.bincount([sampler.sample(logits) for _ in range(n_draws)], minlength=logits.size)
    assert_frequencies_match(counts, kept, n_draws)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.6, 0.9, 0.99])
def test_top_p_keeps_the_minimal_prefix_reaching_p(seed: int, top_p: float) -> None:
    logits = random_logits(seed, n=100)
    probs = reference_probs(logits)
    order = np.argsort(-probs)
    mass = np.cumsum(probs[order])
    m = int(np.argmax(mass >= top_p)) + 1  # the shortest most-likely prefix with mass >= top_p
    assert mass[m - 1] >= top_p and (m == 1 or mass[m - 2] < top_p)
    kept = Sampler(top_p=top_p).probabilities(logits)
    assert support(kept) == set(order[:m].tolist())
    np.testing.assert_allclose(kept[order[:m]], probs[order[:m]] / mass[m - 1], rtol=1e-9)


def test_top_p_never_keeps_nothing() -> None:
    logits = np.array([10.0, 0.0, 0.0], np.float32)
    assert support(Sampler(top_p=1e-9).probabilities(logits)) == {0}


@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.5, 0.9])
def test_min_p_keeps_tokens_at_least_min_p_of_the_top(min_p: float) -> None:
    logits = random_logits(int(min_p * 100), n=300)
    probs = reference_probs(logits)
    expected = set(np.flatnonzero(probs >= min_p * probs.max()).tolist())
    sampler = Sampler(min_p=min_p, seed=1)
    assert support(sampler.probabilities(logits)) == expected
    assert {sampler.sample(logits) for _ in range(2000)} <= expected


def test_temperature_is_applied_before_top_p_and_min_p() -> None:
    """Documented order: with logits [2, 1, 0], top_p=0.7 keeps 2 tokens at T=1 (p=.665,.245,.090)
    but 1 token at T=0.5 (p=.867,.117,.016). Temperature-last would keep 2 in both cases."""
    logits = np.array([2.0, 1.0, 0.0], np.float32)
    assert support(Sampler(temperature=1.0, top_p=0.7).probabilities(logits)) == {0, 1}
    assert support(Sampler(temperature=0.5, top_p=0.7).probabilities(logits)) == {0}
    # min-p: p1/p0 = e^-1 = .37 at T=1 (kept by min_p=0.2) but e^-2 = .135 at T=0.5 (dropped)
    assert support(Sampler(temperature=1.0, min_p=0.2).probabilities(logits)) == {0, 1}
    assert support(Sampler(temperature=0.5, min_p=0.2).probabilities(logits)) == {0}


def test_filters_compose_in_order_top_k_then_top_p_then_min_p() -> None:
    logits = np.log(np.array([0.4, 0.3, 0.2, 0.06, 0.04]))
    # top_k=4 renormalises to .417 .3125 .208 .0625; top_p=0.7 then keeps {0, 1} (.729); min_p=0.5 keeps both
    assert support(Sampler(top_k=4, top_p=0.7, min_p=0.5).probabilities(logits)) == {0, 1}
    # min_p=0.8 then drops token 1 (.3125 < .8 * .417)
    assert support(Sampler(top_k=4, top_p=0.7, min_p=0.8).probabilities(logits)) == {0}


def test_logprobs_are_the_models_own_and_ranked() -> None:
    logits = random_logits(9, n=500)
    log_p = np.log(reference_probs(logits))
    for sampler in (Sampler(seed=2), Sampler(temperature=0.3, top_k=5, seed=2)):
        choice = sampler.sample_with_logprobs(logits, n_top=5)
        assert math.isclose(choice.logprob, log_p[choice.token], rel_tol=1e-9, abs_tol=1e-9)
        assert [t for t, _ in choice.top_logprobs] == np.argsort(-log_p)[:5].tolist()
        assert all(math.isclose(lp, log_p[t], abs_tol=1e-9) for t, lp in choice.top_logprobs)
    assert Sampler(seed=0).sample_with_logprobs(logits).top_logprobs == ()


def test_full_vocabulary_float32_logits() -> None:
    logits = np.random.default_rng(0).standard_normal(N_VOCAB).astype(np.float32)
    logits[200002] = 30.0  # <|return|> dominates: p > 0.99999
    sampler = Sampler(temperature=1.0, top_p=0.9, seed=0)
    assert {sampler.sample(logits) for _ in range(20)} == {200002}
    assert Sampler(temperature=0).sample(logits) == 200002


@pytest.mark.parametrize(
    "settings",
    [{"temperature": -1.0}, {"temperature": float("nan")}, {"top_k": -1}, {"top_k": 2.5},
     {"top_p": 0.0}, {"top_p": 1.5}, {"min_p": -0.1}, {"min_p": 2.0}],
)
def test_invalid_settings_are_clear_errors(settings: dict) -> None:
    with pytest.raises(SamplingError) as error:
        Sampler(**settings)
    assert isinstance(error.value, TinyossError)
    assert next(iter(settings)) in str(error.value)


@pytest.mark.parametrize(
    "logits", [np.array([0.0, np.nan]), np.full(3, -np.inf), np.array([0.0, np.inf]), np.zeros((2, 2)), np.zeros(0)]
)
def test_unsampleable_logits_are_clear_errors(logits: np.ndarray) -> None:
    for sampler in (Sampler(seed=0), Sampler(temperature=0)):
        with pytest.raises(SamplingError):
            sampler.sample(logits)


def test_float32_matrices_and_a_negative_n_top_are_named() -> None:
    """The float32 fast path took a [2, 3] matrix into numpy's broadcasting error;
    sample_with_logprobs(n_top=-3) returned no rivals silently."""
    with pytest.raises(SamplingError, match="non-empty vector, got shape"):
        Sampler(seed=1).sample(np.zeros((2, 3), np.float32))
    with pytest.raises(SamplingError, match="n_top must be an integer >= 0, got -3"):
        Sampler(seed=1).sample_with_logprobs(np.zeros(3, np.float32), -3)
    with pytest.raises(TypeError, match="n_top must be an integer"):
        Sampler(seed=1).sample_with_logprobs(np.zeros(3, np.float32), 1.5)


def test_logits_at_float32_extremes_sample_without_warnings() -> None:
    logits = np.array([-3e38, 3e38, -3e38], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (an overflow in the subtraction was warned)
        assert Sampler(seed=0).sample(logits) == 1


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 7000), st.floats(0.05, 3.0), st.floats(0.0, 0.9))
def test_the_plain_draw_is_the_reference_draw(seed, n, temperature, masked):
    """Sampler.sample without filters takes a two-level inverse CDF in float32 exp (fast, for
    the server's every token); on the same uniform numbers it picks the token `draw` picks from
    `probabilities` (float64), across chunk edges (2048) and with -inf logits."""
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal(n) * rng.uniform(0.1, 8)).astype(np.float32)
    logits[rng.random(n) < masked] = -np.inf
    logits[rng.integers(n)] = 1.0  # at least one finite
    fast, slow = Sampler(temperature=temperature, seed=seed), Sampler(temperature=temperature, seed=seed)
    picks = [fast.sample(logits) for _ in range(20)]
    assert picks == [draw(slow.probabilities(logits), slow.rng) for _ in range(20)]
    assert all(np.isfinite(logits[p]) for p in picks)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 3000), st.integers(1, 4))
def test_greedy_takes_the_first_largest_logit(seed, n, ties):
    """Temperature 0 on float32 logits (argmax without a float64 copy): the lowest id among those
    tied for the largest value, -inf logits beside them."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal(n).astype(np.float32)
    logits[rng.random(n) < 0.3] = -np.inf
    best = rng.choice(n, size=min(ties, n), replace=False)
    logits[best] = 9.0
    assert Sampler(temperature=0).sample(logits) == int(best.min())
    assert Sampler(temperature=0).sample(logits.tolist()) == int(best.min())


@pytest.mark.parametrize("temperature", [1e-38, 1e-40, 1e-300, 5e-324])
@pytest.mark.parametrize("filters", [{}, {"top_k": 5}])
def test_a_tiny_temperature_draws_among_the_largest_logits(temperature, filters):
    """A temperature near 0 (where 1/temperature overflows float32, or float64) is greedy in the
    limit: every draw is one of the logits tied for the largest, never a NaN's last id, and no
    numpy warning (the CLI prints those)."""
    logits = np.array([0.5, 3.0, -np.inf, 3.0, 2.9999998, -1.0], np.float32)
    sampler = Sampler(temperature=temperature, seed=0, **filters)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        picks = {sampler.sample(logits) for _ in range(40)}
    assert picks == {1, 3}
