"""Training engine: a backend-independent loop (``loop``), DeepSpeed and accelerate backends
(``backends``), the ``TrainTask`` interface (``task``) and the LM4LV task (``lm4lv_task``).
``run.train`` / ``run.run_training`` start a run; ``run.train_job`` is what each worker runs."""

from .config import TrainConfig
from .task import TASKS, TrainTask

__all__ = ["TASKS", "TrainConfig", "TrainTask"]
