"""The competition's metric on hand-built cases, and every malformed-row error."""
import re
import tracemalloc

import numpy as np
import pytest

from engine.reader import WindowReader
from engine.store import open_store, read_meta
from trainers import score as score_module
from trainers.rle import decode_annotation, encode_annotation, encode_instance
from trainers.score import (
    ScoreError, image_score, main, read_solution, score_files, split_rows, store_case_ids,
    write_solution,
)

SHAPE = (4, 5)


def region(*pixels):
    """A mask of SHAPE with the given column-major pixel indices (0-based) set."""
    flat = np.zeros(SHAPE[0] * SHAPE[1], bool)
    flat[list(pixels)] = True
    return flat.reshape(SHAPE[1], SHAPE[0]).T


A = region(0, 1, 2, 3)          # first column
B = region(12, 13)              # part of column 3


def write_csv(path, header, rows):
    path.write_text("\n".join([header] + [",".join(r) for r in rows]) + "\n")
    return path


def quoted(annotation):
    return '"' + annotation + '"'


def test_perfect_prediction_scores_one():
    assert image_score([A, B], [B, A]) == 1.0


def test_authentic_against_forged_scores_zero_and_authentic_pair_one():
    assert image_score([], [A]) == 0.0
    assert image_score([A], []) == 0.0
    assert image_score([], []) == 1.0


def test_one_prediction_against_two_true_instances():
    assert image_score([A, B], [A]) == pytest.approx(0.5)


def test_extra_predicted_instances_are_penalised():
    stray = region(19)
    assert image_score([A], [A, stray]) == pytest.approx(0.5)
    assert image_score([A], [A, stray, region(17)]) == pytest.approx(1 / 3)


def test_pixel_f1_of_a_partial_overlap():
    half = region(0, 1)           # 2 of A's 4 pixels: precision 1, recall 1/2
    assert image_score([A], [half]) == pytest.approx(2 / 3)


def test_matching_is_optimal_not_greedy():
    both = A | B                  # F1 with A 8/10, with B 4/8
    # Assigning `both` to A (0.8) would leave A's exact copy nothing; the
    # optimum gives A its exact copy (1.0) and `both` to B (0.5).
    assert image_score([A, B], [both, A]) == pytest.approx((1.0 + 0.5) / 2)


def test_file_score_matches_the_competitions_published_example(tmp_path):
    shape = '"[720, 960]"'
    solution = write_csv(tmp_path / "s.csv", "case_id,annotation,shape", [
        ["0", quoted("[101, 103]"), shape], ["1", quoted("[101, 102]"), shape],
        ["2", "authentic", shape], ["3", quoted("[101, 102];[300, 100]"), shape]])
    submission = write_csv(tmp_path / "p.csv", "case_id,annotation", [
        ["3", quoted("[101, 102]")], ["1", quoted("[101, 102]")],
        ["0", quoted("[101, 102]")], ["2", "authentic"]])
    expected = (2 * 102 / (103 + 102) + 1 + 1 + 0.5) / 4
    assert score_files(solution, submission) == pytest.approx(expected)


def test_cli_prints_the_score(tmp_path, capsys):
    shape = '"[4, 5]"'
    annotation = quoted(encode_annotation([A, B]))
    solution = write_csv(tmp_path / "s.csv", "case_id,annotation,shape",
                         [["x", annotation, shape], ["y", "authentic", shape]])
    submission = write_csv(tmp_path / "p.csv", "case_id,annotation",
                           [["x", quoted(encode_instance(A))], ["y", "authentic"]])
    assert main(["--solution", str(solution), "--submission", str(submission)]) == 0
    assert "score 0.750000" in capsys.readouterr().out


GOOD_SOLUTION = [["a", quoted("[1, 4]"), '"[4, 5]"'], ["b", "authentic", '"[4, 5]"']]


@pytest.mark.parametrize("rows, problem", [
    ([["a", "[1 4]"], ["b", "authentic"]], r"p.csv, line 2, case 'a': .*not a JSON list"),
    ([["a", quoted("[1, 4, 3, 1]")], ["b", "authentic"]], r"line 2, case 'a': .*overlaps"),
    ([["a", "authentic"], ["b", quoted("[9, 1, 3, 1]")]], r"line 3, case 'b': .*not ascending"),
    ([["a", quoted("[18, 4]")], ["b", "authentic"]], r"line 2, case 'a': .*outside"),
    ([["a", quoted("[1, 4]")], ["b", "authentic"], ["c", "authentic"]],
     r"line 4, case 'c': case not in the solution"),
    ([["a", quoted("[1, 4]")]], r"p.csv: no row for case 'b' \(solution .*s.csv, line 3\)"),
    ([["a", quoted("[1, 4]")], ["b", "authentic"], ["a", "authentic"]],
     r"line 4, case 'a': duplicate row \(first at line 2\)"),
    ([["a", ""], ["b", "authentic"]], r"line 2, case 'a': .*empty annotation"),
])
def test_malformed_submission_row_is_named(tmp_path, rows, problem):
    solution = write_csv(tmp_path / "s.csv", "case_id,annotation,shape", GOOD_SOLUTION)
    submission = write_csv(tmp_path / "p.csv", "case_id,annotation", rows)
    with pytest.raises(ScoreError, match=problem):
        score_files(solution, submission)


