"""The competition's metric, and solution files made from a store split.

    python trainers/score.py --solution S.csv --submission P.csv
    python trainers/score.py --write-solution S.csv --store data/store.zarr [--split val]

Per image: 1 when truth and prediction are both `authentic`, 0 when only one
of them is; otherwise the pixel F1 of every (predicted, true) instance pair,
matched one to one by the Hungarian method, summed and divided by
max(n_pred, n_true). That equals the competition's "mean matched F1 x
n_true / max(n_pred, n_true)": its matrix is padded with zero rows up to
n_true, so its mean runs over n_true pairs. The score is the mean over images.

Instances are scored as runs (trainers/rle.py), never as one H x W array
each: memory grows with the annotations' length and the overlapping pairs,
so 3000 one-pixel instances on a 3000 x 3000 image take megabytes.

A solution file has `case_id,annotation,shape` (shape a JSON list [H, W]); a
submission has `case_id,annotation`. Both are UTF-8 (a byte-order mark is
allowed) and fields may be of any length. Every row is checked, and a bad one
(not UTF-8, too few fields, a malformed or out-of-range run...) stops the run with
its file, line and case id; the CLI then prints `error: ...` and exits 2.
Solution files are written whole or not at all (common/atomic.py).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import sparse
from scipy.optimize import linear_sum_assignment
from scipy.sparse.csgraph import connected_components

from engine.reader import WindowReader
from engine import storage as storages
from engine.store import SPLITS
from engine.store import StoreError, open_store, read_meta
from common.atomic import atomic_open
from common.help_format import HelpFormatter
from trainers.rle import (SUBMISSION_COLUMNS, RLEError, decode_annotation_runs, encode_annotation,
                          mask_runs)

SOLUTION_COLUMNS = ("case_id", "annotation", "shape")
# A fragmented mask's annotation is far longer than csv's default field limit
# of 131,072 characters (a 1500 x 1500 one reaches 560k); 2**31 - 1 is the
# largest limit every platform's C long holds.
CSV_FIELD_LIMIT = 2**31 - 1


class ScoreError(ValueError):
    """A solution or submission file that cannot be scored."""


@dataclass(frozen=True)
class Row:
    annotation: str
    line: int
    shape: tuple[int, int] | None = None   # solution rows only


def _where(path: Path, line: int, case_id: str) -> str:
    return f"{path}, line {line}, case {case_id!r}"


def _parse_shape(text: str, where: str) -> tuple[int, int]:
    try:
        shape = json.loads(text)
    except (ValueError, RecursionError):   # not JSON, an integer of over 4300 digits, deep nesting
        shape = None
    if not (isinstance(shape, list) and len(shape) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)):
        raise ScoreError(f"{where}: shape {text!r} is not a JSON list [height, width] "
                         "of positive integers")
    return shape[0], shape[1]


def _encoding_problem(fields: list[str]) -> str | None:
    """What is wrong with fields decoded with surrogateescape, if a byte was not UTF-8."""
    for value in fields:
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                byte = value[exc.start].encode("utf-8", "surrogateescape")[0]
                return f"byte {byte:#04x} is not UTF-8; save the file as UTF-8"
    return None


def _printable(text: str) -> str:
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _parse_rows(path: Path, reader, columns: tuple[str, ...]) -> dict[str, Row]:
    header = next(reader, None)
    if header is None:
        raise ScoreError(f"{path}: empty file; expected the header {','.join(columns)}")
    if problem := _encoding_problem(header):
        raise ScoreError(f"{path}, line 1: {problem}")
    missing = [c for c in columns if c not in header]
    if missing:
        raise ScoreError(f"{path}, line 1: header {header} lacks the "
                         f"column(s) {missing}; expected {','.join(columns)}")
    index = {c: header.index(c) for c in columns}
    rows: dict[str, Row] = {}
    for fields in reader:
        if not fields:
            continue                    # a blank line
        line = reader.line_num
        case_id = fields[index["case_id"]].strip() if len(fields) > index["case_id"] else ""
        where = _where(path, line, _printable(case_id))
        if problem := _encoding_problem(fields):
            raise ScoreError(f"{where}: {problem}")
        if len(fields) <= max(index.values()):
            raise ScoreError(f"{where}: fewer fields than the header's {len(columns)}")
        if not case_id:
            raise ScoreError(f"{where}: empty case_id")
        if case_id in rows:
            raise ScoreError(f"{where}: duplicate row (first at line {rows[case_id].line})")
        shape = _parse_shape(fields[index["shape"]], where) if "shape" in index else None
        rows[case_id] = Row(fields[index["annotation"]].strip(), line, shape)
    return rows


def _read_rows(path: Path, columns: tuple[str, ...]) -> dict[str, Row]:
    path = Path(path)
    if not path.is_file():
        raise ScoreError(f"{path}: no such file")
    previous_limit = csv.field_size_limit(CSV_FIELD_LIMIT)
    # utf-8-sig: a leading byte-order mark is dropped. surrogateescape: a byte
    # that is not UTF-8 reaches its row, which is then named in the error.
    try:
        with path.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as handle:
            return _parse_rows(path, csv.reader(handle), columns)
    finally:
        csv.field_size_limit(previous_limit)


def read_solution(path: str | Path) -> dict[str, Row]:
    return _read_rows(Path(path), SOLUTION_COLUMNS)


def read_submission(path: str | Path) -> dict[str, Row]:
    return _read_rows(Path(path), SUBMISSION_COLUMNS)


def _segment_incidence(instances: list[np.ndarray], cuts: np.ndarray,
                       weights: np.ndarray | None = None) -> sparse.csr_matrix:
    """(instances, segments) sparse: which segments between consecutive cuts
    each instance covers (every run boundary is a cut, so coverage is whole),
    with the segment's weight, or 1."""
    runs = np.concatenate(instances)
    owner = np.repeat(np.arange(len(instances)), [len(r) for r in instances])
    first, stop = np.searchsorted(cuts, runs[:, 0]), np.searchsorted(cuts, runs[:, 1])
    count = stop - first
    # Each run's segment indices first..stop-1, all runs' concatenated.
    segment = np.arange(count.sum()) + np.repeat(first - (np.cumsum(count) - count), count)
    values = np.ones(len(segment)) if weights is None else weights[segment]
    return sparse.csr_matrix((values, (np.repeat(owner, count), segment)),
                             shape=(len(instances), len(cuts) - 1))


