"""Where a job runs (:class:`Workers`: workers per node, nodes, launcher, where nodes meet) and
what SLURM says about it.

Under ``srun`` with one task per node, every node runs the same ``lm4lv`` command; SLURM tells
each one how many nodes the step has (``SLURM_STEP_NUM_NODES``, else ``SLURM_NNODES``), which
one it is (``SLURM_NODEID``) and their hosts (``SLURM_STEP_NODELIST``, else
``SLURM_JOB_NODELIST``, in SLURM's compressed form ``gpu[01-03,07]``). Node 0, the first host,
is where the nodes meet (the master address); the port is derived from the job id so that every
node computes the same one. Options given explicitly win over what is detected here.

A batch script or an ``salloc`` shell is not a step (no ``SLURM_STEP_ID``): a command started
there runs on its node alone.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
from dataclasses import dataclass
from typing import Mapping

from ..defaults import ENGINES, LAUNCHERS, MASTER_PORT, NODE_TIMEOUT
from ..errors import ConfigError

PORT_BASE = 20000  # master port = PORT_BASE + job id mod PORT_SPAN: below Linux's ephemeral ports
PORT_SPAN = 10000


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list as host names, in order: ``gpu[01-03,07]`` → gpu01, gpu02,
    gpu03, gpu07; ``a[1-2],b3`` → a1, a2, b3; several bracket groups (``r[1-2]n[1-2]``) expand
    like SLURM does (the last group fastest). Zero-padded bounds keep their width."""
    text = nodelist.strip()
    if not text:
        raise ConfigError("empty SLURM node list")
    hosts: list[str] = []
    for part in _split_top(text, nodelist):
        hosts += _expand_host(part, nodelist)
    return hosts


def _split_top(text: str, whole: str) -> list[str]:
    """Split at commas outside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ConfigError(f"SLURM node list {whole!r}: nested brackets")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ConfigError(f"SLURM node list {whole!r}: unbalanced ']'")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ConfigError(f"SLURM node list {whole!r}: unbalanced '['")
    parts.append(text[start:])
    if any(not p.strip() for p in parts):
        raise ConfigError(f"SLURM node list {whole!r}: an empty host name")
    return [p.strip() for p in parts]


def _expand_host(pattern: str, whole: str) -> list[str]:
    pieces = re.split(r"(\[[^\]]*\])", pattern)
    choices: list[list[str]] = []
    for piece in pieces:
        if piece.startswith("["):
            choices.append(_expand_range(piece[1:-1], whole))
        elif piece:
            choices.append([piece])
    return ["".join(c) for c in itertools.product(*choices)]


def _expand_range(spec: str, whole: str) -> list[str]:
    out: list[str] = []
    for item in spec.split(","):
        item = item.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not m:
            raise ConfigError(f"SLURM node list {whole!r}: cannot read the range {item!r}")
        lo, hi = m.group(1), m.group(2) if m.group(2) is not None else m.group(1)
        if int(hi) < int(lo):
            raise ConfigError(f"SLURM node list {whole!r}: the range {item!r} runs backwards")
        width = len(lo) if lo.startswith("0") else 0
        out += [str(n).zfill(width) for n in range(int(lo), int(hi) + 1)]
    return out


@dataclass(frozen=True)
class SlurmStep:
    """What SLURM says about the nodes of this ``srun`` step."""

    job_id: str
    num_nodes: int
    node_rank: int
    hosts: tuple[str, ...]
    tasks: int | None
    nodelist: str = ""  # as SLURM wrote it

    @property
    def master_addr(self) -> str:
        return self.hosts[0]

    @property
    def master_port(self) -> int:
        digits = re.sub(r"\D", "", self.job_id) or "0"
        return PORT_BASE + int(digits) % PORT_SPAN


def _int(env: Mapping[str, str], *names: str) -> tuple[str, int] | None:
    for name in names:
        value = env.get(name)
        if value is None or value == "":
            continue
        try:
            return name, int(value)
        except ValueError:
            raise ConfigError(f"{name}={value!r}: not a number (is this a SLURM job?)") from None
    return None


def slurm_step(env: Mapping[str, str]) -> SlurmStep | None:
    """The nodes of the ``srun`` step this process is a task of; ``None`` outside a step (no
    SLURM job, or a batch script / ``salloc`` shell). A step with several tasks on a node is
    refused: lm4lv starts a node's workers itself (``srun --ntasks-per-node=1``)."""
    if not env.get("SLURM_JOB_ID") or not (env.get("SLURM_STEP_ID") or env.get("SLURM_STEPID")):
        return None
    nodes = _int(env, "SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES")
    rank = _int(env, "SLURM_NODEID")
    nodelist_var = next((n for n in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
                         if env.get(n)), None)
    if nodes is None or rank is None or nodelist_var is None:
        return None
    hosts = expand_nodelist(env[nodelist_var])
    num_nodes, node_rank = nodes[1], rank[1]
    if len(hosts) != num_nodes:
        raise ConfigError(f"{nodelist_var}={env[nodelist_var]} names {len(hosts)} host(s) but "
                          f"{nodes[0]}={num_nodes}")
    if not 0 <= node_rank < num_nodes:
        raise ConfigError(f"SLURM_NODEID={node_rank} is outside the step's {num_nodes} node(s)")
    tasks = _int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
    if tasks is not None and tasks[1] > num_nodes:
        raise ConfigError(f"srun started {tasks[1]} tasks on {num_nodes} node(s) ({tasks[0]}); lm4lv starts the "
                          "workers of a node itself (--nproc): run one task per node "
                          "(srun --ntasks-per-node=1)")
    return SlurmStep(job_id=env["SLURM_JOB_ID"], num_nodes=num_nodes, node_rank=node_rank, hosts=tuple(hosts),
                     tasks=tasks[1] if tasks else None, nodelist=env[nodelist_var])


