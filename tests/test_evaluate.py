"""The evaluation and throughput charts (labelled bars, zeros shown, each
metric's direction) and the --help of evaluate, score and the benchmarks
(every default shown, --device a checked choice)."""
import argparse
import re

import cv2
import numpy as np
import pytest

from benchmarks import build_throughput, layout_sweep, loader_throughput, sampling_throughput
from preprocess import build_zarr
from tests.test_predict import sure_member
from trainers import evaluate as evaluate_cli
from trainers import score as score_cli
from trainers.ensemble import PostProcess
from benchmarks import gpu_check
from trainers import export as export_cli
from trainers import predict as predict_cli
from trainers import run_ensemble as run_ensemble_cli
from trainers import train as train_cli
from common.help_format import HelpFormatter

SHAPE = (4, 4)


def mask(*pixels):
    out = np.zeros(SHAPE, bool)
    out.flat[list(pixels)] = True
    return out


FORGERY = mask(0, 1, 4, 5)


def report(tiny_found: bool, authentic_flagged: bool) -> evaluate_cli.Report:
    """Two authentic images, two tiny, one small, one large (missed), one
    xlarge; no medium image."""
    out = evaluate_cli.Report()
    out.add([], [mask(15)] if authentic_flagged else [], 0, SHAPE)
    out.add([], [], 0, SHAPE)
    out.add([FORGERY], [mask(0)] if tiny_found else [], 1, SHAPE)
    out.add([FORGERY], [], 1, SHAPE)
    out.add([FORGERY], [FORGERY], 2, SHAPE)
    out.add([FORGERY], [mask(15)], 4, SHAPE)
    out.add([FORGERY], [FORGERY], 5, SHAPE)
    return out


def test_evaluation_chart_labels_every_bar_and_splits_the_directions(tmp_path):
    reports = {evaluate_cli.FULL: report(True, True),
               evaluate_cli.WITHOUT_SPECIALIST: report(False, False)}
    path = tmp_path / "evaluation.png"
    fig = evaluate_cli.draw(reports, path, "val split")
    assert cv2.imread(str(path)) is not None
    higher, lower = fig.axes
    assert "higher is better" in higher.get_title().lower()
    assert "lower is better" in lower.get_title().lower()
    assert all(ax.get_xlabel() and ax.get_ylabel() for ax in fig.axes)

    def labels(ax, name):
        """Bar labels of one variant: each variant's bars are labelled in turn."""
        texts = [t.get_text() for t in ax.texts]
        half = len(texts) // 2
        return texts[:half] if name == evaluate_cli.FULL else texts[half:]

    # score, recall tiny/small/medium/large/xlarge, Dice, MCC: the missed large
    # image is a labelled 0, the class without images "n/a"
    full = reports[evaluate_cli.FULL]
    dice, mcc = (full.pixel_metrics()[k] for k in ("pooled_dice", "pooled_mcc"))
    assert labels(higher, evaluate_cli.FULL) == [
        f"{full.score():.2f}", "0.50", "1.00", "n/a", "0.00", "1.00", f"{dice:.2f}", f"{mcc:.2f}"]
    assert labels(higher, evaluate_cli.WITHOUT_SPECIALIST)[1] == "0.00"     # tiny: both shown
    assert [t.get_text() for t in lower.texts] == ["0.50", "0.00"]          # zero FP shown
    ticks = [t.get_text() for ax in fig.axes for t in ax.get_xticklabels()]
    assert "Recall: medium\n2-5 % area\n0 images" in ticks
    assert not any("_" in tick for tick in ticks)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == [evaluate_cli.FULL, evaluate_cli.WITHOUT_SPECIALIST]


