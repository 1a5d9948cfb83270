"""Tasks: a9a logistic regression, Fashion-MNIST CNN, digits MLP, synthetic quadratics of any
dimension, and data partitioners.

Importing this package registers "a9a-logreg", "fmnist-cnn", "digits-mlp" and "quadratic" in
TASKS; data is loaded (or generated) only when a task is built.
"""

from byzps.common.tasks import a9a, digits, fmnist, quadratic
from byzps.common.tasks.base import TASKS, Task
from byzps.common.tasks.factory import build_task
from byzps.common.tasks.partition import PARTITIONERS, partition
from byzps.common.tasks.spec import DataSpec

__all__ = [
    "PARTITIONERS",
    "TASKS",
    "DataSpec",
    "Task",
    "a9a",
    "build_task",
    "digits",
    "fmnist",
    "partition",
    "quadratic",
]
