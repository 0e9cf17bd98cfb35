import subprocess
import sys

import pytest
from tests.conftest import ROOT

from legend.config import load_config
from legend.errors import LegendError


def test_quickstart_loads_with_overrides():
    config = load_config(ROOT / "configs" / "quickstart.toml", ["fl.rounds=5", "data.alpha=0.1", 'lora.target_modules=["query"]'])
    assert config.fl.rounds == 5
    assert config.data.alpha == 0.1
    assert config.lora.target_modules == ["query"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["fl.roundz=5"], "unknown key 'fl.roundz'; allowed in fl: num_clients, clients_per_round, rounds"),
        (["fl.rounds=many"], "config: fl.rounds: Input should be a valid integer"),
        (["data.alpha=-1"], "config: data.alpha: Input should be greater than 0"),
        (["fl.clients_per_round=50"], "fl.clients_per_round (50) exceeds fl.num_clients (20)"),
        (["rounds"], "override 'rounds' is not key=value"),
        (["colour.red=1"], "unknown key 'colour'; allowed in the top level: seed, model"),
        (
            ["lora.r_min=4"],
            "config: lora.r_min moved to hetlora.r_min: write hetlora.r_min (HetLoRA and FlexLoRA: smallest per-device rank",
        ),
    ],
)
def test_bad_config_names_the_key(overrides, message):
    with pytest.raises(LegendError, match=None) as info:
        load_config(ROOT / "configs" / "quickstart.toml", overrides)
    assert message in str(info.value)


def test_a_checkpoint_written_before_a_key_moved_reads_its_value_under_the_new_name():
    from legend.config import renamed_keys, validate_config

    saved = {"lora": {"r": 8, "r_min": 3}, "hetlora": {"gamma": 0.9}}
    config = validate_config(renamed_keys(saved))
    assert (config.hetlora.r_min, config.hetlora.gamma, config.lora.r) == (3, 0.9, 8) and saved["lora"]["r_min"] == 3


def test_missing_config_file():
    with pytest.raises(LegendError, match="config file nowhere.toml not found"):
        load_config("nowhere.toml")


def test_cli_prints_one_error_line_and_exits_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "legend", "run", str(ROOT / "configs" / "quickstart.toml"), "fl.roundz=3", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: config: unknown key 'fl.roundz'"), result.stderr


def test_docs_config_reference_is_current():
    from legend.config import reference_markdown

    page = (ROOT / "docs" / "config.md").read_text()
    assert reference_markdown() in page, "docs/config.md's config reference is stale: paste the output of `legend reference`"
