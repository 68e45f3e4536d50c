"""`python -m toolkit.inspect`: the table, the JSON form, and the exit status for good, wrong and unreadable files."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from toolkit.inspect import main
from toolkit.model import build_dit
from toolkit.model.weights import save_dit_weights

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def tiny_file(tmp_path):
    torch.manual_seed(0)
    return save_dit_weights(build_dit("tiny"), tmp_path / "model-720p-16fps.pt")


def rows(text: str) -> dict[str, str]:
    return {line[:16].strip(): line[16:].strip() for line in text.splitlines()}


def test_table_for_a_matching_file(tiny_file, capsys):
    assert main([str(tiny_file)]) == 0
    table = rows(capsys.readouterr().out)
    assert table["preset"] == "tiny"
    assert table["format"] == "official"
    assert table["prefix"] == "'net.'"
    assert table["dtype"] == "bfloat16 x47"
    assert table["parameters"] == f"{sum(p.numel() for p in build_dit('tiny', device='meta').parameters()):,}"
    assert table["variant"] == "720p 16fps"


def test_json_output(tiny_file, capsys):
    assert main([str(tiny_file), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    fields = ("preset", "resolution", "fps", "natten", "num_tensors")
    assert tuple(info[field] for field in fields) == ("tiny", "720p", 16, False, 47)


def test_a_file_matching_no_preset_exits_1_with_the_problems(tmp_path, capsys):
    state = {"net." + k: v for k, v in build_dit("tiny").state_dict().items()}
    state["net.blocks.0.mlp.layer3.weight"] = state.pop("net.blocks.0.mlp.layer2.weight")
    torch.save(state, tmp_path / "model.pt")
    assert main([str(tmp_path / "model.pt")]) == 1
    table = capsys.readouterr().out
    assert "tiny: 1 missing keys: blocks.0.mlp.layer2.weight" in table
    assert "tiny: 1 unexpected keys: blocks.0.mlp.layer3.weight" in table


def test_an_unknown_width_is_named(tmp_path, capsys):
    torch.save({"net.x_embedder.proj.1.weight": torch.zeros(96, 72)}, tmp_path / "odd.pt")
    assert main([str(tmp_path / "odd.pt")]) == 1
    assert "width 96, ? blocks: no preset has this size" in capsys.readouterr().out


def test_an_unreadable_file_exits_2(tmp_path, capsys):
    (tmp_path / "broken.pt").write_text("not a checkpoint")
    assert main([str(tmp_path / "broken.pt")]) == 2
    assert "not a torch checkpoint" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.pt")]) == 2


def test_help_shows_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    command = "python -m toolkit.inspect checkpoints/nvidia/Cosmos-Predict2-2B-Video2World/model-720p-16fps.pt"
    assert command in capsys.readouterr().out


def test_runs_as_a_module(tiny_file):
    result = subprocess.run(
        [sys.executable, "-m", "toolkit.inspect", str(tiny_file)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert rows(result.stdout)["preset"] == "tiny"
