"""Take a run's model out: a PEFT adapter, or a merged transformers model, that loads without legend.

A run folder holds the global state in checkpoint.pt. Export rebuilds the shared model exactly as the
run built it (same config, same seed), loads that state, and writes it in the ecosystem's formats:

- adapter (default): PEFT's ``adapter_config.json`` and ``adapter_model.safetensors``. Heterogeneous
  ranks (LEGEND's ramp, blocks without adapters) are one LoraConfig with ``rank_pattern`` and
  ``alpha_pattern``; the trained classification head travels as ``modules_to_save``. FeDeRA's adapters
  (``lora.init = "federa"``) were trained over W_res = W - s B0 A0, so they are exported relative to the
  original W, as PEFT converts PiSSA adapters: dW = s B'A' - s B0 A0 = s [B', -B0] [A'; A0], rank 2r
  at alpha 2 alpha (the same scaling). A causal LM trained on instructions (data.format = "instruct")
  exports as an adapter for AutoModelForCausalLM (task type CAUSAL_LM), with no head of its own.
- merged (``--merge``): every adapter folded into its weight (W + s B A), a plain transformers model.

Full fine-tuning and BitFit train no adapter, and FedEx-LoRA and FLoRA fold updates into W: those
export merged only. FedSA-LoRA has no global B: its export is one client's personalised model.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft.tuners.lora import LoraLayer

import legend
from legend.config import Config
from legend.core import State
from legend.data.tasks import task_labels, task_text_columns
from legend.engine.checkpoint import CHECKPOINT, device_state, read_checkpoint
from legend.engine.simulation import build_model
from legend.errors import LegendError
from legend.lora.layout import lora_config
from legend.models.resolve import resolve_model
from legend.models.shared import SharedModel
from legend.objectives import Objective
from legend.records import METRICS_FILE, target_held
from legend.strategies import Strategy

LEGEND_FILE = "legend.json"  # in every export: what legend needs to predict and evaluate with it (labels, text columns, config)
ADAPTER = "default"  # PEFT's name of the one adapter legend injects


@dataclass
class TrainedModel:
    """A run's model as training left it: the shared model with the global (or one client's) state loaded, in eval mode."""

    folder: Path
    config: Config
    model: SharedModel
    objective: Objective
    strategy: Strategy
    state: State  # what was loaded over the freshly built model
    initial: State  # every LoRA factor as the run initialised it (FeDeRA's A0 and B0)
    label_names: tuple[str, ...]
    rounds: int  # the last finished round
    stopped_at_target: bool  # the run ended before fl.rounds because it held its target (eval.stop_at_target)
    final_accuracy: float | None  # of the last evaluation (the global model's, also for a client's export)
    client: int | None

    @property
    def causal_lm(self) -> bool:
        return self.objective.causal_lm

    @property
    def base_model(self) -> str:
        """What transformers loads the pre-trained model from: a local folder or a hub id."""
        return resolve_model(self.config.model.name)

    def description(self) -> dict[str, Any]:
        """The export's ``legend.json``."""
        return {
            "legend_version": legend.__version__,
            "base_model": self.base_model,
            "model_name": self.config.model.name,
            "strategy": self.config.strategy.name,
            "task": self.config.data.task,
            "labels": list(self.label_names),
            "text_columns": list(task_text_columns(self.config.data)),
            "max_length": self.config.data.max_length,
            "rounds": self.rounds,
            "planned_rounds": self.config.fl.rounds,
            "num_clients": self.config.fl.num_clients,
            "client": self.client,
            "final_accuracy": self.final_accuracy,
            "config": self.config.model_dump(),
        }


