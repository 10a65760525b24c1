"""Calibration with the person as the unit: p is the worst healthy participant's own tail probability."""

from __future__ import annotations

import numpy as np
import pytest

from anomri.maps.postprocess import PostProcessing
from anomri.maps.probability import CalibrationCopy, HealthyNull
from anomri.maps.tails import WorstSubjectTail


def _people(n_people: int, n_voxels: int, spread: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Healthy voxels of people who differ by a global shift (a random effect), N(mu_j, 1), mu_j ~ N(0, spread)."""
    return [rng.normal(rng.normal(0.0, spread), 1.0, n_voxels) for _ in range(n_people)]


def test_body_p_is_the_largest_of_the_participants_conformal_counts() -> None:
    rng = np.random.default_rng(0)
    people = _people(3, 4000, 0.5, rng)
    tail = WorstSubjectTail.fit(np.concatenate(people), np.repeat(["sub-A", "sub-B", "sub-C"], 4000))
    probes = np.quantile(np.concatenate(people), [0.1, 0.5, 0.9, 0.95])  # inside every person's body
    expected = [max((1.0 + np.count_nonzero(x >= s)) / (len(x) + 1.0) for x in people) for s in probes]
    np.testing.assert_allclose(tail.survival(probes), expected, rtol=1e-12)


def test_no_calibration_participant_is_flagged_beyond_the_level() -> None:
    rng = np.random.default_rng(1)
    people = _people(5, 3000, 1.0, rng)
    tail = WorstSubjectTail.fit(np.concatenate(people), np.repeat(np.arange(5), 3000))
    for level in (0.05, 0.02):  # in the body of every person's tail (each person's top 50 voxels are modelled)
        threshold = tail.quantile(level)
        flagged = [np.mean(x >= threshold) for x in people]
        assert max(flagged) <= level + 1.0 / 3000
        # The worst person sets the threshold: someone sits at the level, not far below it.
        assert max(flagged) >= level - 2.0 / 3000


def test_a_new_person_exceeds_the_level_at_most_once_in_n_plus_one() -> None:
    """Exchangeable people with person-wide shifts: the pooled null flags a new person beyond the level about half
    the time, the worst-subject null at most 1 / (n + 1) of the time (n = 4 here), up to sampling error."""
    rng = np.random.default_rng(2)
    level, n_people, repeats = 0.05, 4, 150
    beyond = {"voxel": 0, "subject": 0}
    for _ in range(repeats):
        people = _people(n_people + 1, 1500, 0.5, rng)
        new, null = people[0], people[1:]
        pooled = np.sort(np.concatenate(null))
        beyond["voxel"] += np.mean(new >= pooled[int(np.ceil((1 - level) * len(pooled)))]) > level
        tail = WorstSubjectTail.fit(np.concatenate(null), np.repeat(np.arange(n_people), 1500))
        beyond["subject"] += np.mean(new >= tail.quantile(level)) > level
    bound = 1.0 / (n_people + 1)
    assert beyond["subject"] / repeats <= bound + 3.0 * np.sqrt(bound * (1 - bound) / repeats)
    assert beyond["voxel"] / repeats >= 0.35


def _null(unit: str, rng: np.random.Generator) -> HealthyNull:
    people = _people(3, 2000, 0.8, rng)
    copies = [CalibrationCopy(f"sub-C0{j}", 1.0, None) for j in range(3)]
    return HealthyNull({"neg-elbo": np.concatenate(people)}, PostProcessing(centring="none"), copies=copies,
                       copy_index=np.repeat(np.arange(3), 2000), unit=unit)


def test_the_unit_survives_matching_and_the_null_file_and_the_shift_null_pools_voxels(tmp_path) -> None:
    null = _null("subject", np.random.default_rng(3))
    # Scores up to the pooled 95th percentile: the body of every tail, where the conformal counts compare exactly.
    probe = {"neg-elbo": np.linspace(-3.0, np.quantile(null.values["neg-elbo"], 0.95), 50)}
    null.save(tmp_path / "null.npz")
    loaded = HealthyNull.load(tmp_path / "null.npz")
    assert loaded.unit == "subject"
    np.testing.assert_array_equal(loaded.log_tail_probability(probe), null.log_tail_probability(probe))
    left = null.matched(None, exclude=["sub-C00"])
    assert left.unit == "subject" and sorted(left.final.members) == ["sub-C01", "sub-C02"]
    pooled = _null("voxel", np.random.default_rng(3))
    np.testing.assert_array_equal(null.shift_null().log_tail_probability(probe), pooled.log_tail_probability(probe))
    # In the body the pooled count (1 + sum_j c_j) / (3n + 1) never exceeds max_j (1 + c_j) / (n + 1).
    assert np.all(null.log_tail_probability(probe) >= pooled.log_tail_probability(probe) - 1e-12)


def test_the_subject_unit_needs_to_know_whose_voxels_are_whose() -> None:
    with pytest.raises(ValueError, match="which scan each voxel came from"):
        HealthyNull({"neg-elbo": np.zeros(500)}, unit="subject")
    with pytest.raises(ValueError, match="calibration unit"):
        HealthyNull({"neg-elbo": np.zeros(500)}, unit="person")