@pytest.mark.parametrize("rows, problem", [
    ([["a", quoted("[1, 4]"), '"[4]"']], r"s.csv, line 2, case 'a': shape '\[4\]'"),
    ([["a", quoted("[1, 4]"), "x"], ["a", "authentic", '"[4, 5]"']], r"line 2, case 'a': shape"),
    ([["a", quoted("[1, 4]"), '"[4, 5]"'], ["a", "authentic", '"[4, 5]"']],
     r"s.csv, line 3, case 'a': duplicate row"),
    ([["a", quoted("[1, 40]"), '"[4, 5]"']], r"s.csv, line 2, case 'a': .*outside"),
])
def test_malformed_solution_row_is_named(tmp_path, rows, problem):
    solution = write_csv(tmp_path / "s.csv", "case_id,annotation,shape", rows)
    submission = write_csv(tmp_path / "p.csv", "case_id,annotation", [["a", "authentic"]])
    with pytest.raises(ScoreError, match=problem):
        score_files(solution, submission)


def test_missing_column_and_missing_file(tmp_path):
    solution = write_csv(tmp_path / "s.csv", "case_id,annotation", [["a", "authentic"]])
    with pytest.raises(ScoreError, match=r"s.csv, line 1: .*lacks the column\(s\) \['shape'\]"):
        score_files(solution, solution)
    with pytest.raises(ScoreError, match="nothing.csv: no such file"):
        score_files(tmp_path / "nothing.csv", solution)


def test_solution_from_a_store_split_holds_its_instances(demo_store, tmp_path):
    path = tmp_path / "solution.csv"
    group = open_store(demo_store)
    meta = read_meta(group)
    rows = split_rows(meta, "val")
    assert write_solution(demo_store, path, "val") == len(rows)
    solution = read_solution(path)
    assert list(solution) == store_case_ids(meta["case_id"], rows)
    for row, truth in zip(rows, solution.values()):
        assert truth.shape == (meta["height"][row], meta["width"][row])
        decoded = decode_annotation(truth.annotation, truth.shape)
        if meta["label"][row] == 0:
            assert decoded == []
        else:
            # the reader's instance layers equal zarr-python's reads of the tiles (test_reader.py)
            layers = np.asarray(WindowReader(group).read_instances(int(row))).astype(bool)
            assert len(decoded) == len(layers)
            assert all(np.array_equal(d, m) for d, m in zip(decoded, layers))


def test_store_case_ids_tell_apart_an_authentic_and_a_forged_image_of_one_case():
    ids = store_case_ids(np.array(["a", "b", "a", "c"]), np.array([0, 1, 2, 3]))
    assert ids == ["a#0", "b", "a#2", "c"]
    assert store_case_ids(np.array(["a", "b", "a", "c"]), np.array([0, 1, 3])) == ["a", "b", "c"]


def test_thousands_of_instances_on_a_large_image_score_in_little_memory(tmp_path):
    # 3000 one-pixel instances on 3000 x 3000: one dense mask per instance
    # would take 27 GB. Every other prediction adds a neighbouring pixel:
    # F1 2 x 1 / (1 + 2) = 2/3 there, 1 elsewhere, so the mean is 5/6.
    pixels = np.arange(3000) * 2999 + 1
    truth = ";".join(f"[{p}, 1]" for p in pixels)
    guess = ";".join(f"[{p}, {1 + k % 2}]" for k, p in enumerate(pixels))
    solution = write_csv(tmp_path / "s.csv", "case_id,annotation,shape",
                         [["a", quoted(truth), '"[3000, 3000]"']])
    submission = write_csv(tmp_path / "p.csv", "case_id,annotation", [["a", quoted(guess)]])
    tracemalloc.start()
    try:
        score = score_files(solution, submission)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert score == pytest.approx(5 / 6)
    assert peak < 300e6


def test_annotations_longer_than_csvs_default_field_limit(tmp_path):
    # A 300 x 300 checkerboard: 45000 runs, over 400k characters.
    mask = np.add.outer(np.arange(300), np.arange(300)) % 2 == 0
    annotation = encode_annotation([mask])
    assert len(annotation) > 131_072
    solution = write_csv(tmp_path / "s.csv", "case_id,annotation,shape",
                         [["a", quoted(annotation), '"[300, 300]"']])
    # The left half: 2 x 22500 / (45000 + 22500) = 2/3.
    half = mask.copy()
    half[:, 150:] = False
    submission = write_csv(tmp_path / "p.csv", "case_id,annotation",
                           [["a", quoted(encode_instance(half))]])
    assert score_files(solution, submission) == pytest.approx(2 / 3)


