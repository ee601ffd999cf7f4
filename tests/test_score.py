"""The competition's metric on hand-built cases, and every malformed-row error."""
import numpy as np
import pytest

from engine.store import instances_mask_path, open_store, read_meta
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
            layers = np.asarray(group[instances_mask_path(int(row))][...]).astype(bool)
            assert len(decoded) == len(layers)
            assert all(np.array_equal(d, m) for d, m in zip(decoded, layers))


def test_store_case_ids_tell_apart_an_authentic_and_a_forged_image_of_one_case():
    ids = store_case_ids(np.array(["a", "b", "a", "c"]), np.array([0, 1, 2, 3]))
    assert ids == ["a#0", "b", "a#2", "c"]
    assert store_case_ids(np.array(["a", "b", "a", "c"]), np.array([0, 1, 3])) == ["a", "b", "c"]
