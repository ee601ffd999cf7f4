"""The competition's run-length encoding: round trips and malformed input."""
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from trainers.rle import (
    AUTHENTIC, RLEError, decode_annotation, decode_instance, decode_runs, encode_annotation,
    encode_instance, mask_runs,
)

masks = st.tuples(st.integers(1, 12), st.integers(1, 12)).flatmap(
    lambda shape: arrays(np.bool_, shape))


@settings(max_examples=200, deadline=None)
@given(masks)
def test_instance_round_trip(mask):
    assert np.array_equal(decode_instance(encode_instance(mask), mask.shape), mask)
    runs = decode_runs(encode_instance(mask), mask.shape)
    assert np.array_equal(runs, mask_runs(mask))
    covered = np.zeros(mask.size, bool)              # [first, end) of column-major indices
    for first, end in runs:
        covered[first:end] = True
    assert np.array_equal(covered, mask.T.ravel())


@settings(max_examples=200, deadline=None)
@given(masks)
def test_runs_are_one_based_column_major_ascending_and_separated(mask):
    runs = json.loads(encode_instance(mask))
    starts, lengths = np.array(runs[0::2]), np.array(runs[1::2])
    expected = np.flatnonzero(mask.T.flatten()) + 1
    covered = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, lengths)] or [[]])
    assert np.array_equal(covered, expected)
    # Maximal runs: a gap of at least one pixel between consecutive runs.
    assert (starts[1:] > starts[:-1] + lengths[:-1]).all()


def test_run_crossing_a_column_boundary_is_one_run():
    mask = np.zeros((3, 2), bool)
    mask[2, 0] = mask[0, 1] = mask[1, 1] = True   # end of column 0, top of column 1
    assert encode_instance(mask) == "[3, 3]"


def test_full_and_empty_masks():
    assert encode_instance(np.ones((4, 5), bool)) == "[1, 20]"
    assert encode_instance(np.zeros((4, 5), bool)) == "[]"
    assert not decode_instance("[]", (4, 5)).any()


def test_column_major_not_row_major():
    mask = np.zeros((2, 3), bool)
    mask[0, 1] = True                               # row 0, column 1 -> pixel 3 (1-based)
    assert encode_instance(mask) == "[3, 1]"
    assert decode_instance("[2, 1]", (2, 3))[1, 0]


@settings(max_examples=100, deadline=None)
@given(st.lists(arrays(np.bool_, (6, 7)), max_size=4))
def test_annotation_round_trip(layers):
    layers = [m for m in layers if m.any()]
    decoded = decode_annotation(encode_annotation(layers), (6, 7))
    assert len(decoded) == len(layers)
    assert all(np.array_equal(a, b) for a, b in zip(decoded, layers))


def test_no_instances_is_authentic():
    assert encode_annotation([]) == AUTHENTIC
    assert decode_annotation(AUTHENTIC, (3, 3)) == []


def test_empty_instance_is_refused_when_encoding():
    with pytest.raises(ValueError, match="instance 1 has no pixels"):
        encode_annotation([np.ones((2, 2), bool), np.zeros((2, 2), bool)])


@pytest.mark.parametrize("text, problem", [
    ("[1, 2, 3]", "odd number"),
    ("[1, 2", "not a JSON list"),
    ('{"a": 1}', "list of integers"),
    ("[1.0, 2]", "list of integers"),
    ("[0, 2]", "outside"),
    ("[6, 2]", "outside"),
    ("[3, 1, 1, 1]", "not ascending"),
    ("[1, 3, 2, 1]", "overlaps"),
    ("[1, 0]", "length 0"),
    ("[1, -3]", "length -3"),
    ("[99999999999999999999999, 1]", r"run 0 \(start 9+, length 1\) lies outside"),
    ("[1, 1, 9223372036854775807, 2]", "run 1 .* lies outside"),      # int64 max: would wrap
    ("[-99999999999999999999999, 1]", "run 0 .* lies outside"),
    ("[1, " + "9" * 5000 + "]", "not a JSON list of integers"),      # past int()'s digit limit
    ("[" * 100_000, "not a JSON list"),                               # past the recursion limit
])
def test_malformed_instance(text, problem):
    with pytest.raises(RLEError, match=problem):
        decode_instance(text, (2, 3))


def test_malformed_annotation_names_the_instance():
    with pytest.raises(RLEError, match="instance 1: .*outside"):
        decode_annotation("[1, 1];[9, 1]", (2, 3))
    with pytest.raises(RLEError, match="empty annotation"):
        decode_annotation("  ", (2, 3))


def test_an_image_past_64_bit_pixel_indices_is_refused():
    with pytest.raises(RLEError, match="beyond 64-bit pixel indices"):
        decode_runs("[1, 1]", (2**40, 2**40))