def test_a_byte_order_mark_is_accepted(tmp_path):
    solution = write_csv(tmp_path / "s.csv", "case_id,annotation,shape", GOOD_SOLUTION)
    submission = tmp_path / "p.csv"
    submission.write_bytes(b'\xef\xbb\xbfcase_id,annotation\na,"[1, 4]"\nb,authentic\n')
    assert score_files(solution, submission) == 1.0


@pytest.mark.parametrize("content, problem", [
    (b'case_id,annotation\na,"[1, 4]"\nb\xe9,authentic\n',
     r"p.csv, line 3, case 'b\ufffd': byte 0xe9 is not UTF-8"),
    (b'case_id,annotation\na,"[99999999999999999999999999, 1]"\nb,authentic\n',
     r"p.csv, line 2, case 'a': instance 0: run 0 \(start 9+, length 1\) lies outside"),
    (b'case_id,annotation\na,"[9223372036854775807, 2]"\nb,authentic\n',   # int64 max
     r"line 2, case 'a': instance 0: run 0 .* lies outside the image's 20 pixels"),
    (b'case_id,annotation\na,"[1, ' + b"9" * 5000 + b']"\nb,authentic\n',
     r"line 2, case 'a': instance 0: not a JSON list of integers"),
])
def test_undecodable_or_out_of_range_rows_are_named(tmp_path, capsys, content, problem):
    solution = write_csv(tmp_path / "s.csv", "case_id,annotation,shape", GOOD_SOLUTION)
    submission = tmp_path / "p.csv"
    submission.write_bytes(content)
    with pytest.raises(ScoreError, match=problem):
        score_files(solution, submission)
    assert main(["--solution", str(solution), "--submission", str(submission)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and re.search(problem, err)


def test_a_failed_solution_write_leaves_the_old_file(demo_store, tmp_path, monkeypatch):
    path = tmp_path / "solution.csv"
    path.write_text("old\n")
    calls = []

    def fail_on_the_second_row(group, row):
        calls.append(row)
        if len(calls) == 2:
            raise OSError("disk full")
        return []

    monkeypatch.setattr(score_module, "true_instances", fail_on_the_second_row)
    with pytest.raises(OSError, match="disk full"):
        write_solution(demo_store, path, "val")
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["solution.csv"]
    assert main(["--write-solution", str(tmp_path), "--store", str(demo_store)]) == 2


def test_thirty_thousand_one_pixel_instances_score_in_memory_of_the_file(tmp_path):
    # 30000 one-pixel instances on every third pixel of 300 x 300: a dense
    # (prediction x truth) matrix would take 7.2 GB. A perfect prediction
    # scores 1; moving every other predicted pixel onto its free neighbour
    # leaves 15000 exact matches and 15000 instances that overlap nothing:
    # 15000 / max(30000, 30000) = 1/2.
    pixels = np.arange(30000) * 3 + 1
    truth = ";".join(f"[{p}, 1]" for p in pixels)
    shifted = ";".join(f"[{p + k % 2}, 1]" for k, p in enumerate(pixels))
    solution = write_csv(tmp_path / "s.csv", "case_id,annotation,shape",
                         [["a", quoted(truth), '"[300, 300]"']])
    perfect = write_csv(tmp_path / "p.csv", "case_id,annotation", [["a", quoted(truth)]])
    half = write_csv(tmp_path / "h.csv", "case_id,annotation", [["a", quoted(shifted)]])
    tracemalloc.start()
    try:
        scores = score_files(solution, perfect), score_files(solution, half)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert scores == (1.0, pytest.approx(1 / 2))
    assert peak < 300e6


def test_matching_by_overlap_components_equals_one_matching_over_all_pairs():
    # Random overlapping instances, so components hold several pairs: the
    # score equals the Hungarian matching over the full dense F1 matrix.
    from scipy.optimize import linear_sum_assignment
    rng = np.random.default_rng(0)
    for _ in range(50):
        true = [m for m in rng.random((rng.integers(1, 6), 6, 6)) < 0.15 if m.any()]
        pred = [m for m in rng.random((rng.integers(1, 6), 6, 6)) < 0.15 if m.any()]
        if not (true and pred):
            continue
        tp = np.array([[np.sum(p & t) for t in true] for p in pred])
        f1 = 2 * tp / (np.sum(pred, axis=(1, 2))[:, None] + np.sum(true, axis=(1, 2))[None])
        best = f1[linear_sum_assignment(f1, maximize=True)].sum() / max(len(pred), len(true))
        assert image_score(true, pred) == pytest.approx(best)