def test_negative_mcc_stays_inside_the_panel(tmp_path):
    truth = np.zeros(SHAPE, bool)
    truth[:2] = True
    worst = evaluate_cli.Report()
    worst.add([truth], [~truth], 3, SHAPE)        # every pixel wrong: MCC -1
    higher, _ = evaluate_cli.draw({evaluate_cli.FULL: worst}, tmp_path / "e.png").axes
    assert higher.texts[-1].get_text() == "-1.00"
    assert higher.get_ylim()[0] < -1


def test_evaluate_writes_the_chart_with_its_setting(demo_store, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(evaluate_cli, "ensemble_from_args",
                        lambda args: (PostProcess(0.5, 0), sure_member()))
    drawn, draw = {}, evaluate_cli.draw
    monkeypatch.setattr(evaluate_cli, "draw", lambda *a: drawn.update(fig=draw(*a)))
    assert evaluate_cli.main(["--store", str(demo_store), "--out", str(tmp_path)]) == 0
    assert cv2.imread(str(tmp_path / "evaluation.png")) is not None
    grid = cv2.imread(str(tmp_path / "predictions.png"))
    assert grid.shape[1] == evaluate_cli.GRID_COLUMNS * evaluate_cli.TILE
    fig = drawn["fig"]
    assert fig.get_suptitle() == (f"val split of {demo_store}; specialist view tiled; "
                                  "threshold 0.5, min area 0 px at 512")
    assert capsys.readouterr().out.startswith(fig.get_suptitle() + "; members: ")
    # every pixel forged: each authentic image is a false positive
    assert [t.get_text() for t in fig.axes[1].texts] == ["1.00"]


RESULTS = {"img_size": 512, "workers": 2, "device": "cpu", "members": {
    name: {"backend": "opencv", "engine_samples_per_s": engine,
           "backend_samples_per_s": {"opencv": engine, "dali": 68.2},
           "replaced_samples_per_s": 41.0, "read_limit_samples_per_s": 410.7,
           "engine_over_replaced": engine / 41.0,
           "stage_ms": {"read": 3.1, "resize": 1.2, "photometric": 2.4, "geometric": 1.8,
                        "normalise": 0.2}}
    for name, engine in (("small_specialist", 203.4), ("highres_no_ela", 190.0))}}


def test_throughput_chart_labels_every_bar_and_the_ratio(tmp_path):
    path = tmp_path / "throughput.png"
    fig = loader_throughput.draw_chart(RESULTS, path)
    assert cv2.imread(str(path)) is not None
    rates, stages = fig.axes
    texts = [t.get_text() for t in rates.texts]
    for value in ("203", "190", "68", "41", "411"):   # samples/s of every bar
        assert value in texts
    assert "engine (opencv):\n5.0x the replaced loader" in texts
    assert "engine (opencv):\n4.6x the replaced loader" in texts
    legend = [t.get_text() for t in rates.get_legend().get_texts()]
    assert any("opencv backend" in name for name in legend)
    assert any("dali backend" in name for name in legend)
    stage_ms = ["3.1", "1.2", "2.4", "1.8", "0.2"] * 2          # both members' stages
    assert sorted(t.get_text() for t in stages.texts) == sorted(stage_ms)
    assert all(ax.get_xlabel() and ax.get_ylabel() for ax in fig.axes)


def test_help_formatter_appends_defaults_only_where_missing():
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter)
    parser.add_argument("--bare", type=int, default=4)
    parser.add_argument("--stated", default="x", help="a thing (default x)")
    parser.add_argument("--zero", type=int, default=0, help="a count")
    parser.add_argument("--percent", default="5%", help="a share")
    parser.add_argument("--many", nargs="+", default=[1, 2], help="sizes")
    parser.add_argument("--flag", action="store_true", help="a switch")
    parser.add_argument("--unset", help="optional")
    text = " ".join(parser.format_help().split())
    for shown in ("--bare BARE (default: 4)", "a thing (default x) --zero",
                  "a count (default: 0)", "a share (default: 5%)", "sizes (default: 1 2)",
                  "a switch --unset", "optional"):
        assert shown in text
    assert text.endswith("optional")
    assert parser.get_default("bare") == 4 and parser._actions[1].help is None


