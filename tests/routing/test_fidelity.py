"""Fidelity to the reference conventions (issue 17): capacity rounding, the balancing-loss conventions against
GShard/DeepSpeed and transformers, renormalising after drops, per-layer hash tables."""
import math
from fractions import Fraction

from routing.capacity import expert_capacity


# ---------------------------------------------------------------- capacity: the documented formula, exactly

def test_capacity_regression_point():
    # 0.55 * 100 is 55.00000000000001 in doubles; the formula ceil(11/20 * 100 * 1 / 5) is 11.
    assert 0.55 * 100 != 55
    assert expert_capacity(100, 5, 1, 0.55, 0) == 11
    assert expert_capacity(100, 5, 1, -0.55, 0) == 11


def test_capacity_equals_exact_formula_on_grid():
    """tokens 1..128, E in 8 sizes, k 1..3, cf = n/20 for n = 1..40 (0.05 to 2.0): 122,880 points against Fraction arithmetic."""
    mismatches, float_mismatches, points = [], 0, 0
    for n in range(1, 41):
        cf, exact_cf = n / 20, Fraction(n, 20)
        for experts in (1, 2, 3, 4, 5, 7, 8, 64):
            for k in (1, 2, 3):
                for tokens in range(1, 129):
                    points += 1
                    want = math.ceil(exact_cf * tokens * k / experts)
                    if expert_capacity(tokens, experts, k, cf, 0) != want:
                        mismatches.append((tokens, experts, k, cf))
                    float_mismatches += math.ceil(cf * tokens * k / experts) != want
    assert points == 122_880
    assert mismatches == []
    assert float_mismatches == 57  # the double-precision ceiling this replaces is one slot too many at 57 points
