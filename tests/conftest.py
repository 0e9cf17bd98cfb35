"""Shared fixtures: the real data in ../shared/data and a tiny, fast experiment config."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto`: one worker per core and one more. The Flower deployment tests mostly wait (Flower's 3-second polls,
    a process start per message: a deployment takes ~100 s and ~30 s of CPU), on whichever workers get them, side by
    side (each checks only its own processes); the spare worker trains meanwhile."""
    return len(os.sched_getaffinity(0)) + 1


# Left out of the fast subset (`python -m pytest -q -m "not slow"`, under 2 CPU-minutes): each runs whole experiments
# (several, or with resumes, kills or subprocesses), a Flower deployment, or a fresh interpreter that imports torch. The
# fast subset keeps every strategy's formula and bookkeeping tests, config and error handling, data, layouts, aggregation
# and a few single runs end to end; CI runs everything (`python -m pytest -q`).
SLOW = {
    "test_batching.py::test_pieces_give_the_global_adapter_of_whole_batches_and_cost_less",
    "test_batching.py::test_a_decoders_pieces_average_over_the_whole_batchs_response_tokens",
    "test_held_crossing.py::test_a_run_that_stops_at_its_target_ends_on_the_confirming_round_and_resumes_no_further",
    "test_activation_cache.py::test_a_device_is_charged_the_frozen_blocks_once_then_a_read_and_the_model_is_the_same",
    "test_activation_cache.py::test_a_resumed_run_charges_what_an_uninterrupted_one_does",
    "test_client_store.py::test_a_fedsa_checkpoint_from_before_client_state_resumes_as_the_uninterrupted_run",
    "test_client_store.py::test_fedsa_with_every_b_on_disk_gives_the_in_memory_run_and_resumes_from_its_files",
    "test_compare.py::test_compare_refuses_a_folder_of_another_comparison",
    "test_compare.py::test_compare_writes_a_report_with_tables_plots_and_the_config_and_report_rebuilds_it",
    "test_compare.py::test_tune_picks_each_strategys_best_on_validation_and_compare_applies_it",
    "test_devices.py::test_a_plan_too_big_for_the_device_is_one_error_line",
    "test_devices.py::test_deadline_drops_devices_from_the_aggregate",
    "test_devices.py::test_each_device_is_charged_the_compute_of_its_own_layout_in_a_real_run",
    "test_engine.py::test_a_head_learning_rate_of_zero_keeps_the_head_and_trains_the_adapters",
    "test_engine.py::test_a_validation_split_is_scored_beside_the_test_split_and_judges_the_target",
    "test_engine.py::test_run_writes_metrics_summary_and_counts_bytes[fedavg-full]",
    "test_engine.py::test_same_seed_same_result_and_other_seed_differs",
    "test_engine.py::test_sigkill_then_resume_gives_the_uninterrupted_summary",
    "test_engine.py::test_training_changes_the_global_adapter",
    "test_export.py::test_a_personalised_run_needs_a_client_that_trained",
    "test_export.py::test_evaluate_on_an_export_prints_the_runs_final_accuracy",
    "test_export.py::test_export_loads_with_transformers_and_peft_alone_and_equals_legend",
    "test_export.py::test_predict_gives_each_input_a_label_and_probabilities",
    "test_faults.py::test_a_corrupt_update_is_rejected_and_the_global_model_stays_finite",
    "test_faults.py::test_a_truncated_checkpoint_is_refused_in_one_line",
    "test_faults.py::test_crashes_inside_local_training_lose_those_updates_only",
    "test_faults.py::test_sigkill_during_a_checkpoint_write_then_resume_gives_the_uninterrupted_summary",
    "test_faults.py::test_thirty_percent_dropout_still_trains_and_is_counted",
    "test_fedprox.py::test_fedprox_with_mu_zero_is_fedit",
    "test_federa.py::test_legend_with_federa_init_trains_per_block_ranks_end_to_end",
    "test_fedra.py::test_fedra_instruction_tunes_a_decoder",
    "test_fedra.py::test_fedra_through_flower_with_secure_sums_gives_the_embedded_run",
    "test_flower.py::test_a_supernode_killed_during_a_round_is_lost_and_the_run_finishes",
    "test_flower.py::test_deploy_local_gives_the_embedded_result_and_stops_its_processes",
    "test_flower.py::test_deploy_refuses_a_node_count_other_than_the_clients_in_one_line",
    "test_flower.py::test_flowers_simulation_runtime_gives_the_embedded_result",
    "test_flower.py::test_secure_aggregation_gives_the_embedded_summary",
    "test_heterogeneous_ranks.py::test_each_device_sends_and_receives_its_own_rank",
    "test_instruct.py::test_a_causal_lm_run_exports_an_adapter_and_a_merged_model_that_transformers_and_peft_load_alone",
    "test_instruct.py::test_every_strategy_runs_two_rounds_on_a_decoder_and_never_sends_the_embeddings_or_the_lm_head",
    "test_instruct.py::test_open_instruction_data_is_scored_by_generated_answers",
    "test_legend.py::test_legend_run_with_the_joint_planner_trains_per_device_depths_and_ranks",
    "test_legend.py::test_plan_command_gives_faster_devices_deeper_adapters_and_a_tighter_round_than_fedit",
    "test_legend.py::test_region_download_counts_only_the_region_down_in_a_real_run",
    "test_models.py::test_smollm2_from_its_gguf_trains_a_round_of_fedit",
    "test_parallel_clients.py::test_a_group_of_one_is_exactly_one_by_one",
    "test_parallel_clients.py::test_clients_that_crash_or_flip_labels_train_alone_and_the_run_is_unchanged",
    "test_parallel_clients.py::test_four_clients_at_once_give_the_global_adapter_of_one_by_one",
    "test_parallel_clients.py::test_instruction_tuning_of_a_decoder_in_groups",
    "test_precision.py::test_a_half_precision_round_ends_near_the_float32_adapter",
    "test_prefix_cache.py::test_a_device_tier_before_host_memory_leaves_the_result_bit_identical",
    "test_prefix_cache.py::test_cached_and_uncached_training_give_the_same_adapter_after_a_round",
    "test_prefix_cache.py::test_eviction_and_spilling_leave_the_result_bit_identical",
    "test_robust.py::test_attackers_send_their_change_flipped_or_scaled_and_are_marked",
    "test_robust.py::test_label_flip_attackers_train_on_the_other_labels",
    "test_secure_aggregation.py::test_the_coverage_guard_keeps_one_devices_rank_rows_out_of_the_secure_sum_and_gives_the_embedded_summary",
    "test_strategies.py::test_strategy_sends_its_wire_format_and_resumes",
    "test_validation.py::test_min_clients_skips_a_round_with_too_few_updates_and_a_generous_limit_rejects_nothing",
    "test_validation.py::test_oversized_updates_are_rejected_and_the_rounds_keep_the_global_model",
}


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items) -> None:
    """Marks the tests in SLOW `slow`: a test by its name (every parameter), or by its name and parameters
    (tests/test_fast_subset.py checks that every entry names a test that exists)."""
    for item in items:
        if f"{item.path.name}::{item.originalname}" in SLOW or f"{item.path.name}::{item.name}" in SLOW:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Every test on one thread, as the runs it starts (engine.threads=1): with a worker per core and one more, a second
    thread per worker only contends (an SVD of a 384 x 384 weight took 1.1 s on two busy threads, 0.07 s on one)."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def quiet_libraries():
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