def _overlaps(pred: list[np.ndarray], true: list[np.ndarray]) -> sparse.coo_matrix:
    """(n_pred, n_true) sparse shared-pixel counts of instances given as runs."""
    cuts = np.unique(np.concatenate([runs.ravel() for runs in pred + true]))
    if len(cuts) < 2:                   # no instance has a pixel
        return sparse.coo_matrix((len(pred), len(true)))
    covered_pixels = _segment_incidence(pred, cuts, np.diff(cuts).astype(np.float64))
    return (covered_pixels @ _segment_incidence(true, cuts).T).tocoo()


def _matched_f1(overlap: sparse.coo_matrix, pred_area: np.ndarray,
                true_area: np.ndarray) -> float:
    """The F1 sum of the best one-to-one matching of overlapping instances.

    Pairs without overlap score 0, so a matching gains nothing from them and
    the matching splits into the connected components of the overlap graph,
    each solved alone: memory and time follow the overlapping pairs, never
    n_pred x n_true (30000 one-pixel instances would need 7.2 GB at once)."""
    # 2 tp / (2 tp + fp + fn) of every overlapping pair.
    f1 = 2 * overlap.data / (pred_area[overlap.row] + true_area[overlap.col])
    n_pred, n_true = overlap.shape
    graph = sparse.coo_matrix((np.ones(overlap.nnz), (overlap.row, n_pred + overlap.col)),
                              shape=(n_pred + n_true,) * 2)
    _, component = connected_components(graph, directed=False)
    edge_component = component[overlap.row]
    edges_per_component = np.bincount(edge_component)
    # A component of one edge is one pair, matched to each other: most of a
    # large image's instances, summed at once instead of solved one by one.
    alone = edges_per_component[edge_component] == 1
    total = float(f1[alone].sum())
    shared = np.flatnonzero(~alone)
    shared = shared[np.argsort(edge_component[shared], kind="stable")]
    for edges in np.split(shared, np.flatnonzero(np.diff(edge_component[shared])) + 1):
        if not len(edges):
            continue
        rows, row = np.unique(overlap.row[edges], return_inverse=True)
        cols, col = np.unique(overlap.col[edges], return_inverse=True)
        block = np.zeros((len(rows), len(cols)))
        block[row, col] = f1[edges]
        total += float(block[linear_sum_assignment(block, maximize=True)].sum())
    return total


def runs_score(true: list[np.ndarray], pred: list[np.ndarray]) -> float:
    """One image's score from its true and predicted instances as runs
    (trainers/rle.py; [] = authentic). Memory grows with the runs and the
    overlapping pairs, never with the image: pixel overlaps are a sparse
    product over the segments that the runs' boundaries cut, and only
    instances that overlap one another are matched together."""
    if not true or not pred:
        return float(not true and not pred)
    overlap = _overlaps(pred, true)
    if not overlap.nnz:
        return 0.0
    pred_area = np.array([np.sum(r[:, 1] - r[:, 0]) for r in pred], np.float64)
    true_area = np.array([np.sum(r[:, 1] - r[:, 0]) for r in true], np.float64)
    return _matched_f1(overlap, pred_area, true_area) / max(len(pred), len(true))


def image_score(true: list[np.ndarray], pred: list[np.ndarray]) -> float:
    """One image's score from its true and predicted instance masks ([] = authentic)."""
    return runs_score([mask_runs(m) for m in true], [mask_runs(m) for m in pred])