class Captured(Exception):
    pass


def parser_of(main, argv, monkeypatch) -> argparse.ArgumentParser:
    """The parser a CLI builds, stopped before it parses anything."""
    def capture(self, args=None, namespace=None):
        raise Captured(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(Captured) as caught:
        main(argv)
    return caught.value.args[0]


def option_blocks(help_text: str) -> dict[str, str]:
    """Each option's lines of --help, keyed by its first option string."""
    section = help_text.split("\noptions:\n", 1)[1].split("\n\n", 1)[0]
    blocks = {}
    for line in section.splitlines():
        if re.match(r"  -", line):
            key = line.split()[0].rstrip(",")
            blocks[key] = line
        else:
            blocks[key] += " " + line
    return {key: " ".join(block.split()) for key, block in blocks.items()}


@pytest.mark.parametrize("main", [evaluate_cli.parse_args, score_cli.main,
                                  loader_throughput.parse_args, build_throughput.main,
                                  sampling_throughput.main, train_cli.parse_args,
                                  run_ensemble_cli.parse_args, predict_cli.parse_args,
                                  export_cli.main, gpu_check.main, build_zarr.main,
                                  layout_sweep.main])
def test_help_shows_every_default(main, monkeypatch):
    parser = parser_of(main, ["--help"], monkeypatch)
    blocks = option_blocks(parser.format_help())
    checked = 0
    for action in parser._actions:
        if (not action.option_strings or action.default in (None, argparse.SUPPRESS)
                or action.default is False):
            continue
        block = blocks[action.option_strings[0]]
        assert "default" in block, f"{action.option_strings[0]}: {block}"
        if "default" not in (action.help or ""):
            value = action.default
            value = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
            assert f"(default: {value})" in block
        checked += 1
    assert checked > 0


def test_loader_benchmark_device_is_a_checked_choice(capsys):
    with pytest.raises(SystemExit) as status:
        loader_throughput.parse_args(["--device", "gpu"])
    assert status.value.code == 2
    assert "argument --device: invalid choice: 'gpu'" in capsys.readouterr().err
    assert loader_throughput.parse_args(["--device", "cuda"]).device == "cuda"


def test_prediction_grid_shows_the_worst_first(tmp_path):
    """Tiles in rows of GRID_COLUMNS, lowest score first; of equal scores the
    larger forgery first; only the `limit` worst are drawn."""
    def shown(case_id, score, side):
        image = np.full((300, 200, 3), 90, np.uint8)
        true = np.zeros((300, 200), np.uint8)
        true[10:10 + side, 10:10 + side] = 1
        return evaluate_cli.Shown.of(case_id, score, image, {evaluate_cli.TRUE: [true],
                                                             evaluate_cli.FULL: [true[::-1]]})
    items = [shown("good", 0.9, 50), shown("small_miss", 0.0, 20), shown("half", 0.5, 50),
             shown("big_miss", 0.0, 120), shown("fine", 0.8, 50), shown("perfect", 1.0, 50)]
    path = tmp_path / "predictions.png"
    order = evaluate_cli.draw_predictions(items, path, limit=5)
    assert order == ["big_miss", "small_miss", "half", "fine", "good"]
    grid = cv2.imread(str(path))
    tile_height = evaluate_cli.TILE + evaluate_cli.LABEL_HEIGHT
    assert grid.shape == (2 * tile_height, evaluate_cli.GRID_COLUMNS * evaluate_cli.TILE, 3)
    # the first tile holds the big miss's green (true) outline, the sixth place is empty
    first = grid[:tile_height, :evaluate_cli.TILE]
    assert ((first[..., 1] == 200) & (first[..., 2] == 0)).any()
    assert (grid[tile_height:, evaluate_cli.TILE:2 * evaluate_cli.TILE] == 255).all()
