"""Training independent of the model: the loop (``loop``), DeepSpeed and accelerate backends
(``backends``), learning-rate schedules, checkpoints, the ``TrainTask`` interface (``task``), the run
folder (``run``), option layering (``options``) and the launch of workers (``launch``)."""

from .config import TrainConfig
from .task import TrainTask

__all__ = ["TrainConfig", "TrainTask"]