def load_trained(folder: Path, client: int | None = None, purpose: str = "export") -> TrainedModel:
    """The model a run folder's last checkpoint holds (``client``: that client's personalised model, FedSA-LoRA)."""
    if not folder.is_dir():
        raise LegendError(f"{purpose}: {folder} is not a folder: give the --out folder of `legend run` or `legend deploy`")
    if not (folder / CHECKPOINT).is_file():
        if (folder / METRICS_FILE).is_file():
            raise LegendError(
                f"{purpose}: {folder} has the metrics of a run but no {CHECKPOINT}, which holds its model: resume the run "
                f"(legend run CONFIG --out {folder} --resume writes it after its next round) or export another run"
            )
        raise LegendError(
            f"{purpose}: {folder} is not a run folder (no {CHECKPOINT}): give the --out folder of `legend run` or "
            "`legend deploy`, or OUT/runs/<strategy>-seed<N> of `legend compare`"
        )
    saved = read_checkpoint(folder, purpose)
    config = Config.model_validate(saved["config"])
    labels = task_labels(config.data)
    model, objective, strategy = build_model(config, labels)
    initial = {key: param.detach().clone() for key, param in model.params.items() if ".lora_" in key}
    state = saved["global_state"]
    kept = strategy.device_side().kept(model.keys(strategy.global_layout()))
    if kept or client is not None:
        state = {**state, **_client_tensors(folder, strategy.name, bool(kept), saved, client)}
    model.load(state)
    model.module.eval()
    rows = saved["metrics"]
    evaluated = [row["accuracy"] for row in rows if row["accuracy"] is not None]
    return TrainedModel(
        folder,
        config,
        model,
        objective,
        strategy,
        state,
        initial,
        labels,
        rows[-1]["round"],
        config.eval.stop_at_target and target_held(rows, config.eval.target_accuracy),
        evaluated[-1] if evaluated else None,
        client,
    )


def _client_tensors(folder: Path, name: str, personalised: bool, saved: dict[str, Any], client: int | None) -> State:
    """The tensors ``client`` keeps as its own (FedSA-LoRA's B), as the run's runtime stored them."""
    if not personalised:
        raise LegendError(f"--client: {name} trains one global model, which every client shares: export without --client")
    own = device_state(saved)["own"]  # the embedded runtime's store: tensors in memory, or a file per client under client_state/
    clients = sorted({*own["memory"], *own["files"]})
    if not clients:
        raise LegendError(
            f"{name}: {folder} holds no client's own tensors (a Flower deployment leaves them on the nodes, in each "
            "node's state-dir): export a run of the embedded engine, or one whose clients trained"
        )
    if client is None:
        raise LegendError(
            f"{name} keeps a part of the model on each client and has no global model: pass --client N, one of {_listed(clients)}"
        )
    if client in own["memory"]:
        return own["memory"][client]
    if client in own["files"]:
        return torch.load(folder / "client_state" / own["files"][client], weights_only=True)
    raise LegendError(
        f"--client {client}: that client has no model of its own in {folder} (it never trained): use one of {_listed(clients)}"
    )


def _listed(clients: list[int]) -> str:
    shown = ", ".join(map(str, clients[:20]))
    return f"{shown}, ... ({len(clients)} clients)" if len(clients) > 20 else shown or "(none yet)"


def export(folder: Path, out: Path, merge: bool = False, client: int | None = None) -> Path:
    """Write the run's model to ``out`` (which must not exist, or be empty); returns ``out``.

    Written into a sibling temporary folder and renamed into place: ``out`` is whole or absent."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LegendError(f"--out {out} exists and is not empty: give a new folder, or delete it first")
    trained = load_trained(folder, client)
    if not merge:
        _require_adapter(trained)
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)  # left by an export that was killed
    partial.mkdir(parents=True)
    try:
        (merged_model if merge else peft_model)(trained).save_pretrained(partial)
        trained.model.tokenizer.save_pretrained(partial)
        (partial / LEGEND_FILE).write_text(
            json.dumps({"format": "merged" if merge else "adapter", **trained.description()}, indent=2) + "\n"
        )
        (partial / "README.md").write_text(model_card(trained, merge))
        if out.exists():
            out.rmdir()
        os.replace(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out


def _require_adapter(trained: TrainedModel) -> None:
    name, layout = trained.strategy.name, trained.strategy.global_layout()
    if layout.method != "lora":
        trains = {"full": "every weight", "bitfit": "the biases", "adapter": "bottleneck adapters"}[layout.method]
        raise LegendError(
            f"{name} trains {trains}, not LoRA adapters, so there is no PEFT adapter to export: add --merge for a full transformers model"
        )
    if any(key.endswith(".base_layer.weight") for key in trained.state):
        raise LegendError(
            f"{name} folds its updates into the frozen weights, which no LoRA adapter holds: add --merge for a full transformers model"
        )


def _hf_config(trained: TrainedModel):
    """The pre-trained model's own config (its dropout rates, not the run's) with the task's labels (a causal LM: as it is)."""
    from transformers import AutoConfig

    if trained.causal_lm:
        return AutoConfig.from_pretrained(trained.base_model)
    labels = trained.label_names
    config = AutoConfig.from_pretrained(
        trained.base_model, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)}
    )
    config.pad_token_id = trained.model.tokenizer.pad_token_id
    return config


