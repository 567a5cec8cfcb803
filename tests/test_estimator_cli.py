"""`vramtop estimate`: table, --json, card fit, the article comparison, and one-line errors."""

from __future__ import annotations

import json
import re

import pytest

from vramtop.cli import main


def run(capsys, *argv):
    code = main(["estimate", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_table_for_a_preset_with_a_card(capsys):
    code, out, err = run(capsys, "llama-3-8b", "--method", "qlora", "--seq-len", "4096", "--grad-ckpt",
                         "--gpu", "rtx4090")
    assert code == 0 and err == ""
    for block in ("parameters", "gradients", "optimizer", "activations", "other"):
        assert block in out
    assert "phase peaks" in out and "forward" in out and "backward" in out
    assert "rtx4090" in out and "fits" in out


def test_json_output_format(capsys):
    code, out, _ = run(capsys, "llama-2-7b", "--method", "lora", "--rank", "16", "--targets", "q_proj,k_proj,v_proj",
                       "--dtype", "fp16", "--batch", "2", "--seq-len", "1024", "--json", "--gpu", "24GiB")
    assert code == 0
    d = json.loads(out)
    assert set(d["blocks"]) == {"parameters", "gradients", "optimizer", "activations", "other"}
    assert all(isinstance(v, int) for v in d["blocks"].values())
    assert isinstance(d["peak"], int) and set(d["phase_peaks"]) == {"forward", "backward", "optimizer"}
    assert d["setup"]["lora_rank"] == 16 and d["setup"]["lora_targets"] == ["q_proj", "k_proj", "v_proj"]
    # fp16 Llama-2-7B base: 2 bytes per weight, plus fp32 adapters.
    assert 13.4e9 < d["blocks"]["parameters"] < 13.6e9
    assert d["gpu"]["bytes"] == 24 * 2**30 and d["gpu"]["fits"] is (d["peak"] <= 24 * 2**30)


def test_does_not_fit(capsys):
    code, out, _ = run(capsys, "llama-3-70b", "--method", "full", "--gpu", "h100")
    assert code == 0 and "does NOT fit" in out


def test_config_json_path(capsys, tmp_path):
    cfg = {"model_type": "mistral", "vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 2816,
           "num_hidden_layers": 4, "num_attention_heads": 16, "num_key_value_heads": 4}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    code, out, _ = run(capsys, str(tmp_path / "config.json"), "--json")
    assert code == 0 and json.loads(out)["model"]["num_kv_heads"] == 4


@pytest.mark.parametrize("argv,message", [
    (["llama-9b"], "unknown model 'llama-9b'"),
    (["/nonexistent/config.json"], "cannot read /nonexistent/config.json"),
    (["llama-2-7b", "--dtype", "nf4"], "full fine-tuning cannot train nf4"),
    (["llama-2-7b", "--optim", "lion"], "unknown optimizer 'lion'"),
    (["llama-2-7b", "--gpu", "rtx9999"], "unknown card 'rtx9999'"),
    (["llama-2-7b", "--method", "lora", "--targets", "qkv"], "'qkv' is not a linear layer"),
    (["gpt2", "--vs-article"], "compares with a Llama-2-7B table"),
])
def test_bad_input_is_one_line_and_nonzero(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code != 0
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert out == ""


def test_unreadable_config(capsys, tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{oops")
    code, _, err = run(capsys, str(bad))
    assert code == 2 and "not valid JSON" in err


def test_llama2_7b_beside_the_article(capsys):
    code, out, _ = run(capsys, "llama-2-7b", "--vs-article")
    assert code == 0
    rows = [line for line in out.splitlines() if line.startswith(("QLoRA", "LoRA"))]
    assert len(rows) == 4
    pairs = [[float(x) for x in re.findall(r"([\d.]+)GB", r)] for r in rows]
    article = [p[0] for p in pairs]
    ours = [p[1] for p in pairs]
    assert article == [7.0, 8.5, 11.5, 18.0]
    # Same shape as the article: QLoRA grows with the sequence, LoRA fp16 costs about twice QLoRA.
    assert ours[0] < ours[1] < ours[2] and ours[3] > 1.8 * ours[1]
    # And within 25% of each of the article's totals (docs/estimator.md explains the rest).
    for a, o in zip(article, ours):
        assert abs(o - a) / a < 0.25
