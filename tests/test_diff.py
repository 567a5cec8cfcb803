"""`vramtop diff`: two real recordings of the same script at batch 2 and batch 4 (two sessions of one file)."""

from __future__ import annotations

import json
import sqlite3
import time

import torch

import vramtop_agent
from vramtop.cli import main
from vramtop.tiny import add_lora, build_model, make_batch


def _record(path: str, batch: int, steps: int = 8) -> None:
    """The same script at another batch: a real LoRA fine-tune recorded by the agent (in this process)."""
    model = add_lora(build_model(vocab_size=2048))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    b = make_batch(model, batch=batch, seq_len=32)
    with vramtop_agent.watch(model, opt, publish=False, record=path, sample_hz=20):
        for _ in range(steps):
            model(**b).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            time.sleep(0.02)


def vramtop(capsys, *args):
    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def _block_peaks(path: str, session: int) -> dict:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT max(peak), max(peak_parameters), max(peak_optimizer), max(peak_activations)"
                         " FROM steps WHERE session = ?", (session,)).fetchone()
    finally:
        db.close()
    return dict(zip(("peak", "parameters", "optimizer", "activations"), row))


def test_diff_batch_2_vs_4(tmp_path, capsys):
    path = str(tmp_path / "runs.vramtop")
    for batch in (2, 4):  # the agent appends each run as a new session of the same file
        _record(path, batch)
    code, out, err = vramtop(capsys, "diff", f"{path}#1", f"{path}#2", "--json")
    assert code == 0, err
    d = json.loads(out)
    rows = {r["name"]: r for r in d["rows"]}
    a, b = _block_peaks(path, 1), _block_peaks(path, 2)
    assert b["activations"] > a["activations"]
    assert rows["activations"]["peak"] == {"a": a["activations"], "b": b["activations"],
                                           "diff": b["activations"] - a["activations"], "same": False}
    assert rows["peak"]["peak"]["diff"] == b["peak"] - a["peak"] > 0
    for block in ("parameters", "optimizer"):
        assert rows[block]["peak"]["diff"] == 0 and rows[block]["steady"]["diff"] == 0 and not rows[block]["cause"]
    assert d["changes"] == {"batch x seq": ["2x32", "4x32"]}
    assert rows["activations"]["cause"].startswith("batch x seq 2x32 -> 4x32")
    assert d["a"]["steps"][0] == d["a"]["all_steps"][0] + 3  # warm-up left out, and said

    code, text, _ = vramtop(capsys, "diff", f"{path}#1", f"{path}#2")
    assert code == 0
    assert "changed: batch x seq 2x32 -> 4x32" in text
    assert "activations: batch x seq 2x32 -> 4x32" in text
    assert f"#1  steps {d['a']['steps'][0]}-{d['a']['steps'][1]}" in text

    same = json.loads(vramtop(capsys, "diff", f"{path}#2", f"{path}#2", "--json")[1])
    assert all(not r["cause"] for r in same["rows"]) and same["changes"] == {}

    for bad in (f"{path}#9", f"{path}#x", str(tmp_path / "missing.vramtop")):
        code, _, err = vramtop(capsys, "diff", f"{path}#1", bad)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
