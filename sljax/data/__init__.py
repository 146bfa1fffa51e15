"""Data for split learning: offline data sets, partitions among clients, stacked client batches."""

from sljax.data.clients import ClientData, client_batches, stack_clients
from sljax.data.datasets import (
    Dataset,
    from_arrays,
    load_breast_cancer,
    load_digits,
    load_wine,
    make_mnist1d,
    make_synthetic,
)
from sljax.data.federated import federated_mnist1d, federated_synthetic, power_law_sizes
from sljax.data.maintenance import MaintenanceData, make_maintenance
from sljax.data.partition import dirichlet, iid, label_shards, quantity_skew, vertical_split
from sljax.data.vertical import VerticalDataset, load_breast_cancer_vertical, make_credit_fraud

__all__ = [
    "ClientData",
    "Dataset",
    "MaintenanceData",
    "VerticalDataset",
    "client_batches",
    "dirichlet",
    "federated_mnist1d",
    "federated_synthetic",
    "from_arrays",
    "iid",
    "label_shards",
    "load_breast_cancer",
    "load_breast_cancer_vertical",
    "load_digits",
    "load_wine",
    "make_credit_fraud",
    "make_maintenance",
    "make_mnist1d",
    "make_synthetic",
    "power_law_sizes",
    "quantity_skew",
    "stack_clients",
    "vertical_split",
]
