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
    code, out, _ = run(capsys, "llama-3-70b", "--method", "full", "--gpu", "h100", "--engine", "formula")
    assert code == 0 and "does NOT fit" in out


def test_config_json_path(capsys, tmp_path):
    cfg = {"model_type": "mistral", "vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 2816,
           "num_hidden_layers": 4, "num_attention_heads": 16, "num_key_value_heads": 4}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    code, out, _ = run(capsys, str(tmp_path / "config.json"), "--json", "--engine", "formula")
    assert code == 0 and json.loads(out)["model"]["num_kv_heads"] == 4


@pytest.mark.parametrize("argv,message", [
    (["llama-9b"], "unknown model 'llama-9b'"),
    (["/nonexistent/config.json"], "cannot read /nonexistent/config.json"),
    (["llama-2-7b", "--dtype", "nf4"], "full fine-tuning cannot train nf4"),
    (["llama-2-7b", "--optim", "lion"], "unknown optimizer 'lion'"),
    (["llama-2-7b", "--gpu", "rtx9999"], "unknown card 'rtx9999'"),
    (["llama-2-7b", "--method", "lora", "--targets", "qkv", "--engine", "formula"], "'qkv' is not a linear layer"),
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


# ------------------------------------------------------------------ options that mean nothing, sizes, MODEL forms


@pytest.mark.parametrize("argv,message", [
    (["llama-2-7b", "--rank", "16"], "--rank applies to LoRA adapters"),
    (["llama-2-7b", "--targets", "q_proj"], "--targets applies to LoRA adapters"),
    (["llama-2-7b", "--method", "full", "--modules-to-save", "lm_head"], "--modules-to-save applies to LoRA"),
    (["llama-2-7b", "--zero", "2"], "add --world-size 2 or more"),
    (["llama-2-7b", "--fsdp"], "add --world-size 2 or more"),
    (["llama-2-7b", "--gpu", "0GiB"], "more than 0 bytes"),
    (["llama-2-7b", "--gpu", "-5GiB"], "cannot be negative"),
    (["llama-2-7b", "--batch", "-1"], "batch must be at least 1"),
    (["no-such-org/no-such-model"], "no config.json for 'no-such-org/no-such-model' in the local Hugging Face cache"),
])
def test_meaningless_or_impossible_options_are_one_line_errors(capsys, argv, message, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    code, out, err = run(capsys, *argv)
    assert code != 0 and out == ""
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_seq_len_beyond_the_context_warns(capsys):
    code, out, err = run(capsys, "gpt2", "--seq-len", "4096", "--engine", "formula")
    assert code == 0 and "exceeds gpt2's context of 1024 positions" in err and "device" in out


def test_help_speaks_plainly(capsys):
    with pytest.raises(SystemExit):
        main(["estimate", "--help"])
    out = capsys.readouterr().out
    for jargon in ("HF upcasts", "ZeRO stage (", "masters", "kbit_prep", "describe_live"):
        assert jargon not in out


def test_hub_id_from_the_local_cache(capsys, tmp_path, monkeypatch):
    snap = tmp_path / "models--acme--tiny-llama" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (tmp_path / "models--acme--tiny-llama" / "refs").mkdir()
    (tmp_path / "models--acme--tiny-llama" / "refs" / "main").write_text("abc123")
    cfg = {"model_type": "llama", "vocab_size": 1000, "hidden_size": 256, "intermediate_size": 512,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
    (snap / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    code, out, _ = run(capsys, "acme/tiny-llama", "--json", "--engine", "formula", "--seq-len", "64")
    assert code == 0 and json.loads(out)["model"]["hidden_size"] == 256


def test_any_architecture_three_peaks_in_json_and_text(capsys, tmp_path):
    """A Gemma-2 directory (not a formula family) is executed; --json carries the three peaks, the text
    leads with the device number the --gpu check uses."""
    pytest.importorskip("transformers")
    cfg = {"model_type": "gemma2", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
           "max_position_embeddings": 256}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    argv = [str(tmp_path), "--method", "qlora", "--seq-len", "64", "--grad-ckpt", "--gpu", "rtx4090"]
    code, out, _ = run(capsys, *argv, "--json")
    d = json.loads(out)
    assert code == 0 and d["engine"] == "execute"
    assert d["peak_allocated"] <= d["peak_reserved"] < d["device"] == d["peak"]
    assert d["device"] == sum(d["device_parts"].values()) and d["gpu"]["fits"] is True
    code, out, _ = run(capsys, *argv)
    first = out.splitlines()[2]
    assert code == 0 and first.startswith("device (nvidia-smi)")


def test_qlora_estimate_prints_no_bitsandbytes_noise():
    """bitsandbytes warns at import that the optional `kernels` package is missing (its CPU matmul speed):
    nothing to do with the estimate, so `vramtop estimate` drops that one message (a fresh process: the
    import happens once)."""
    import subprocess
    import sys

    pytest.importorskip("bitsandbytes")
    done = subprocess.run([sys.executable, "-m", "vramtop.cli", "estimate", "llama-3-8b", "--method", "qlora",
                           "--seq-len", "256", "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "kernels-community" not in done.stderr and done.stderr == ""
    assert json.loads(done.stdout)["engine"] == "execute"


def test_execution_settings_reach_the_json_setup_echo(capsys):
    pytest.importorskip("peft")
    code, out, _ = run(capsys, "gpt2", "--method", "lora", "--seq-len", "256", "--loss", "chunked", "--loss-chunk",
                       "64", "--offload", "activations", "--offload", "optimizer", "--json")
    assert code == 0
    d = json.loads(out)
    s = d["setup"]
    assert s["loss"] == "chunked" and s["loss_chunk"] == 64 and s["offload"] == ["activations", "optimizer"]
    assert s["optim_in_backward"] is False
    assert d["blocks"]["optimizer"] == 0 and d["host"] == sum(d["host_parts"].values()) > 0
    assert set(d["host_parts"]) == {"activations", "master_weights", "gradients", "optimizer_states"}
    code, out, _ = run(capsys, "gpt2", "--method", "lora", "--seq-len", "256", "--optim-in-backward",
                       "--offload", "activations")
    assert code == 0 and "optimizer in backward" in out and "host RAM (offloaded" in out


def test_execution_settings_are_refused_by_the_formula_engine(capsys):
    code, _, err = run(capsys, "gpt2", "--seq-len", "256", "--loss", "chunked", "--engine", "formula")
    assert code != 0 and "--engine execute" in err and err.count("\n") == 1