def _fresh_base(trained: TrainedModel):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForCausalLM if trained.causal_lm else AutoModelForSequenceClassification
    return auto.from_pretrained(trained.base_model, config=_hf_config(trained), dtype=torch.float32)


def _lora_layers(module: torch.nn.Module) -> dict[str, LoraLayer]:
    return {name: layer for name, layer in module.named_modules() if isinstance(layer, LoraLayer)}


@torch.no_grad()
def peft_model(trained: TrainedModel):
    """A PeftModel over a freshly loaded base model carrying the run's adapters and head."""
    from peft import get_peft_model

    federa = trained.strategy.lora_init == "federa"
    factors, ranks, alphas = {}, {}, {}
    for name, layer in _lora_layers(trained.model.module).items():
        a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight  # (r, in), (out, r)
        rank, alpha = layer.r[ADAPTER], layer.lora_alpha[ADAPTER]
        if federa:  # relative to the original W: s B'A' - s B0 A0 as one adapter of rank 2r and the same scaling
            a0, b0 = trained.initial[f"{name}.lora_A.{ADAPTER}.weight"], trained.initial[f"{name}.lora_B.{ADAPTER}.weight"]
            a, b, rank, alpha = torch.cat([a, a0]), torch.cat([b, -b0], dim=1), 2 * rank, 2 * alpha
        factors[name], ranks[name], alphas[name] = (a, b), rank, alpha
    heads = [] if trained.causal_lm else sorted({key.rsplit(".", 1)[0] for key in trained.model.params if trained.model.is_head(key)})
    config = lora_config(
        ranks, alphas, trained.config.lora.dropout, modules_to_save=list(heads), task_type="CAUSAL_LM" if trained.causal_lm else "SEQ_CLS"
    )
    model = get_peft_model(_fresh_base(trained), config)
    model.peft_config[ADAPTER].modules_to_save = heads  # PEFT added its own guesses for SEQ_CLS ("classifier", "score") to the list
    inner = model.base_model.model
    for name, (a, b) in factors.items():
        layer = inner.get_submodule(name)
        layer.lora_A[ADAPTER].weight.copy_(a)
        layer.lora_B[ADAPTER].weight.copy_(b)
    for head in heads:
        own = {key[len(head) + 1 :]: value for key, value in trained.model.module.state_dict().items() if key.startswith(head + ".")}
        inner.get_submodule(head).modules_to_save[ADAPTER].load_state_dict(own)
    return model


@torch.no_grad()
def merged_model(trained: TrainedModel):
    """A plain transformers model whose weights are the trained model's with every adapter folded in (W + s B A)."""
    module = trained.model.module
    if any(".bottleneck." in key for key in trained.model.params):
        raise LegendError(
            f"{trained.strategy.name} adds bottleneck adapters, which no transformers architecture holds, so it cannot be merged "
            "or exported: use a LoRA strategy, bitfit or fedavg-full"
        )
    state = dict(module.state_dict())
    for name, layer in _lora_layers(module).items():
        for part in ("weight", "bias"):
            if f"{name}.base_layer.{part}" in state:
                state[f"{name}.{part}"] = state.pop(f"{name}.base_layer.{part}")
        state[f"{name}.weight"] = state[f"{name}.weight"] + layer.get_delta_weight(ADAPTER)
    model = _fresh_base(trained)
    model.load_state_dict({key: value for key, value in state.items() if ".lora_" not in key}, strict=True)
    return model.eval()


