import numpy as np
import pytest
from tests.conftest import DATA
from transformers import AutoTokenizer

from legend.config import DataConfig
from legend.data.batching import encode
from legend.data.partition import partition_indices, top_up
from legend.data.tasks import load_task
from legend.errors import LegendError
from legend.models.resolve import resolve_model


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model("minilm-l6"))


@pytest.mark.parametrize(("task", "num_labels", "pair"), [("sst2", 2, False), ("agnews", 4, False), ("qnli", 2, True)])
def test_shared_tasks_load_with_class_ids(task, num_labels, pair):
    data = load_task(DataConfig(task=task, path=str(DATA / task)))
    assert len(data.label_names) == num_labels
    assert data.is_pair == pair
    assert set(data.train["label"]) == set(range(num_labels))
    assert len(data.test) == {"sst2": 872, "agnews": 7600, "qnli": 1000}[task]


def test_custom_csv_folder_with_named_columns(tmp_path):
    (tmp_path / "train.csv").write_text('review,stars\n"good, really good",pos\nbad,neg\nfine,pos\n')
    (tmp_path / "test.csv").write_text("review,stars\nawful,neg\n")
    data = load_task(DataConfig(task="custom", path=str(tmp_path), text_columns=["review"], label_column="stars"))
    assert data.label_names == ("neg", "pos")
    assert list(data.train["text"])[0] == "good, really good"
    assert list(data.train["label"]) == [1, 0, 1]


def test_wrong_column_and_unknown_label_are_named(tmp_path):
    (tmp_path / "train.tsv").write_text("text\tlabel\nhello\tyes\n")
    (tmp_path / "test.tsv").write_text("text\tlabel\nbye\tmaybe\n")
    with pytest.raises(LegendError, match="column 'sentence' not in the train split"):
        load_task(DataConfig(task="custom", path=str(tmp_path), text_columns=["sentence"]))
    with pytest.raises(LegendError, match="label 'maybe' in the test split is not one of yes"):
        load_task(DataConfig(task="custom", path=str(tmp_path), text_columns=["text"], labels=["yes"]))
    with pytest.raises(LegendError, match="is not a folder"):
        load_task(DataConfig(task="sst2", path=str(tmp_path / "missing")))


def test_dynamic_padding_and_truncation(tokenizer):
    data = load_task(DataConfig(task="qnli", path=str(DATA / "qnli")))
    split = encode(data.test.select(range(32)), tokenizer, max_length=48)
    assert split.lengths.max() <= 48
    batch = split.batch([0, 1, 2])
    assert batch["input_ids"].shape[1] == split.lengths[[0, 1, 2]].max()  # padded to the longest in the batch only
    assert batch["attention_mask"].sum().item() == split.lengths[[0, 1, 2]].sum()
    assert batch["token_type_ids"].max().item() == 1  # sentence pairs keep their segment ids


@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_partitions_cover_the_data_once_and_repeat_with_the_seed(partition):
    data = load_task(DataConfig(task="agnews", path=str(DATA / "agnews")))
    cfg = DataConfig(partition=partition, alpha=0.3, min_partition_size=20)
    parts = partition_indices(data.train, 10, cfg, seed=3)
    joined = np.concatenate(parts)
    assert len(joined) == len(set(joined.tolist())) == len(data.train)
    assert min(len(p) for p in parts) >= 20
    again = partition_indices(data.train, 10, cfg, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


@pytest.mark.parametrize(("task", "clients", "alpha", "seed"), [("agnews", 20, 0.1, 0), ("sst2", 80, 0.5, 7), ("qnli", 13, 10.0, 2)])
def test_partitions_are_flower_datasets_draws_index_for_index(task, clients, alpha, seed):
    """Our partitioner replaces flwr_datasets' (its import costs ~2.5 s a process) and must draw the same rows."""
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    from legend.data.partition import dirichlet_over_labels, iid_shards

    table = load_task(DataConfig(task=task, path=str(DATA / task))).train
    table = table.add_column("row", list(range(len(table))))
    flower = DirichletPartitioner(clients, partition_by="label", alpha=alpha, min_partition_size=0, self_balancing=False, seed=seed)
    flower.dataset = table
    ours = dirichlet_over_labels(np.asarray(table["label"][:]), clients, alpha, seed)
    for client, rows in enumerate(ours):
        assert rows.tolist() == flower.load_partition(client)["row"][:]
    flower_iid = IidPartitioner(clients)
    flower_iid.dataset = table.shuffle(seed=seed)
    for client, rows in enumerate(iid_shards(len(table), clients, seed)):
        assert rows.tolist() == flower_iid.load_partition(client)["row"][:]


def test_dirichlet_skews_labels_more_at_small_alpha():
    data = load_task(DataConfig(task="sst2", path=str(DATA / "sst2")))
    labels = np.asarray(list(data.train["label"]))

    def mean_majority_share(alpha):
        parts = partition_indices(data.train, 20, DataConfig(alpha=alpha, min_partition_size=10), seed=0)
        assert min(len(p) for p in parts) >= 10
        return np.mean([np.bincount(labels[p], minlength=2).max() / len(p) for p in parts])

    assert mean_majority_share(0.1) > mean_majority_share(10.0) + 0.2


def test_top_up_moves_rows_from_the_largest_clients_only():
    parts = [np.arange(0, 3), np.arange(3, 100), np.arange(100, 101)]
    topped = top_up(parts, 10, np.random.default_rng(0))
    assert [len(p) for p in topped] == [10, 81, 10]
    assert sorted(np.concatenate(topped).tolist()) == list(range(101))
    assert set(parts[0]) <= set(topped[0]) and set(parts[2]) <= set(topped[2])


def test_too_little_data_for_the_minimum_is_one_clear_error():
    data = load_task(DataConfig(task="qnli", path=str(DATA / "qnli")))
    with pytest.raises(LegendError, match="cannot give 1000 clients 10 each"):
        partition_indices(data.train, 1000, DataConfig(), seed=0)


def test_validation_is_a_stratified_seeded_hold_out_of_the_training_data():
    from legend.data.tasks import subsample

    config = DataConfig(task="agnews", path=str(DATA / "agnews"), val_size=1000)
    task = load_task(config)
    split = subsample(task, config, seed=3)
    assert len(split.validation) == 1000 and len(split.train) == len(task.train) - 1000
    held_out = set(split.validation["text"])
    assert not held_out & set(split.train["text"][:5000])  # held out, not copied
    whole = np.bincount(task.train["label"], minlength=4) / len(task.train)
    assert np.abs(np.bincount(split.validation["label"], minlength=4) / 1000 - whole).max() <= 1 / 1000  # label shares kept
    assert list(subsample(task, config, seed=3).validation["text"]) == list(split.validation["text"])  # same seed, same split
    assert list(subsample(task, config, seed=4).validation["text"]) != list(split.validation["text"])
    with pytest.raises(LegendError, match="data.val_size"):
        subsample(task, DataConfig(task="agnews", path=str(DATA / "agnews"), val_size=len(task.train)), seed=0)