def per_image_scores(solution: dict[str, Row], submission: dict[str, Row],
                     solution_path: Path | str = "solution",
                     submission_path: Path | str = "submission") -> dict[str, float]:
    """Every solution case's score; raises ScoreError for unknown, missing or bad rows."""
    for case_id, row in submission.items():
        if case_id not in solution:
            raise ScoreError(f"{_where(submission_path, row.line, case_id)}: "
                             f"case not in the solution {solution_path}")
    scores = {}
    for case_id, truth in solution.items():
        if case_id not in submission:
            raise ScoreError(f"{submission_path}: no row for case {case_id!r} "
                             f"(solution {solution_path}, line {truth.line})")
        guess = submission[case_id]
        try:
            true = decode_annotation_runs(truth.annotation, truth.shape)
        except RLEError as exc:
            raise ScoreError(f"{_where(solution_path, truth.line, case_id)}: {exc}") from None
        try:
            pred = decode_annotation_runs(guess.annotation, truth.shape)
        except RLEError as exc:
            raise ScoreError(f"{_where(submission_path, guess.line, case_id)}: {exc}") from None
        scores[case_id] = runs_score(true, pred)
    return scores


def score_files(solution_path: str | Path, submission_path: str | Path) -> float:
    """The competition score of a submission file against a solution file."""
    solution = read_solution(solution_path)
    if not solution:
        raise ScoreError(f"{solution_path}: no rows to score")
    scores = per_image_scores(solution, read_submission(submission_path),
                              solution_path, submission_path)
    return float(np.mean(list(scores.values())))


def store_case_ids(case_ids: np.ndarray, rows: np.ndarray) -> list[str]:
    """Unique CSV ids for store rows: the case id, or `<case id>#<row>` where an
    authentic and a forged image share it (one CSV row per image)."""
    names = [str(case_ids[r]) for r in rows]
    counts = {n: names.count(n) for n in set(names)}
    return [n if counts[n] == 1 else f"{n}#{r}" for n, r in zip(names, rows)]


def split_rows(meta: dict[str, np.ndarray], split: str) -> np.ndarray:
    """Rows of meta/ in a split ("train", "val" or "all")."""
    if split == "all":
        return np.arange(len(meta["split"]))
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {[*SPLITS, 'all']}")
    return np.flatnonzero(meta["split"] == SPLITS[split])


def true_instances(reader: WindowReader, row: int) -> list[np.ndarray]:
    """A store row's forged regions at original size ([] for authentic),
    read by `reader` (one per store: it keeps the shard indexes it read);
    empty layers are left out, since an instance without pixels is not one."""
    layers = reader.read_instances(row)   # refuses missing or corrupt chunks
    return [layer.astype(bool) for layer in layers if layer.any()]


def open_split(store: str | Path, split: str, storage: storages.StorageSettings | None = None):
    """(group, meta, rows) of a store split; an empty split is a StoreError."""
    group = open_store(store, storage=storage)
    meta = read_meta(group)
    rows = split_rows(meta, split)
    if not len(rows):
        raise StoreError(f"{store}: the {split} split has no images")
    return group, meta, rows


def write_solution(store: str | Path, path: str | Path, split: str = "val",
                   storage: storages.StorageSettings | None = None) -> int:
    """Write the solution CSV of a store split; returns the number of rows."""
    group, meta, rows = open_split(store, split, storage)
    reader = WindowReader(group, storage=storage)
    with atomic_open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(SOLUTION_COLUMNS)
        for case_id, row in zip(store_case_ids(meta["case_id"], rows), rows):
            shape = (int(meta["height"][row]), int(meta["width"][row]))
            annotation = encode_annotation(true_instances(reader, int(row)))
            writer.writerow([case_id, annotation, json.dumps(list(shape))])
    return len(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--solution", type=Path, help="solution CSV: case_id,annotation,shape")
    parser.add_argument("--submission", type=Path, help="submission CSV: case_id,annotation")
    parser.add_argument("--write-solution", type=Path, metavar="CSV",
                        help="instead of scoring, write the solution CSV of --store's --split")
    parser.add_argument("--store", type=storages.location,
                        help="store to write the solution from (a path or a URL)")
    parser.add_argument("--split", default="val", choices=[*SPLITS, "all"],
                        help="with --write-solution: which rows of --store")
    storages.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        if args.write_solution:
            if not args.store:
                parser.error("--write-solution needs --store")
            n = write_solution(args.store, args.write_solution, args.split,
                               storages.StorageSettings.from_args(args))
            print(f"wrote {n} rows to {args.write_solution}")
            return 0
        if not (args.solution and args.submission):
            parser.error("give --solution and --submission (or --write-solution with --store)")
        print(f"score {score_files(args.solution, args.submission):.6f}")
    except (ScoreError, StoreError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
