"""`switch-serve generate` prints one JSON object whose outputs equal transformers'."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from reference import hf_generate

from cluster.cli import main
from cluster.demo import WORDS
from cluster.testing import write_random_checkpoint_with_tokenizer

PROMPTS = [[5, 9, 23, 4, 1], [71, 3, 1]]


def run_cli(capsys, *argv) -> dict:
    main(["generate", *argv])
    return json.loads(capsys.readouterr().out)


def test_generate_json_matches_transformers(ray_cluster, checkpoint_factory, capsys):
    path, hf_model = checkpoint_factory("cli", num_experts=4, expert_capacity=2)
    out = run_cli(capsys, "--model", str(path), "--input-ids", json.dumps(PROMPTS), "--max-new-tokens", "6",
                  "--experts-per-actor", "2", "--micro-batches", "2", "--logprobs", "--json")
    reference = hf_generate(hf_model, PROMPTS, 6)
    assert len(out["outputs"]) == len(PROMPTS)
    for got, (tokens, logprobs) in zip(out["outputs"], reference):
        assert set(got) == {"token_ids", "logprobs", "finish_reason", "dropped_tokens"}
        assert got["token_ids"] == tokens
        assert got["logprobs"] == pytest.approx(logprobs, abs=1e-4)
        assert got["finish_reason"] in ("eos", "length")


def test_generate_text_uses_the_checkpoint_tokenizer(ray_cluster, tmp_path, capsys):
    from transformers import AutoTokenizer

    write_random_checkpoint_with_tokenizer(tmp_path, WORDS)
    out = run_cli(capsys, "--model", str(tmp_path), "--text", "sort : 2 1", "spell : 4 7 2",
                  "--max-new-tokens", "4", "--experts-per-actor", "4", "--capacity", "dropless", "--json")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert [len(o["token_ids"]) for o in out["outputs"]] == [4, 4]
    for o in out["outputs"]:
        assert "logprobs" not in o and o["dropped_tokens"] == 0
        assert o["text"] == tokenizer.decode(o["token_ids"], skip_special_tokens=True)


@pytest.mark.parametrize("argv, message", [
    (["--input-ids", "[[5, 1000]]"], "input_ids[0]: token ids [1000] outside the vocabulary"),
    (["--input-ids", "[[]]"], "input_ids[0]: empty prompt"),
    (["--text", "hello"], "holds no tokenizer"),
    (["--input-ids", "[[5, 1]]", "--replicate-hot", "2"], "error: replicate_hot needs gpus"),
    (["--input-ids", "[[5, 1]]", "--nodes", "3"], "error: nodes: 1 actors cannot be spread over 3 nodes"),
])
def test_bad_input_exits_with_a_message(ray_cluster, checkpoint_factory, capsys, argv, message):
    path, _ = checkpoint_factory("cli", num_experts=4, expert_capacity=2)
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model", str(path), "--experts-per-actor", "4", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_checkpoint_exits_with_a_message(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(tmp_path), "--input-ids", "[[1]]"])
    assert f"{tmp_path}/config.json: missing" in capsys.readouterr().err


def test_console_script_help():
    script = Path(sys.executable).parent / "switch-serve"
    out = subprocess.run([str(script), "generate", "--help"], capture_output=True, text=True, check=True).stdout
    for flag in ("--model", "--input-ids", "--text", "--max-new-tokens", "--experts-per-actor", "--capacity",
                 "--logprobs", "--json", "--gpus", "--nodes", "--gpu-memory", "--actors-per-gpu", "--replicate-hot",
                 "--stats", "--dtype", "--routing"):
        assert flag in out
    assert "--top-logprobs" not in out  # the OpenAI API's alone