def allocation_nodes(env: Mapping[str, str]) -> int:
    """Nodes of the SLURM job this process runs in (1 outside SLURM)."""
    found = _int(env, "SLURM_JOB_NUM_NODES", "SLURM_NNODES") if env.get("SLURM_JOB_ID") else None
    return found[1] if found else 1


@dataclass
class Workers:
    """Where a job runs: ``nproc`` workers on each of ``num_nodes`` nodes, started by ``launcher``
    (default: the engine's own; torchrun for the DeepSpeed engine on one launcher per node). One
    worker on one node runs in-process. ``None`` node settings are taken from an ``srun`` step
    (:meth:`resolve`), else one node."""

    nproc: int = 1
    engine: str = "deepspeed"
    launcher: str | None = None
    num_nodes: int | None = None
    hostfile: str | None = None
    master_port: int | None = None
    node_rank: int | None = None
    master_addr: str | None = None
    node_timeout: float = NODE_TIMEOUT

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ConfigError(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.launcher is not None and self.launcher not in LAUNCHERS:
            raise ConfigError(f"--launcher must be one of {', '.join(LAUNCHERS)}, got {self.launcher!r}")
        if self.nproc < 1:
            raise ConfigError(f"--nproc must be >= 1, got {self.nproc}")
        if self.num_nodes is not None and self.num_nodes < 1:
            raise ConfigError(f"--num-nodes must be >= 1, got {self.num_nodes}")
        if self.node_rank is not None and self.node_rank < 0:
            raise ConfigError(f"--node-rank must be >= 0, got {self.node_rank}")
        if self.master_port is not None and not 0 < self.master_port < 65536:
            raise ConfigError(f"--master-port must be a port number (1-65535), got {self.master_port}")
        if not self.node_timeout > 0:
            raise ConfigError(f"--node-timeout must be > 0 seconds, got {self.node_timeout}")
        if self.hostfile and (self.node_rank is not None or self.master_addr):
            raise ConfigError("--hostfile starts every node from this one (DeepSpeed over ssh); --node-rank and "
                              "--master-addr are for one launcher per node: give one or the other")
        self.detected: str | None = None  # what resolve() took from SLURM, said once by the command

    def resolve(self, env: dict[str, str] | None = None) -> "Workers":
        """A copy with the node settings complete: given ones kept, missing ones from an ``srun``
        step (``SLURM_*``), else one node; checked for a launch."""
        if getattr(self, "_resolved", False):
            return self
        env = dict(os.environ if env is None else env)
        w = dataclasses.replace(self)
        step = None if w.hostfile else slurm_step(env)
        if step is not None and (w.num_nodes or step.num_nodes) > 1:
            taken = [name for name, value in (("--num-nodes", w.num_nodes), ("--node-rank", w.node_rank),
                                              ("--master-addr", w.master_addr), ("--master-port", w.master_port))
                     if value is not None]
            w.num_nodes = w.num_nodes or step.num_nodes
            w.node_rank = step.node_rank if w.node_rank is None else w.node_rank
            w.master_addr = w.master_addr or step.master_addr
            w.master_port = w.master_port or step.master_port
            w.detected = (f"SLURM job {step.job_id}: node {w.node_rank} of {w.num_nodes} "
                          f"({step.hosts[step.node_rank]}; nodes {step.nodelist}), meeting at {w.master_addr}:{w.master_port}"
                          + (f" ({', '.join(taken)} as given)" if taken else ""))
        elif step is None and w.num_nodes is None and not w.hostfile and allocation_nodes(env) > 1:
            w.detected = (f"note: SLURM job {env.get('SLURM_JOB_ID')} has {allocation_nodes(env)} nodes but this "
                          "command was not started by srun: it runs on this node only (start it with "
                          "srun --ntasks-per-node=1 to use every node)")
        w.num_nodes = w.num_nodes or 1
        if w.per_node:
            if w.node_rank is None or not w.master_addr:
                raise ConfigError(f"--num-nodes {w.num_nodes}: give each node its --node-rank (0 to {w.num_nodes - 1}) "
                                  "and node 0's address --master-addr, the same command on every node "
                                  "(under SLURM, srun sets them)")
            if w.node_rank >= w.num_nodes:
                raise ConfigError(f"--node-rank must be below --num-nodes {w.num_nodes}, got {w.node_rank}")
            if w.launcher == "deepspeed":
                raise ConfigError("--launcher deepspeed reaches other nodes only over ssh (--hostfile); for one "
                                  "launcher per node use --launcher torchrun (the default there)")
            w.master_port = w.master_port or MASTER_PORT
        elif w.node_rank not in (None, 0):
            raise ConfigError(f"--node-rank {w.node_rank} needs --num-nodes above it")
        w._resolved = True
        return w

    @property
    def per_node(self) -> bool:
        """One launcher per node (every node runs the command), as opposed to one for all."""
        return (self.num_nodes or 1) > 1 and not self.hostfile

    @property
    def node(self) -> int:
        """This node's rank (0 on a single node and for the DeepSpeed hostfile launch)."""
        return (self.node_rank or 0) if self.per_node else 0

    @property
    def in_process(self) -> bool:
        return self.nproc == 1 and (self.num_nodes or 1) == 1 and not self.hostfile

    @property
    def world_size(self) -> int:
        return self.nproc * (self.num_nodes or 1)

    def launcher_name(self) -> str:
        if self.launcher:
            return self.launcher
        return "torchrun" if self.per_node and self.engine == "deepspeed" else self.engine
