"""Every user-facing error through the command line: one line on stderr naming the problem and the fix, exit code 2.

In process (typer's runner), so each case costs no interpreter start; test_config.py runs the same
wrapper as a real subprocess."""

import pytest
import torch
from tests.conftest import ROOT
from typer.testing import CliRunner

from legend.cli import app

QUICKSTART = str(ROOT / "configs" / "quickstart.toml")


@pytest.fixture(scope="module")
def custom_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("custom")
    (folder / "train.tsv").write_text("text\tlabel\nhello\tyes\nbye\tno\n")
    (folder / "test.tsv").write_text("text\tlabel\nso so\tmaybe\n")
    (folder / "broken.toml").write_text("[fl\nrounds = 3\n")
    return folder


CASES = {
    "value out of range": (["run", QUICKSTART, "fl.rounds=0"], "config: fl.rounds: Input should be greater than 0"),
    "config that is not TOML": (["run", "{data}/broken.toml"], "is not valid TOML"),
    "missing data folder": (["data", QUICKSTART, 'data.path="/nowhere/sst2"'], "data.path /nowhere/sst2 is not a folder: set data.path"),
    "wrong column": (
        ["data", QUICKSTART, "data.task=custom", 'data.path="{data}"', 'data.text_columns=["sentence"]'],
        "column 'sentence' not in the train split",
    ),
    "unknown label": (
        ["data", QUICKSTART, "data.task=custom", 'data.path="{data}"', 'data.text_columns=["text"]', 'data.labels=["yes", "no"]'],
        "label 'maybe' in the test split is not one of",
    ),
    "unknown model": (["run", QUICKSTART, "model.name=bert-huge"], "model.name 'bert-huge' is unknown"),
    "unknown strategy": (["run", QUICKSTART, "strategy.name=fedfoo"], "strategy.name 'fedfoo' is unknown"),
    "not a device": (["run", QUICKSTART, "engine.device=tpu"], "engine.device 'tpu' is not a device: use auto, cpu, cuda or cuda:N"),
    "QLoRA on the CPU": (
        ["run", QUICKSTART, "model.quantize=4bit", "engine.device=cpu"],
        "model.quantize '4bit' needs a CUDA GPU (bitsandbytes quantizes there)",
    ),
    "parallel clients of a strategy without LoRA": (
        ["run", QUICKSTART, "strategy.name=bitfit", "engine.parallel_clients=4"],
        "engine.parallel_clients = 4 trains clients' LoRA adapters side by side, and bitfit trains bitfit",
    ),
}
if not torch.cuda.is_available():  # the machines CI runs on
    CASES["a GPU this torch cannot see"] = (
        ["run", QUICKSTART, "engine.device=cuda"],
        "engine.device 'cuda' but this torch sees no CUDA device",
    )
    CASES["calibrating a GPU this torch cannot see"] = (
        ["calibrate", "--device", "cuda", "--no-save"],
        "--device 'cuda' but this torch sees no CUDA device",
    )
CASES["calibrating at an unknown precision"] = (
    ["calibrate", "--precision", "float8", "--no-save"],
    "precision 'float8' is not one: use float32, bfloat16, float16 or auto",
)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_exit_code_2(case, custom_data, tmp_path):
    args, message = CASES[case]
    args = [a.replace("{data}", str(custom_data)) for a in args]
    if args[0] == "run":
        args += ["--out", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert ":" in lines[0][len("error: ") :]  # the problem, then what to do
