"""Budgets: a real tiny fine-tune under `vramtop run --budget`, `vramtop report --budget`, `estimate --budget`."""

from __future__ import annotations

import json
import sqlite3
import sys

from alarm_helpers import record_job, vramtop

from vramtop.budget import EXIT_OVER_BUDGET
from vramtop.cli import main
from vramtop_agent.schema import BLOCK_KEYS

JOB = ("--steps", "8", "--batch", "2", "--seq-len", "32")


def _recorded_peaks(path: str) -> dict:
    """The recording's own numbers, read with sqlite3 (the oracle for the verdict)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        peak = max(db.execute("SELECT max(peak) FROM steps").fetchone()[0],
                   db.execute("SELECT max(total) FROM samples").fetchone()[0])
        blocks = {k: max(db.execute(f"SELECT max(peak_{k}) FROM steps").fetchone()[0] or 0,
                         db.execute(f"SELECT max({k}) FROM samples").fetchone()[0] or 0) for k in BLOCK_KEYS}
    finally:
        db.close()
    return {"peak": peak, "blocks": blocks}


def test_run_within_and_over_budget(tmp_path):
    # Within: a budget far above the peak -> the job's status (0), one "within budget" line.
    rec_ok, verdict_ok = str(tmp_path / "ok.vramtop"), str(tmp_path / "ok.json")
    proc = record_job(rec_ok, *JOB, extra=("--budget", "rtx4090", "--verdict", verdict_ok))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "within budget" in proc.stderr
    v = json.loads(open(verdict_ok).read())
    truth = _recorded_peaks(rec_ok)
    (measured,) = v["measured"].values()
    assert v["ok"] and v["breaches"] == [] and v["budget"]["total"] == 24564 << 20
    assert measured["device"]["bytes"] == truth["peak"]  # CPU: the device measure is the tracked peak
    assert {k: measured["blocks"][k]["bytes"] for k in BLOCK_KEYS} == truth["blocks"]

    # Over: half the measured peak, and activations over 1 KiB -> exit 3, a line per breach, the verdict.
    rec, verdict = str(tmp_path / "over.vramtop"), str(tmp_path / "over.json")
    half = truth["peak"] // 2
    proc = record_job(rec, *JOB, extra=("--budget", str(half), "--budget-block", "activations=1KiB",
                                        "--verdict", verdict))
    assert proc.returncode == EXIT_OVER_BUDGET, proc.stderr[-2000:]
    assert EXIT_OVER_BUDGET != 2
    v = json.loads(open(verdict).read())
    truth = _recorded_peaks(rec)
    lines = [ln for ln in proc.stderr.splitlines() if "over budget" in ln]
    assert len(lines) == 2 == len(v["breaches"])
    dev, act = v["breaches"]
    assert dev["what"] == "device" and dev["bytes"] == truth["peak"] and dev["over"] == truth["peak"] - half
    assert act["what"] == "activations" and act["bytes"] == truth["blocks"]["activations"]
    assert f"step {dev['step']}, {dev['phase']}" in lines[0] and lines[0].startswith("vramtop: over budget: device")
    assert f"step {act['step']}, {act['phase']}" in lines[1] and "activations peaked at" in lines[1]

    # The same verdict from the recording afterwards.
    code = main(["report", rec, "--budget", str(half), "--budget-block", "activations=1KiB",
                 "--verdict", str(tmp_path / "again.json")])
    assert code == EXIT_OVER_BUDGET
    again = json.loads(open(tmp_path / "again.json").read())
    assert again["breaches"] == v["breaches"]
    assert main(["report", rec, "--budget", "rtx4090"]) == 0


def test_a_failing_job_keeps_its_status_and_no_training_means_nothing_measured(tmp_path):
    proc = vramtop("run", "--no-tui", "--budget", "1KiB", "--verdict", str(tmp_path / "v.json"), "--",
                   sys.executable, "-c", "import sys; sys.exit(5)")
    assert proc.returncode == 5
    v = json.loads(open(tmp_path / "v.json").read())
    assert v["measured_anything"] is False and v["job_exit_code"] == 5
    proc = vramtop("run", "--no-tui", "--budget", "1KiB", "--", sys.executable, "-c", "pass")
    assert proc.returncode == 4 and "nothing was measured" in proc.stderr


def test_bad_budgets_are_one_line_usage_errors(capsys):
    for args in (["--budget", "tpu9000"], ["--budget-block", "weights=1GiB"], ["--budget-block", "activations"],
                 ["--verdict", "x.json"]):
        capsys.readouterr()
        assert main(["estimate", "llama-2-7b", *args]) == 2, args
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_estimate_budget_gives_the_same_verdict(tmp_path, capsys):
    assert main(["estimate", "llama-2-7b", "--method", "qlora", "--seq-len", "2048", "--grad-ckpt",
                 "--budget", "rtx4090", "--verdict", str(tmp_path / "e.json")]) == 0
    assert "within budget" in capsys.readouterr().err
    assert json.loads(open(tmp_path / "e.json").read())["ok"] is True
    assert main(["estimate", "llama-2-7b", "--method", "full", "--budget", "rtx4090", "--json"]) == EXIT_OVER_BUDGET
    out = capsys.readouterr()
    v = json.loads(out.out)
    assert v["source"] == "estimate" and v["breaches"][0]["what"] == "device"
    assert "(rtx4090)" in out.err and " in " in out.err.splitlines()[0]
