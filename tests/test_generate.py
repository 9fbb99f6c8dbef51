"""omni_jax.generate: the greedy argmax behind sample_next."""

import jax.numpy as jnp
import numpy as np

from omni_jax.generate import SamplingConfig, first_argmax, sample_next


def test_first_argmax_matches_argmax_on_ties_infinities_and_nans(rng):
    rows = rng.standard_normal((8, 300)).astype(np.float32)
    rows[1, [7, 40, 299]] = 9.0  # ties: the first wins
    rows[2, :] = -np.inf  # all -inf: index 0
    rows[3, [5, 250]] = np.inf
    rows[4, [17, 90]] = np.nan  # NaN: the first NaN, as jnp.argmax
    rows[5, -1] = 50.0  # the last index
    rows[6, :] = 0.0
    want = np.asarray(jnp.argmax(jnp.asarray(rows), axis=-1))
    np.testing.assert_array_equal(want[:7], [np.argmax(rows[0]), 7, 0, 5, 17, 299, 0])
    got = first_argmax(jnp.asarray(rows))
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), want)


def test_greedy_sample_next_is_the_argmax_after_the_repetition_penalty(rng):
    logits = rng.standard_normal((3, 64)).astype(np.float32)
    seen = np.zeros((3, 64), bool)
    top = logits.argmax(-1)
    seen[0, top[0]] = True
    runner_up = np.sort(logits[0])[-2]
    assert runner_up > 0
    logits[0, top[0]] = 2.0 * runner_up  # still the top; penalised by 2.5 it falls below the runner-up
    cfg = SamplingConfig(repetition_penalty=2.5)
    got = np.asarray(sample_next(jnp.asarray(logits), jnp.asarray(seen), None, cfg))
    penalised = np.where(seen, np.where(logits < 0, logits * 2.5, logits / 2.5), logits)
    np.testing.assert_array_equal(got, penalised.argmax(-1))
    assert got[0] != top[0]
