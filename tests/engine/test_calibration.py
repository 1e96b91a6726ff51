"""Calibration and ECE against a hand-computed example."""
import math

import pytest

from rankpm.engine.score.calibration import calibration, confidence_and_outcome, reliability_plot


def test_confidence_is_sigmoid_of_the_absolute_gap_and_outcome_is_the_sign():
    conf, outcome = confidence_and_outcome([2.0, -2.0, 0.0])
    s2 = 1 / (1 + math.exp(-2))  # 0.880797
    assert conf.tolist() == pytest.approx([s2, s2, 0.5])
    assert outcome.tolist() == [1.0, 0.0, 0.5]  # an exact tie is half right


def test_ece_on_a_hand_worked_example():
    """Two bins over [0.5, 1]: [0.5, 0.75) and [0.75, 1].

    gaps (r_better - r_worse)   confidence sigmoid(|gap|)   right?   bin
        0.2                      0.549834                    1        0
       -0.4                      0.598688                    0        0
        0.0                      0.5                         0.5      0
        2.0                      0.880797                    1        1
       -3.0                      0.952574                    0        1
    bin 0: n=3, confidence (0.549834+0.598688+0.5)/3 = 0.549507, frequency 1.5/3 = 0.5
    bin 1: n=2, confidence (0.880797+0.952574)/2 = 0.916686, frequency 1/2 = 0.5
    ECE = 3/5 * 0.049507 + 2/5 * 0.416686 = 0.029704 + 0.166674 = 0.196378
    """
    result = calibration([0.2, -0.4, 0.0, 2.0, -3.0], bins=2)
    assert result.pairs == 5
    assert [b.count for b in result.bins] == [3, 2]
    assert result.bins[0].confidence == pytest.approx(0.549507, abs=1e-6)
    assert result.bins[1].confidence == pytest.approx(0.916686, abs=1e-6)
    assert [b.frequency for b in result.bins] == [0.5, 0.5]
    assert (result.bins[0].lo, result.bins[0].hi, result.bins[1].hi) == (0.5, 0.75, 1.0)
    assert result.ece == pytest.approx(0.196378, abs=1e-6)


def test_a_calibrated_model_has_small_ece_and_empty_bins_are_nan():
    # gaps of +-ln(3): confidence 0.75; right 3 times out of 4 -> perfectly calibrated
    g = math.log(3)
    result = calibration([g, g, g, -g], bins=4)
    assert result.ece == pytest.approx(0.0, abs=1e-12)
    assert [b.count for b in result.bins] == [0, 0, 4, 0]
    assert math.isnan(result.bins[0].frequency)


def test_huge_gaps_do_not_overflow_and_bad_input_is_refused(tmp_path):
    assert calibration([1e4, -1e4]).bins[-1].confidence == 1.0
    with pytest.raises(ValueError, match="1 score gaps are not finite"):
        calibration([1.0, float("nan")])
    result = calibration([0.3, 1.0, -2.0], bins=5)
    reliability_plot(result, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
