"""The evidence figure's z axis always carries labelled ticks over its whole range."""

import numpy as np
import pytest

from tmask_validate.plots_evidence import _z_ticks


@pytest.mark.parametrize("lo, hi", [(-3.4, 3.2), (-1.0, 3.1), (-0.3, 3.05), (-0.2, 0.15),
                                    (-7.5, 4.0)])
def test_short_spans_get_several_round_ticks(lo, hi):
    ticks = _z_ticks(lo, hi)
    assert len(ticks) >= 3
    assert all(lo - 1e-9 <= t <= hi + 1e-9 for t in ticks)
    steps = np.diff(ticks)
    assert np.allclose(steps, steps[0])  # evenly spaced: the axis is linear within +-3
    # the ticks span most of the range, so no value is read off an unlabelled stretch
    assert ticks[-1] - ticks[0] >= 0.5 * (hi - lo)


def test_long_spans_get_the_log_steps_and_the_threshold():
    ticks = _z_ticks(-250.0, 40.0)
    assert ticks == [-100.0, -30.0, -10.0, -3.0, 0.0, 3.0, 10.0, 30.0]


def test_figure_axes_have_labels_for_a_narrow_negative_range(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tmask_validate.plots_evidence import _zaxis

    fig, ax = plt.subplots()
    ax.plot([2, 4], [-0.95, -0.25], "o:")
    ax.axhline(3.0)
    _zaxis(ax)
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    plt.close(fig)
    assert len(labels) >= 3  # before the fix: none (the ticks were picked before the line)
    assert "3" in labels
