"""Tasks: a9a logistic regression, Fashion-MNIST CNN, digits MLP, and data partitioners.

Importing this package registers "a9a-logreg", "fmnist-cnn" and "digits-mlp" in TASKS; data is
loaded only when a task is built.
"""

from byzps.common.tasks import a9a, digits, fmnist
from byzps.common.tasks.base import TASKS, Task
from byzps.common.tasks.factory import build_task
from byzps.common.tasks.partition import PARTITIONERS, partition

__all__ = ["PARTITIONERS", "TASKS", "Task", "a9a", "build_task", "digits", "fmnist", "partition"]