def model_card(trained: TrainedModel, merge: bool) -> str:
    """The export's README.md, in the Hugging Face model card format (YAML front matter, then text)."""
    config, labels = trained.config, trained.label_names
    base = trained.base_model
    form = (
        "a full transformers model (adapters merged into the weights)"
        if merge
        else "a PEFT LoRA adapter (with the trained classification head)"
    )
    rounds = f"{trained.rounds} rounds" + (
        ""
        if trained.rounds >= config.fl.rounds
        else " (it stopped once its target was held)"
        if trained.stopped_at_target
        else f" of the {config.fl.rounds} configured (the run was interrupted; this is its last checkpoint)"
    )
    whose = (
        f"client {trained.client}'s personalised model (its own B, the shared A and head)"
        if trained.client is not None
        else "the global model"
    )
    accuracy = "not evaluated" if trained.final_accuracy is None else f"{trained.final_accuracy:.4f}"
    id2label = {i: name for i, name in enumerate(labels)}
    if trained.causal_lm:
        form = form.replace("(with the trained classification head)", "for the causal LM")
        load = _causal_load_snippet(base, merge)
    else:
        load = _classifier_load_snippet(base, merge, id2label, trained.model.tokenizer.pad_token_id)
    pipeline = "text-generation" if trained.causal_lm else "text-classification"
    split = f"{config.data.partition} split" + (f", alpha {config.data.alpha}" if config.data.partition == "dirichlet" else "")
    example = "an instruction" if trained.causal_lm and not labels else "a sentence"
    front = [
        "---",
        f"base_model: {base}",
        f"library_name: {'transformers' if merge else 'peft'}",
        f"pipeline_tag: {pipeline}",
        "tags:",
        *(f"- {tag}" for tag in dict.fromkeys(["legend", "federated-learning", config.strategy.name, *([] if merge else ["lora"])])),
        "---",
    ]
    return (
        "\n".join(front)
        + f"""

# {config.model.name} fine-tuned on {config.data.task}, federated with {config.strategy.name}

This is {form}: {whose}, after {rounds} of federated fine-tuning with legend {legend.__version__}.

| | |
|---|---|
| base model | `{base}` (`model.name = "{config.model.name}"`) |
| strategy | `{config.strategy.name}` (LoRA init `{trained.strategy.lora_init}`) |
| task | `{config.data.task}`, text columns {list(task_text_columns(config.data))}, at most {config.data.max_length} tokens |
| labels | {_labels_row(trained)} |
| rounds | {trained.rounds} of {config.fl.rounds} |
| clients | {config.fl.num_clients}, {config.fl.clients_per_round} per round ({split}) |
| final accuracy | {accuracy} (the global model's last evaluation in the run, on its test split) |

## Use

```python
{load.replace("PATH", "this-folder")}
```

Or with legend: `legend predict this-folder "{example}"` and `legend evaluate this-folder`.

## The exact config

```json
{json.dumps(config.model_dump(), indent=2)}
```
"""
    )


def _labels_row(trained: TrainedModel) -> str:
    labels = trained.label_names
    if not labels:
        return "none: open instructions, scored by exact match of greedy answers"
    named = ", ".join(f"{i} = `{name}`" for i, name in enumerate(labels))
    if trained.causal_lm:
        words = ", ".join(f"`{w}`" for w in trained.objective.label_words)
        return f"{named}, answered by the words {words} after the prompt `{trained.objective.prompt!r}`"
    return named


def _classifier_load_snippet(base: str, merge: bool, id2label: dict[int, str], pad_token_id: int) -> str:
    if merge:
        return """from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

model = AutoModelForSequenceClassification.from_pretrained("PATH")
tokenizer = AutoTokenizer.from_pretrained("PATH")
classify = pipeline("text-classification", model=model, tokenizer=tokenizer)"""
    return f"""from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

base = AutoModelForSequenceClassification.from_pretrained(
    "{base}", num_labels={len(id2label)}, id2label={id2label!r}, label2id={ {v: k for k, v in id2label.items()}!r},
    pad_token_id={pad_token_id})
model = PeftModel.from_pretrained(base, "PATH").eval()
tokenizer = AutoTokenizer.from_pretrained("PATH")"""


def _causal_load_snippet(base: str, merge: bool) -> str:
    model = (
        'model = AutoModelForCausalLM.from_pretrained("PATH")'
        if merge
        else f'model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base}"), "PATH").eval()'
    )
    return f"""{"" if merge else "from peft import PeftModel" + chr(10)}from transformers import AutoModelForCausalLM, AutoTokenizer

{model}
tokenizer = AutoTokenizer.from_pretrained("PATH")
prompt = tokenizer.apply_chat_template([{{"role": "user", "content": "..."}}], add_generation_prompt=True, return_tensors="pt")
answer = model.generate(prompt, max_new_tokens=32, do_sample=False)"""
