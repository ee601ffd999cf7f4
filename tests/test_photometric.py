"""Photometric operations as DALI operators: each one acts, touches only RGB,
draws its parameters from the sample seed, and one_of picks at most one."""
import numpy as np
import pytest

from benchmarks.golden import recipe_photometric_ops
from engine import photometric
from engine import store as layout
from engine.pipeline import PlannedBatches, SampleAugment, WindowSource, build_pipeline
from engine.reader import WindowReader

SIZE = 48


OPS = recipe_photometric_ops()


def _run(store, augment: SampleAugment, with_ela=False):
    meta = layout.read_meta(layout.open_store(store))
    rows = np.flatnonzero(meta["label"] == 1)[:4]
    windows = np.stack([(0, 0, meta["height"][r], meta["width"][r]) for r in rows]).astype(np.int32)
    batches = PlannedBatches([rows], [windows], [np.arange(len(rows))])
    source = WindowSource(WindowReader(store, with_ela=with_ela), batches, SIZE, augment)
    pipe = build_pipeline(source, batch_size=len(rows), out_size=SIZE, device="cpu", device_id=None,
                          num_threads=1, py_workers=0, seed=0)
    out = pipe.run()
    return [np.stack([np.asarray(o[i]) for i in range(len(rows))]) for o in out]


def test_every_recipe_operation_is_covered():
    assert set(OPS) == set(photometric.PHOTOMETRIC)


@pytest.mark.parametrize("name", sorted(OPS))
def test_operation_acts_on_rgb_only(demo_store, name):
    params = {**OPS[name], "p": 1.0}
    plain = _run(demo_store, SampleAugment(seed=3), with_ela=True)
    plan = photometric.slots(((name, params),))
    augmented = _run(demo_store, SampleAugment(seed=3, photometric=plan), with_ela=True)
    image, mask, ela = 0, 1, 3
    assert np.abs(augmented[image] - plain[image]).mean() > 1e-3, f"{name} did not act"
    np.testing.assert_array_equal(augmented[mask], plain[mask])
    np.testing.assert_array_equal(augmented[ela], plain[ela])
    again = _run(demo_store, SampleAugment(seed=3, photometric=plan), with_ela=True)
    np.testing.assert_array_equal(again[image], augmented[image])
    if name != "motion_blur":  # a fixed-length line: only its angle is random
        other = _run(demo_store, SampleAugment(seed=4, photometric=plan), with_ela=True)
        assert not np.array_equal(other[image], augmented[image])


def test_one_of_applies_at_most_one_and_p_gates_it():
    plan = photometric.slots((("one_of", {"p": 0.7, "ops": (
        ("jpeg", {"quality": (70, 100)}), ("gaussian_blur", {"kernel": (3, 7)}),
        ("brightness_mul", {"range": (0.8, 1.2)}))}),))
    assert [s.group for s in plan] == [0, 0, 0]
    counts = np.zeros(4)
    for seed in range(2000):
        drawn = photometric.draw(plan, np.random.default_rng(seed), SIZE)
        flags = [bool(drawn[i]) for i in range(0, len(drawn), 2)]  # flag, params per slot
        assert sum(flags) <= 1
        counts[flags.index(True) if any(flags) else 3] += 1
    assert abs(counts[3] / 2000 - 0.3) < 0.04            # none acts with 1 - p
    assert np.all(np.abs(counts[:3] / 2000 - 0.7 / 3) < 0.04)


def test_mixed_one_of_is_refused():
    with pytest.raises(ValueError, match="mixes photometric"):
        photometric.slots((("one_of", {"p": 1, "ops": (("hflip", {}), ("jpeg", {"quality": (70, 90)}))}),))


def test_hue_saturation_value_units():
    """OpenCV hue units -> degrees; an integer limit is 1 +- L/255; a tuple a factor range."""
    slot = photometric.slots((("hue_saturation_value",
                               {"p": 1, "hue": 20, "saturation": 30, "value": (0.8, 1.2)}),))
    draws = np.array([photometric.draw(slot, np.random.default_rng(s), SIZE)[1] for s in range(500)])
    assert draws[:, 0].min() >= -40 and draws[:, 0].max() <= 40 and draws[:, 0].max() > 30
    assert draws[:, 1].min() >= 1 - 30 / 255 and draws[:, 1].max() <= 1 + 30 / 255
    assert draws[:, 2].min() >= 0.8 and draws[:, 2].max() <= 1.2
