"""A run's model taken out: exports load with transformers + PEFT alone and compute legend's own logits.

Each strategy runs two rounds of the tiny config; its exports are loaded in a fresh Python process that imports
only transformers, peft and torch (one process for every strategy's), and their logits on the 64 test sentences
are compared with those of legend's shared model holding the run's state (the engine's own forward pass).
"""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tests.conftest import ROOT, in_fresh_process, tiny_overrides
from typer.testing import CliRunner

from legend.cli import app
from legend.config import load_config
from legend.data.batching import encode, model_inputs
from legend.data.tasks import load_task, subsample
from legend.engine.checkpoint import read_checkpoint
from legend.engine.client import forward_passes
from legend.engine.simulation import run_experiment
from legend.export import export, load_trained
from legend.inference import scores

QUICKSTART = ROOT / "configs" / "quickstart.toml"
TOLERANCE = 1e-4

# strategy -> (exports an adapter, --client)
CASES = {
    "fedit": (True, None),
    "legend": (True, None),  # ranks 0 0 2 4 8 16: one LoraConfig with rank_pattern / alpha_pattern
    "federa": (True, None),  # relative to the original W: rank 2r of concatenated factors
    "hetlora": (True, None),
    "flexlora": (True, None),
    "fedsa": (True, "personal"),  # a client's own B
    "fedavg-full": (False, None),
    "bitfit": (False, None),
    "flora": (False, None),  # merged into W every round
}

# Runs in a fresh interpreter: loads each export with transformers and peft only, prints their logits as JSON.
FRESH_PROCESS = """
import json, os, sys
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline
texts, results = json.loads(sys.stdin.read()), {}
for folder in sys.argv[1:]:
    labels = None
    if os.path.exists(os.path.join(folder, "adapter_config.json")):
        from peft import PeftConfig, PeftModel
        base = AutoModelForSequenceClassification.from_pretrained(PeftConfig.from_pretrained(folder).base_model_name_or_path, num_labels=2)
        model = PeftModel.from_pretrained(base, folder)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(folder)
        labels = [result["label"] for result in pipeline("text-classification", model=folder)(texts[:4])]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        logits = model.eval()(**tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")).logits
    results[folder] = {"logits": logits.tolist(), "pipeline_labels": labels}
assert not any(name == "legend" or name.startswith("legend.") for name in sys.modules), "the fresh process imported legend"
print(json.dumps(results))
"""


def tiny_config(strategy, **extra):
    return load_config(QUICKSTART, tiny_overrides(**{"strategy.name": strategy}, **extra))


def fresh_logits(folders, texts):
    """Each export's logits and its text-classification pipeline's first labels (merged exports), from one fresh process."""
    results = in_fresh_process(FRESH_PROCESS, [str(f) for f in folders], texts)
    return [(np.asarray(results[str(f)]["logits"]), results[str(f)]["pipeline_labels"]) for f in folders]


