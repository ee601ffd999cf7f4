"""benchmarks/loader_throughput.py: a stopped run still reports and writes
what it measured, marked partial; the training run reuses one loader across
epochs and reports each; the normalise-in-the-workers variant it times makes
the batches the loader makes. Speed itself is the benchmark's output, not
asserted here."""
import json
import os
import signal

import pytest
import torch

from benchmarks import loader_throughput as bench
from engine import make_loader

TINY = ["--members", "highres_no_ela", "small_specialist", "--img-size", "32", "--batch-size", "2",
        "--batches", "2", "--workers", "0"]


def test_a_run_stopped_by_sigterm_prints_and_writes_what_it_measured(demo_store, tmp_path, monkeypatch,
                                                                     capsys):
    replaced = bench.measure_replaced
    calls = []

    def stopped_in_round_two(*args):
        calls.append(args)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return replaced(*args)

    # stopped in the second round, after its engine columns, before its replaced column
    monkeypatch.setattr(bench, "measure_replaced", stopped_in_round_two)
    out_json = tmp_path / "figures.json"
    before = signal.getsignal(signal.SIGTERM)
    code = bench.main(["--store", str(demo_store), *TINY, "--rounds", "2", "--train-epochs", "0",
                       "--json", str(out_json)])
    assert code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before
    figures = json.loads(out_json.read_text())
    assert figures["partial"] is True and figures["stopped"] == "SIGTERM"
    assert list(figures["members"]) == ["highres_no_ela"]   # the second member never started
    row = figures["members"]["highres_no_ela"]
    assert len(row["rounds"]["opencv"]) == 2 and len(row["rounds"]["replaced"]) == 1
    assert row["engine_samples_per_s"] == pytest.approx(sum(row["rounds"]["opencv"]) / 2)
    assert row["replaced_samples_per_s"] == row["rounds"]["replaced"][0] > 0
    assert "stage_ms" not in row and "training" not in row
    out = capsys.readouterr().out
    assert "PARTIAL (stopped: SIGTERM)" in out and "total wall time" in out
    assert any(line.startswith("highres_no_ela") and "opencv" in line for line in out.splitlines())
    assert not out_json.with_suffix(".png").exists()   # the chart needs every column


def test_training_reuses_one_loader_and_reports_each_epoch(demo_store, tmp_path, capsys):
    out_json = tmp_path / "figures.json"
    assert bench.main(["--store", str(demo_store), *TINY[:2], *TINY[3:], "--rounds", "1",
                       "--normalise-placement", "--train-epochs", "2", "--train-steps", "1",
                       "--train-img-size", "32", "--json", str(out_json)]) == 0
    figures = json.loads(out_json.read_text())
    assert figures["partial"] is False and out_json.with_suffix(".png").exists()
    row = figures["members"]["highres_no_ela"]
    training = row["training"]
    assert [e["epoch"] for e in training["epochs"]] == [1, 2]
    assert all(e["steps"] == 1 and 0 <= e["wait_seconds"] <= e["seconds"] for e in training["epochs"])
    assert training["steps"] == 1 and 0 <= training["data_wait_share"] <= 1   # epoch 2's
    assert set(row["normalise_in"]) == {"consumer", "workers"}
    out = capsys.readouterr().out
    assert "training epoch 1: 1 steps" in out and "training epoch 2: 1 steps" in out
    assert "in the reader workers (floats handed over)" in out


def test_normalising_in_the_workers_makes_the_loaders_batches(demo_store):
    kwargs = dict(batch_size=2, img_size=32, seed=4, workers=0)
    loader, stream = bench.engine_stream(demo_store, "comprehensive", bench.WORKER_FLOAT, **kwargs)
    try:
        ahead = [next(stream) for _ in range(len(loader))]   # into the second epoch
    finally:
        loader.close()
    reference = [batch for epoch in (0, 1) for batch in make_loader(demo_store, "comprehensive",
                                                                    epoch=epoch, **kwargs)]
    for got, want in zip(ahead, reference[1:]):
        assert torch.equal(got["index"], want["index"])
        torch.testing.assert_close(got["image"], want["image"])
        assert torch.equal(got["mask"], want["mask"])


@pytest.mark.parametrize("members, trained", [(["small_specialist", "highres_no_ela"], ["highres_no_ela"]),
                                              (["small_specialist"], ["small_specialist"])])
def test_the_default_training_run_is_the_reference_members(members, trained):
    assert bench.parse_args(["--members", *members]).train_members == trained
    assert bench.parse_args(["--train-members", "comprehensive"]).train_members == ["comprehensive"]


def test_the_training_wait_is_timed_with_the_trainers_own_step(demo_store, monkeypatch):
    # bf16, channels_last, fused AdamW on CUDA come with trainers/train.py's step and settings
    import trainers.training
    steps = []
    real = trainers.training.optimiser_step
    monkeypatch.setattr(trainers.training, "optimiser_step", lambda *a, **k: steps.append(a[-2]) or real(*a, **k))
    result = bench.measure_training_wait(demo_store, "highres_no_ela", 32, 2, 0, 1, 2, 0, torch.device("cpu"))
    assert result["steps"] == 2 and steps == [torch.device("cpu")] * 2
