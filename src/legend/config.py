"""Experiment config: nested pydantic models, loaded from TOML plus dotted command-line overrides.

Every field carries its help text once (``description``); ``legend run --help`` and the config reference
(docs/config.md) are both made from the same fields. Validation happens once, at load.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from legend.errors import LegendError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    name: str = Field("minilm-l6", description="'minilm-l6', 'smollm2-135m', a local model directory or a hub id")
    dropout: float | None = Field(
        0.0, ge=0, lt=1, description="set every dropout rate of the pre-trained model to this (None keeps the model's own)"
    )
    quantize: Literal["none", "4bit", "8bit"] = Field(
        "none",
        description="QLoRA on a CUDA GPU: the frozen base model's block weights in 4-bit NF4 (double quantisation) or 8-bit through "
        "bitsandbytes (pip install 'legend[gpu]'), LoRA trained over them; LoRA strategies that leave the base weights alone",
    )


class DataConfig(Section):
    task: str = Field(
        "sst2",
        description="'sst2', 'agnews', 'qnli', 'custom' (then set text_columns and label_column), or 'instructions' (open "
        "instruction/response data in data.path; data.format='instruct')",
    )
    format: Literal["classification", "instruct"] = Field(
        "classification",
        description="what the model learns: 'classification' (a classifier head on the labels) or 'instruct' (a causal LM trained on "
        "prompt/response pairs, loss on the response only)",
    )
    template: Literal["auto", "chat", "plain"] = Field(
        "auto",
        description="instruct: how a conversation becomes text: the tokenizer's 'chat' template, the 'plain' one (turns as paragraphs, "
        "then 'Answer:'), or 'auto' (chat where the tokenizer has one)",
    )
    prompt: str = Field("", description="instruct, label tasks: the user's turn, with {text} (and {text_pair}) in it; default per task")
    label_words: list[str] = Field(
        default_factory=list,
        description="instruct, label tasks: the answer for each class in class order (their first tokens must differ); default per task",
    )
    instruction_column: str = Field("instruction", description="instructions: column of the instruction (Alpaca's name)")
    input_column: str = Field(
        "input", description="instructions: optional column of the instruction's input, appended to it after a blank line"
    )
    output_column: str = Field("output", description="instructions: column of the reference response")
    messages_column: str = Field(
        "messages",
        description="instructions: chat-style column of {role, content} lists, used instead of the three above where present (the last "
        "assistant turn is the response)",
    )
    path: str = Field("", description="folder with train and test files (.tsv or .csv); default ../shared/data/<task>")
    hub_id: str = Field("", description="a Hugging Face hub dataset id to use instead of path (needs network)")
    hub_config: str = Field("", description="configuration name of the hub dataset, e.g. 'sst2' for 'nyu-mll/glue'")
    train_split: str = Field("train", description="split (file stem) to train on")
    test_split: str = Field("test", description="split (file stem) to evaluate on")
    text_columns: list[str] = Field(default_factory=list, description="one column, or two for sentence pairs; default from the task")
    label_column: str = Field("label", description="column holding the class label")
    labels: list[str] = Field(default_factory=list, description="label values in class order; default from the task, else sorted")
    max_length: int = Field(
        64, gt=0, description="truncate each example to this many tokens, prompt and response together (batches are padded dynamically)"
    )
    train_size: int = Field(0, ge=0, description="use a seeded random subset of this many training examples (0 = all)")
    test_size: int = Field(0, ge=0, description="evaluate on the first this many test examples (0 = all)")
    val_size: int = Field(
        0,
        ge=0,
        description="hold out this many training examples (stratified by label, seeded) as a validation split, before partitioning: "
        "targets and tuning are then judged on it (0 = none)",
    )
    partition: Literal["iid", "dirichlet"] = Field("dirichlet", description="how training data is split over clients")
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration over labels: smaller is more non-IID")
    min_partition_size: int = Field(10, ge=1, description="every client gets at least this many examples")


class LoraConfig(Section):
    r: int = Field(8, gt=0, description="LoRA rank (the largest per-device rank for hetlora and flexlora)")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha; the adapter is scaled by alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA input")
    target_modules: list[str] = Field(
        default_factory=list, description="linear layers inside each block to adapt; default per architecture (PEFT's table)"
    )
    init: Literal["default", "federa"] = Field(
        "default",
        description="LoRA initialisation: 'default' (PEFT's: A random, B = 0) or 'federa' (A, B from the SVD of W, residual kept frozen)",
    )
    top_blocks: int = Field(
        0,
        ge=0,
        description="LoRA on the top this many blocks only, for every LoRA strategy (0 = every block); LEGEND: its global depth unless "
        "legend.max_depth is set",
    )


class AdapterConfig(Section):
    size: int = Field(
        16, gt=0, description="bottleneck width of the adapter after each block (strategy 'adapter'; 16 on MiniLM is about LoRA r=8's size)"
    )


class HetLoraConfig(Section):
    r_min: int = Field(
        2,
        gt=0,
        description="HetLoRA and FlexLoRA: smallest per-device rank; they rank devices by their estimated speed "
        "between it and lora.r (LEGEND's deepest-block rank is legend.r_min)",
    )
    penalty: float = Field(
        0.01, ge=0, description="HetLoRA: lambda of the local regulariser lambda * sum ||B[:, gamma r:]|| ||A[gamma r:, :]||"
    )
    gamma: float = Field(
        0.99, gt=0, lt=1, description="HetLoRA: decay of rank self-pruning: a device whose tail norm shrank keeps floor(gamma r) ranks"
    )


class FedProxConfig(Section):
    mu: float = Field(
        0.01, ge=0, description="FedProx: weight of the proximal term mu/2 ||w - w_global||^2 in each local step's loss (0 = FedIT)"
    )


class LegendConfig(Section):
    ranks: Literal["linear", "geometric", "uniform"] = Field(
        "geometric", description="LEGEND: shape of the global rank ramp from r_min (deepest LoRA block) to r_max (top block)"
    )
    r_min: int = Field(2, gt=0, description="LEGEND: rank of the deepest LoRA block")
    r_max: int = Field(16, gt=0, description="LEGEND: rank of the top block")
    max_depth: int = Field(
        0, ge=0, description="LEGEND: LoRA blocks of the global model, counted from the output (0 = the top two thirds, rounded up)"
    )
    slack: float = Field(0.2, ge=0, description="LEGEND: target round time T* = slowest sampled device's depth-1 time x (1 + slack)")
    scaling: Literal["uniform", "rank"] = Field(
        "uniform",
        description="LEGEND: LoRA scaling per block: 'uniform' = lora.alpha / lora.r in every block (FedIT's), 'rank' = lora.alpha / r_l "
        "(PEFT's)",
    )
    rank_cap: bool = Field(False, description="LEGEND: a device may also cap its ranks (nested truncation) to go deeper within T*")
    replan_every: int = Field(1, gt=0, description="LEGEND: refresh the capacity estimates the planner uses every this many rounds")
    planner: Literal["depth", "joint", "ranks", "global"] = Field(
        "depth",
        description="LEGEND: per device, 'depth' = the deepest top-block region within T* (ranks global), 'joint' = depth and ranks "
        "per block by worth per second within a planner-chosen deadline, 'ranks' = the joint planner at the global "
        "depth (ranks only), 'global' = every device trains the whole global layout (docs/legend.md)",
    )
    depth_decay: float = Field(0.6, gt=0, le=1, description="LEGEND joint planner: worth of a block relative to the block above it (gamma)")
    rank_scale: float = Field(
        4.0, gt=0, description="LEGEND joint planner: rank at which a block's worth reaches 1 - 1/e of its most (rho)"
    )
    rank_by_block: list[int] = Field(
        default_factory=list,
        description="LEGEND: the global ranks per block, input first (e.g. [0, 0, 2, 4, 8, 16]); empty = the ramp of "
        "legend.ranks from r_min to r_max over max_depth blocks",
    )
    download: Literal["all", "region"] = Field(
        "region",
        description="LEGEND: what a device downloads: 'all' = every global adapter (it applies those below its region, frozen), "
        "'region' = its own region and the head only (zero adapters below it)",
    )
    weights: Literal["samples", "samples_steps"] = Field(
        "samples",
        description="LEGEND aggregation: each coordinate's mean over the devices that trained it, weighted by samples n_k "
        "or by samples x local steps run n_k t_k",
    )


class StrategyConfig(Section):
    name: str = Field("fedit", description="federated algorithm: see `legend strategies`")


class FlConfig(Section):
    num_clients: int = Field(20, gt=0, description="simulated clients (devices)")
    clients_per_round: int = Field(4, gt=0, description="clients sampled each round")
    rounds: int = Field(30, gt=0, description="communication rounds")
    wire_dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="dtype of tensors on the wire, both directions")
    max_update_norm: float = Field(
        0.0,
        ge=0,
        description="reject a client update that moved further than this (L2 over its tensors) from what it was sent (0 = no limit)",
    )
    min_clients: int = Field(
        1, gt=0, description="skip aggregation (keep the global model) when fewer valid updates than this arrive in a round"
    )
    aggregator: Literal["mean", "trimmed_mean", "median"] = Field(
        "mean",
        description="how coordinate-mean strategies combine updates: the sample-weighted 'mean', or per coordinate (unweighted) the "
        "'trimmed_mean' or 'median', which poisoned updates move less",
    )
    trim_fraction: float = Field(
        0.2,
        ge=0,
        lt=0.5,
        description="trimmed_mean: share of the updates covering a coordinate dropped at each end (floor of it), e.g. 0.2 of 8 drops 1 "
        "lowest and 1 highest",
    )
    min_coverage: int = Field(
        0,
        ge=0,
        description="coverage guard: cut each round's plans so that every coordinate the server updates is trained by at least "
        "this many of the round's devices, and sample at least this many (0 or 1 = off; docs/deployment.md)",
    )


class TrainConfig(Section):
    lr: float | None = Field(
        None, gt=0, description="local AdamW learning rate; default: the strategy's (LoRA 3e-3, full fine-tuning 5e-5)"
    )
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="learning rate over rounds: constant, or cosine decay to lr_min_ratio * lr at the last round"
    )
    lr_min_ratio: float = Field(0.1, ge=0, le=1, description="final learning rate as a share of lr, for the cosine schedule")
    warmup_rounds: int = Field(
        0,
        ge=0,
        description="linear warm-up: round r <= warmup_rounds trains at lr * r / (warmup_rounds + 1), "
        "then lr_schedule runs over the remaining rounds (Hugging Face's warmup_steps, counted in rounds)",
    )
    logit_adjustment: float = Field(
        0.0,
        ge=0,
        description="classification: local training adds this times the log of the client's own label frequencies "
        "(add-one smoothed) to the logits (balanced softmax, as FedLC calibrates under label skew); "
        "evaluation reads the plain logits (0 = off)",
    )
    batch_size: int = Field(16, gt=0, description="local batch size")
    local_steps: int = Field(10, ge=0, description="local optimizer steps per round (ignored when local_epochs > 0)")
    local_epochs: int = Field(0, ge=0, description="local epochs per round instead of a fixed step count")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    head_lr_ratio: float = Field(
        1.0,
        ge=0,
        description="the classification head's learning rate as a share of train.lr (0: the head keeps its random "
        "initialisation, as FedBABU does: under label skew each client would otherwise pull it to its own labels)",
    )
    max_grad_norm: float = Field(1.0, ge=0, description="clip the local gradient norm (0 = off)")
    group_by_length: bool = Field(
        True,
        description="sort each window of 50 batches by length before cutting it, then shuffle the batches, as Hugging Face's Trainer "
        "does: less padding (off: random batches)",
    )
    split_by_length: bool = Field(
        True,
        description="compute each batch as pieces of similar length (its rows sorted, cut where the padding saved outweighs another "
        "pass), their gradients summed into one step: the same step as the whole batch, with less padding",
    )


class EvalConfig(Section):
    every: int = Field(1, gt=0, description="evaluate the global model every this many rounds (and after the last)")
    batch_size: int = Field(128, gt=0, description="evaluation batch size")
    target_accuracy: float = Field(0.8, ge=0, le=1, description="accuracy that defines time_to_target_s and bytes_to_target")
    stop_at_target: bool = Field(
        False,
        description="stop once the target is held: two evaluations in a row at or above eval.target_accuracy (on the validation "
        "split where data.val_size holds one out), as early stopping does; fl.rounds stays the limit",
    )
    max_new_tokens: int = Field(
        32,
        gt=0,
        description="instructions: tokens generated (greedy) per test prompt, scored by normalised exact match against the reference",
    )


class DeviceProfile(Section):
    """One device class: sustained compute, memory and network, from its published figures."""

    peak_flops: float = Field(..., gt=0, description="peak FP32 FLOP/s of the processor that trains (datasheet)")
    efficiency: float = Field(
        ..., gt=0, le=1, description="share of peak sustained in training (sustained FLOP/s = peak_flops * efficiency)"
    )
    memory_gb: float = Field(..., gt=0, description="memory available for training, GB (device memory less the OS and runtime)")
    uplink_mbps: float = Field(..., gt=0, description="median uplink bandwidth, Mbit/s")
    downlink_mbps: float = Field(..., gt=0, description="median downlink bandwidth, Mbit/s")
    bandwidth_sigma: float = Field(
        0.5, ge=0, description="per-round fluctuation: bandwidth = median * exp(N(0, sigma^2)), drawn per device and round"
    )
    availability: float = Field(1.0, gt=0, le=1, description="probability that the device can take part in a given round")
    storage_gb: float = Field(
        0.0, ge=0, description="storage the device may fill with kept activations (devices.activation_cache), GB (0 = none)"
    )
    storage_mb_s: float = Field(250.0, gt=0, description="sequential read bandwidth of that storage, MB/s")
    source: str = Field("", description="where the figures come from")

    @property
    def flops(self) -> float:
        """Sustained training FLOP/s."""
        return self.peak_flops * self.efficiency


class FleetEntry(Section):
    profile: str = Field(..., description="device class: a catalog name (see `legend devices`) or one of devices.profiles")
    count: int = Field(..., gt=0, description="how many devices of this class")


class DevicesConfig(Section):
    fleet: str | list[FleetEntry] = Field(
        "jetson-mix-80",
        description="a named fleet ('jetson-mix-80', or any profile name for a fleet of that class alone) or a list of {profile, count}",
    )
    profiles: dict[str, DeviceProfile] = Field(
        default_factory=dict, description="your own device classes, by name, e.g. [devices.profiles.my-phone] with the fields below"
    )
    deadline_s: float = Field(
        0.0, ge=0, description="round deadline in virtual seconds: devices slower than this are dropped from the round (0 = wait for all)"
    )
    estimate_noise: float = Field(
        0.1, ge=0, description="capacity estimation: the server's prior is each profile figure times exp(N(0, noise^2)), per client"
    )
    estimate_ema: float = Field(
        0.5, gt=0, le=1, description="capacity estimation: weight of a device's newest report in the moving average that replaces the prior"
    )
    activation_cache: bool = Field(
        False,
        description="each device keeps its examples' hidden states at the lower edge of the global LoRA region (float16, within its "
        "profile's storage_gb) and is charged the frozen blocks' forward once per example, then a read at storage_mb_s (docs/devices.md)",
    )


class EngineConfig(Section):
    threads: int = Field(0, ge=0, description="torch CPU threads (0 = all cores)")
    cache_mb: float = Field(
        1024.0,
        ge=0,
        description="memory for the frozen-prefix cache: each example's hidden states below the lowest block any client trains, computed "
        "once (0 = off)",
    )
    cache_device_mb: float = Field(
        2048.0,
        ge=0,
        description="on a GPU: the frozen-prefix cache's first tier, in GPU memory (read without a copy); "
        "engine.cache_mb of host memory after it (ignored on the CPU)",
    )
    cache_dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="dtype the frozen-prefix cache stores hidden states in"
    )
    cache_spill_dir: str = Field(
        "", description="folder for frozen-prefix cache entries evicted from memory (empty: evicted entries are recomputed)"
    )
    device: str = Field(
        "auto",
        description="where the shared model trains and evaluates: 'auto' (the first CUDA GPU torch sees, else the CPU), 'cpu', 'cuda' or "
        "'cuda:N'; states, aggregation and the wire stay on the CPU",
    )
    precision: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="dtype of the matrix multiplies in forward and backward passes: 'auto' = bfloat16 where the GPU or CPU multiplies it "
        "natively (a CUDA GPU with bfloat16, a CPU with AVX-512 BF16 or AMX), else float32; bfloat16 autocasts them (parameters, "
        "optimizer and loss stay float32); float16 adds loss scaling; float32 reproduces runs from before auto was the default",
    )
    client_state_mb: float = Field(
        64.0,
        ge=0,
        description="memory for the most recently updated clients' own tensors (FedSA-LoRA's B); every client's are in a file in the run "
        "folder's client_state/",
    )
    parallel_clients: int = Field(
        1,
        ge=1,
        description="the embedded engine trains this many sampled clients at once: their LoRA adapters side by side on the one "
        "shared base model, one forward and backward pass per step (same updates as one by one; LoRA strategies only)",
    )


class FaultsConfig(Section):
    """Device faults the embedded engine simulates, drawn per (seed, round, client)."""

    dropout: float = Field(
        0.0, ge=0, lt=1, description="probability that a sampled device drops out after receiving its plan and sends nothing back"
    )
    crash: float = Field(
        0.0, ge=0, lt=1, description="probability that a sampled device's local training crashes at a random step (nothing is sent back)"
    )
    malicious: float = Field(
        0.0,
        ge=0,
        le=1,
        description="probability that a sampled device attacks in a round: it sends a poisoned but well-formed update (faults.attack)",
    )
    attack: Literal["label_flip", "sign_flip", "scale"] = Field(
        "sign_flip",
        description="what an attacker does: trains on flipped labels (C-1-y), sends the opposite of its change, or its change times "
        "faults.attack_scale",
    )
    attack_scale: float = Field(10.0, description="the factor a 'scale' attacker multiplies its change by")


class PrivacyConfig(Section):
    """Client-level differential privacy (DP-FedAvg with fixed clipping; docs/reliability.md)."""

    clip_norm: float = Field(
        0.0, ge=0, description="clip each sound update's change (L2 over its tensors) to this norm; updates then count equally (0 = off)"
    )
    noise_multiplier: float = Field(
        0.0, ge=0, description="Gaussian noise on the aggregate: std = noise_multiplier * clip_norm / (updates carrying the coordinate)"
    )
    delta: float = Field(1e-5, gt=0, lt=1, description="the delta at which the run's epsilon is reported")


class FlowerConfig(Section):
    clock: Literal["virtual", "measured"] = Field(
        "virtual",
        description="round times on Flower: 'virtual' from the device profiles, as in the embedded engine (nodes on one machine stand in "
        "for the fleet), 'measured' from the nodes' own compute and transfer times",
    )
    round_timeout_s: float = Field(
        600.0, gt=0, description="a node that has not answered this many seconds after its job went out is lost for the round"
    )
    connect_timeout_s: float = Field(
        120.0, gt=0, description="how long the ServerApp waits at start for a SuperNode of every client to connect"
    )
    secure_aggregation: bool = Field(
        False,
        description="Flower's SecAgg+: the ServerApp receives only the sum of the round's updates (each padded to the global layout, with "
        "the per-coordinate weight LEGEND's masked average needs); for strategies that average coordinates, fl.aggregator='mean', no DP",
    )
    secure_clip: float = Field(
        8.0,
        ge=1,
        description="SecAgg+ clipping range: every number a node adds to the secure sum must lie in [-secure_clip, secure_clip] "
        "(a node whose update leaves it refuses to send, and is lost); smaller is finer (quantised to 2^31 / 2^ceil(log2 clients) levels)",
    )
    secure_shares: float = Field(
        1.0,
        gt=0,
        description="SecAgg+ num_shares: each node's secrets are shared with this fraction of the round's nodes (<= 1), or this many (> 1, "
        "odd, >= 3)",
    )
    secure_threshold: float = Field(
        0.5,
        gt=0,
        le=1,
        description="SecAgg+ reconstruction threshold as a fraction of the shares: more is more private, fewer lost nodes tolerated",
    )
    secure_min_coverage: int = Field(
        2,
        ge=1,
        description="with secure_aggregation: every coordinate the server updates is trained by at least this many of "
        "the round's devices, so no sum is one device's value (fl.min_coverage's guard; 3 recommended, 1 = off)",
    )


class Config(Section):
    seed: int = Field(0, description="seeds data split, client sampling, initialisation and local training")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    hetlora: HetLoraConfig = Field(default_factory=HetLoraConfig)
    fedprox: FedProxConfig = Field(default_factory=FedProxConfig)
    legend: LegendConfig = Field(default_factory=LegendConfig)
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    fl: FlConfig = Field(default_factory=FlConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    devices: DevicesConfig = Field(default_factory=DevicesConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    faults: FaultsConfig = Field(default_factory=FaultsConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    flower: FlowerConfig = Field(default_factory=FlowerConfig)

    @property
    def hetlora_r_min(self) -> int:
        """HetLoRA's and FlexLoRA's smallest per-device rank: hetlora.r_min, never above lora.r (a small lora.r needs no r_min
        of its own)."""
        return min(self.hetlora.r_min, self.lora.r)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a TOML file (or the defaults when path is None), apply ``a.b=value`` overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise LegendError(f"config file {path} not found: pass the path of a .toml file, e.g. configs/quickstart.toml")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise LegendError(f"config file {path} is not valid TOML: {exc}") from None
    for item in overrides:
        _apply_override(raw, item)
    return validate_config(raw)


def override_config(config: Config, overrides: list[str]) -> Config:
    """``config`` with ``a.b=value`` overrides applied, validated again."""
    raw = config.model_dump()
    for item in overrides:
        _apply_override(raw, item)
    return validate_config(raw)


# Keys that moved (old section, key) -> (new section, key): a config that still writes the old one is refused with the new
# name, and a checkpoint written before the move is read with its value under the new one (``renamed_keys``).
RENAMED = {("lora", "r_min"): ("hetlora", "r_min")}


def renamed_keys(raw: dict[str, Any]) -> dict[str, Any]:
    """A config dumped before keys moved (a checkpoint's, an export's), with each moved value under its new name."""
    out = {section: dict(values) if isinstance(values, dict) else values for section, values in raw.items()}
    for (section, key), (new_section, new_key) in RENAMED.items():
        if isinstance(out.get(section), dict) and key in out[section]:
            out.setdefault(new_section, {})[new_key] = out[section].pop(key)
    return out


def validate_config(raw: dict[str, Any]) -> Config:
    for (section, key), (new_section, new_key) in RENAMED.items():
        if isinstance(raw.get(section), dict) and key in raw[section]:
            raise LegendError(
                f"config: {section}.{key} moved to {new_section}.{new_key}: write {new_section}.{new_key} "
                f"({Config.model_fields[new_section].annotation.model_fields[new_key].description})"
            )
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        raise LegendError(_describe(exc.errors()[0])) from None
    if config.legend.r_min > config.legend.r_max:
        raise LegendError(
            f"config: legend.r_min ({config.legend.r_min}) exceeds legend.r_max ({config.legend.r_max}): the ranks grow toward the output"
        )
    if config.privacy.noise_multiplier > 0 and config.privacy.clip_norm <= 0:
        raise LegendError("config: privacy.noise_multiplier needs privacy.clip_norm > 0: the noise is scaled to the clipping norm")
    if config.train.warmup_rounds >= config.fl.rounds:
        raise LegendError(
            f"config: train.warmup_rounds ({config.train.warmup_rounds}) must be below fl.rounds ({config.fl.rounds}): "
            "the warm-up would take every round; shorten it"
        )
    if config.train.logit_adjustment > 0 and config.data.format == "instruct":
        raise LegendError(
            "config: train.logit_adjustment needs data.format='classification': an instruct model has no class logits; set it to 0"
        )
    if config.fl.clients_per_round > config.fl.num_clients:
        raise LegendError(
            f"config: fl.clients_per_round ({config.fl.clients_per_round}) exceeds fl.num_clients "
            f"({config.fl.num_clients}): lower it or add clients"
        )
    _check_coverage(config)
    return config


def _check_coverage(config: Config) -> None:
    """A secure round sums at least two devices, and every round at least as many as the coverage guard asks for."""
    fl, flower = config.fl, config.flower
    fewest = max(2, flower.secure_min_coverage, fl.min_coverage) if flower.secure_aggregation else fl.min_coverage
    if fl.clients_per_round < fewest:
        what = (
            "the fewest devices a secure round sums (two, and flower.secure_min_coverage and fl.min_coverage)"
            if flower.secure_aggregation
            else "fl.min_coverage, the devices that must train each coordinate the server updates"
        )
        raise LegendError(f"config: fl.clients_per_round ({fl.clients_per_round}) is below {fewest}, {what}: raise fl.clients_per_round")
    if flower.secure_aggregation and fl.min_clients < 2:
        raise LegendError(
            f"config: fl.min_clients ({fl.min_clients}) would let a secure round aggregate one device's update, which the sum reveals: "
            "set fl.min_clients=2 or more"
        )


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise LegendError(f"override '{item}' is not key=value: write it like fl.rounds=5")
    *parents, leaf = key.strip().split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise LegendError(f"override '{item}': {part} is a value, not a section")
    node[leaf] = _parse_value(text.strip())


def _parse_value(text: str) -> Any:
    """A TOML literal (5, 0.1, true, [1, 2], "x"); anything else is taken as a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _describe(error: dict[str, Any]) -> str:
    key = _dotted(error["loc"])
    if error["type"] == "extra_forbidden":
        section = _section_of(error["loc"][:-1])
        allowed = ", ".join(section.model_fields)
        where = _dotted(error["loc"][:-1]) or "the top level"
        return f"config: unknown key '{key}'; allowed in {where}: {allowed}"
    return f"config: {key}: {error['msg']} (got {error.get('input')!r})"


def _dotted(loc: tuple) -> str:
    """A key path on one line (a key may hold a newline or other control characters)."""
    return ".".join(str(part) for part in loc).encode("unicode_escape").decode()


def _section_of(loc: tuple) -> type[BaseModel]:
    model: type[BaseModel] = Config
    for part in loc:
        annotation = model.model_fields[part].annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
    return model


def reference_markdown() -> str:
    """The config reference as a Markdown table, made from the fields' own help text."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for name, field in Config.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            for key, sub in annotation.model_fields.items():
                default = sub.default_factory() if sub.default_factory else sub.default
                lines.append(f"| `{name}.{key}` | `{default!r}` | {sub.description} |")
        else:
            lines.append(f"| `{name}` | `{field.default!r}` | {field.description} |")
    for key, sub in DeviceProfile.model_fields.items():
        default = "required" if sub.is_required() else repr(sub.default)
        lines.append(f"| `devices.profiles.<name>.{key}` | `{default}` | {sub.description} |")
    return "\n".join(lines) + "\n"