def legend_logits(run, client):
    """The engine's forward pass over the 64 test rows, on the shared model holding the run's (or the client's) state;
    the rows' labels and texts."""
    trained = load_trained(run, client)
    config = trained.config
    test = subsample(load_task(config.data), config.data, config.seed).test
    split = encode(test, trained.model.tokenizer, config.data.max_length)
    rows = np.arange(len(split))
    with torch.no_grad(), forward_passes(trained.model, rows):
        logits = trained.model.module(**model_inputs(split.batch(rows))).logits
    return logits.numpy(), split.labels, list(test["text"])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every case run, scored by legend's own forward pass and exported; then every export loaded in one fresh
    process (its imports of transformers, its pipeline and peft take about 10 s, so once, not once per case)."""
    cases, texts = {}, None
    for strategy, (adapter, personal) in CASES.items():
        folder = tmp_path_factory.mktemp(strategy)
        run = folder / "run"
        summary = run_experiment(tiny_config(strategy), run)
        client = read_checkpoint(run, "test")["metrics"][-1]["clients"][0] if personal else None  # one that trained in the last round
        ours, labels, case_texts = legend_logits(run, client)
        assert texts in (None, case_texts)  # every case scores the same test rows
        texts = case_texts
        merged = export(run, folder / "merged", merge=True, client=client)
        cases[strategy] = SimpleNamespace(
            run=run,
            out=folder,
            summary=summary,
            client=client,
            ours=ours,
            labels=labels,
            merged=merged,
            adapter=export(run, folder / "adapter", client=client) if adapter else None,
        )
    folders = [f for case in cases.values() for f in (case.merged, case.adapter) if f is not None]
    loaded = dict(zip(folders, fresh_logits(folders, texts), strict=True))
    return cases, texts, loaded


@pytest.mark.xdist_group("export")  # the fixture above serves every case: on one worker it runs once
@pytest.mark.parametrize("strategy", list(CASES))
def test_export_loads_with_transformers_and_peft_alone_and_equals_legend(strategy, exported):
    cases, texts, loaded = exported
    case = cases[strategy]
    assert len(texts) == 64
    if case.client is None:  # legend's logits are the global model the run scored: its accuracy is the run's final accuracy
        assert scores(case.labels, case.ours.argmax(-1), 2)["accuracy"] == case.summary["final_accuracy"]
    merged, pipeline_labels = loaded[case.merged]
    if case.adapter is not None:
        assert (case.adapter / "adapter_config.json").is_file() and (case.adapter / "adapter_model.safetensors").is_file()
        from_adapter, _ = loaded[case.adapter]
        assert np.abs(from_adapter - case.ours).max() <= TOLERANCE
        assert np.abs(from_adapter - merged).max() <= TOLERANCE
    else:
        result = CliRunner().invoke(app, ["export", str(case.run), "--out", str(case.out / "adapter")])
        assert result.exit_code == 2 and "--merge" in result.stderr
        assert not (case.out / "adapter").exists()
    assert np.abs(merged - case.ours).max() <= TOLERANCE
    assert pipeline_labels == [str(i) for i in case.ours[:4].argmax(-1)]  # sst2's labels are named "0" and "1"
    card = (case.merged / "README.md").read_text()
    assert f"`{strategy}`" in card and "2 of 2" in card and '"rounds": 2' in card


@pytest.fixture(scope="module")
def fedit_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("fedit") / "run"
    return run, run_experiment(tiny_config("fedit"), run)


def test_evaluate_on_an_export_prints_the_runs_final_accuracy(fedit_run, tmp_path):
    run, summary = fedit_run
    folder = export(run, tmp_path / "export")
    for model in (folder, run):  # an export and the run folder itself
        result = CliRunner().invoke(app, ["evaluate", str(model), "--json"])
        assert result.exit_code == 0, result.output
        scored = json.loads(result.stdout)
        assert scored["accuracy"] == summary["final_accuracy"] and scored["examples"] == 64
        assert np.asarray(scored["confusion"]).sum() == 64 and 0 <= scored["macro_f1"] <= 1
    table = CliRunner().invoke(app, ["evaluate", str(folder)])
    assert f"accuracy {summary['final_accuracy']}" in table.stdout and "confusion" in table.stdout
    fewer = json.loads(CliRunner().invoke(app, ["evaluate", str(folder), "data.test_size=10", "--json"]).stdout)
    assert fewer["examples"] == 10


def test_predict_gives_each_input_a_label_and_probabilities(fedit_run, tmp_path):
    run, _ = fedit_run
    folder = export(run, tmp_path / "export", merge=True)
    texts = ["a gorgeous, witty, seductive movie .", "the plot is nothing but boilerplate clichés ."]
    (tmp_path / "inputs.tsv").write_text("sentence\n" + "\n".join(texts) + "\n")
    (tmp_path / "inputs.jsonl").write_text("".join(json.dumps({"sentence": t}) + "\n" for t in texts))
    outputs = []
    for args in ([*texts], ["--file", str(tmp_path / "inputs.tsv")], ["--file", str(tmp_path / "inputs.jsonl")]):
        result = CliRunner().invoke(app, ["predict", str(folder), *args, "--jsonl"])
        assert result.exit_code == 0, result.output
        outputs.append([json.loads(line) for line in result.stdout.splitlines()])
    assert outputs[0] == outputs[1] == outputs[2]
    for text, row in zip(texts, outputs[0], strict=True):
        assert row["input"] == text and abs(sum(row["probabilities"].values()) - 1) < 1e-6
        assert row["label"] == max(row["probabilities"], key=row["probabilities"].get)
    from_run = [json.loads(line) for line in CliRunner().invoke(app, ["predict", str(run), *texts, "--jsonl"]).stdout.splitlines()]
    assert [r["label"] for r in from_run] == [r["label"] for r in outputs[0]]
    assert "probabilities" not in CliRunner().invoke(app, ["predict", str(folder), texts[0]]).stdout  # a table, not JSON


def test_bad_input_is_one_line_exit_code_2_and_nothing_overwritten(fedit_run, tmp_path):
    run, _ = fedit_run
    (tmp_path / "not-a-run").mkdir()
    (tmp_path / "no-checkpoint").mkdir()
    (tmp_path / "no-checkpoint" / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text())
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep me")
    cases = {
        "not a run": (["export", str(tmp_path / "not-a-run"), "--out", str(tmp_path / "x")], "is not a run folder (no checkpoint.pt)"),
        "no checkpoint": (
            ["export", str(tmp_path / "no-checkpoint"), "--out", str(tmp_path / "x")],
            "has the metrics of a run but no checkpoint.pt",
        ),
        "missing folder": (["export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")], "is not a folder"),
        "--client on a global model": (["export", str(run), "--out", str(tmp_path / "x"), "--client", "1"], "trains one global model"),
        "out not empty": (["export", str(run), "--out", str(taken)], "exists and is not empty"),
        "predict on no model": (["predict", str(tmp_path / "not-a-run"), "hello"], "is neither an export"),
        "evaluate a model key": (["evaluate", str(run), "lora.r=4"], "is not a data.* or eval.* key"),
    }
    for name, (args, message) in cases.items():
        result = CliRunner().invoke(app, args)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2, (name, result.output)
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (name, result.stderr)
    assert not (tmp_path / "x").exists()
    assert [p.name for p in taken.iterdir()] == ["mine.txt"] and (taken / "mine.txt").read_text() == "keep me"


def test_a_personalised_run_needs_a_client_that_trained(tmp_path):
    run = tmp_path / "run"
    run_experiment(tiny_config("fedsa", **{"fl.num_clients": 8}), run)  # 2 rounds of 2 clients: at least 4 never train
    trained_clients = {c for row in read_checkpoint(run, "test")["metrics"] for c in row["clients"]}
    never = next(c for c in range(8) if c not in trained_clients)
    for args, message in (
        (["--out", str(tmp_path / "x")], "pass --client N, one of"),
        (["--out", str(tmp_path / "x"), "--client", str(never)], f"--client {never}: that client has no model of its own"),
    ):
        result = CliRunner().invoke(app, ["export", str(run), *args])
        assert result.exit_code == 2 and message in result.stderr, result.output
    assert not (tmp_path / "x").exists()
