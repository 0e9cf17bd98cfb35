"""legend: federated fine-tuning of pre-trained language models with adapters on heterogeneous devices."""

__version__ = "0.1.0"
