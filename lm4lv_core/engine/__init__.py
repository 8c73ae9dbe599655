"""Training independent of the model: the loop (``loop``), DeepSpeed and accelerate backends
(``backends``), learning-rate schedules, checkpoints, the ``TrainTask`` interface (``task``), the run
folder (``run``), option layering (``options``) and the launch of workers (``launch``)."""

from .config import TrainConfig

__all__ = ["TrainConfig", "TrainTask"]


def __getattr__(name: str):  # TrainTask imports torch: only when asked for (the CLI's options do not)
    if name == "TrainTask":
        from .task import TrainTask

        return TrainTask
    raise AttributeError(name)