@pytest.fixture(scope="session")
def tiny_decoder(tmp_path_factory) -> Path:
    """SmolLM2-135M cut to its first 3 blocks (real pre-trained weights, its tokenizer and chat template): a decoder
    small enough for unit tests of the causal-LM path."""
    from legend.models.resolve import resolve_model

    source = Path(resolve_model("smollm2-135m"))
    folder = tmp_path_factory.mktemp("tiny-decoder")
    for file in source.iterdir():
        if file.name != "config.json":
            (folder / file.name).symlink_to(file)
    config = json.loads((source / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    return folder


def tiny_instruct_overrides(decoder: Path, **extra) -> list[str]:
    """The tiny run as instructions on the tiny decoder (SST-2 answered "negative" / "positive")."""
    return tiny_overrides(
        **{"model.name": f'"{decoder}"', "data.format": '"instruct"', "data.train_size": 200, "data.test_size": 32, **extra}
    )


def in_fresh_process(script: str, args: list[str], payload) -> dict:
    """Run ``python -c script args`` offline with ``payload`` as JSON on stdin, as a user's own process would load an export
    (nothing of this one's imports or state): the JSON object on its last line of output."""
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        check=False,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def tiny_overrides(**extra) -> list[str]:
    """A real MiniLM run small enough for a unit test: 400 training rows, 64 test rows, 2 rounds."""
    settings = {
        "data.path": f'"{DATA / "sst2"}"',
        "data.train_size": 400,
        "data.test_size": 64,
        "data.min_partition_size": 5,
        "fl.num_clients": 4,
        "fl.clients_per_round": 2,
        "fl.rounds": 2,
        "train.local_steps": 2,
        "train.batch_size": 8,
        "engine.threads": 1,
        # float32 whatever engine.precision=auto would pick here: the tests compare paths that agree in exact arithmetic
        # (pieces and whole batches, cached and uncached, grouped clients, exports) at float32's tolerances, and their
        # golden numbers must not depend on the CPU's bfloat16 support; test_precision.py runs bfloat16 and auto
        "engine.precision": '"float32"',
    }
    settings.update(extra)
    return [f"{k}={v}" for k, v in settings.items()]


class NodesInThisProcess:
    """The part of Flower's Grid the runtime and SecAgg+ use, delivering each message to legend's real ClientApp in this
    process (each node with its own persistent Context, as a SuperNode keeps it), and keeping every reply the server gets."""

    def __init__(self, node_configs: dict[int, dict], run_config: dict):
        from flwr.app import Context, RecordDict

        self.run_config = run_config
        self.contexts = {node: Context(1, node, config, RecordDict(), run_config) for node, config in node_configs.items()}
        self.replies, self.received = {}, []

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        from legend.flower.apps import client_app

        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # what the SuperLink does
            delivered = copy.deepcopy(message)  # a node gets its own copy, as over the wire (SecAgg+ sends one content to all)
            self.replies[message.metadata.message_id] = client_app(delivered, self.contexts[message.metadata.dst_node_id])
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, ids):
        replies = [self.replies.pop(i) for i in ids if i in self.replies]
        self.received += replies
        return replies

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))

    def start_node(self, node: int, node_config: dict) -> None:
        from flwr.app import Context, RecordDict

        self.contexts[node] = Context(1, node, node_config, RecordDict(), self.run_config)


@pytest.fixture
def server_identity(monkeypatch):
    """The identity Flower gives a ServerApp's process, which creating a message needs."""
    from flwr.supercore.task_identity import TaskIdentity

    for field in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, field, 1 if field == "_run_id" else 0)
