"""Faults at scale, each ending in one message that says what was kept and how to go on.

- Ctrl-C, SIGTERM and SLURM's requeue signal stop every process of a run after the same step, which is
  saved as last.ckpt; on SLURM the job then requeues itself and continues the same run folder.
- A process that dies or stops answering (kill -9, SIGSTOP, a stuck collective) is named by the others
  within `host.collective_timeout` seconds instead of torch's 30 minutes, and the run stops.
- A checkpoint that cannot be written (a full disk) stops the run naming the folder and the error.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from omegaconf import DictConfig

from shakespeare.errors import Fault, Interrupted, UsageError, speaks
from shakespeare.internals import (
    cluster_environment,
    delay_child_observer,
    reruns_the_command,
    set_collective_timeout,
    stop_after_this_step,
)
from shakespeare.ranges import ABOVE_0
from shakespeare.run.checkpoints import AUTO, LAST, CheckpointWriteError, find_run, resume_command
from shakespeare.run.folders import run_overrides
from shakespeare.training.lines import ResearchLog

log = logging.getLogger("shakespeare")

# Signals that stop a run, in the order of precedence when processes of one run received different ones
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGUSR1, signal.SIGINT)
SHARED_STORE_FIX = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"  # torchrun restarts that reconnect reliably (pytorch#135712)
HEARTBEAT = 0.25  # seconds between a process's heartbeats
SILENCE = 2.0  # seconds without a heartbeat after which a process counts as stopped


def distributed(trainer: L.Trainer) -> bool:
    return trainer.world_size > 1 and dist.is_available() and dist.is_initialized()


def agree(trainer: L.Trainer, value: int) -> int:
    """The largest of every process's `value` (a collective: every process calls it at the same point)."""
    tensor = torch.tensor([value], dtype=torch.int64, device=trainer.strategy.root_device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def requeue_signal(trainer: L.Trainer) -> signal.Signals | None:
    """The signal SLURM sends before the time limit, when Lightning detected SLURM with auto-requeue on
    (its default; `SLURMEnvironment(requeue_signal=...)` picks the signal, SIGUSR1 unless told)."""
    environment = cluster_environment(trainer)
    if isinstance(environment, SLURMEnvironment) and environment.auto_requeue:
        return signal.Signals(environment.requeue_signal or signal.SIGUSR1)
    return None


class InterruptCheckpoint(Checkpoint):
    """Saves `dirpath/last.ckpt` when Ctrl-C, SIGTERM or SLURM's requeue signal stops the run, after the
    step in flight, on every process at the same step.

    Lightning finishes the step in flight and then raises `SIGTERMException` once `trainer.received_sigterm`
    is set. On one process the signal sets it at once. With several, each process's signal handler only
    takes note, and the processes agree after every training and validation batch whether any of them
    was signalled (Lightning's own handler stops each process on its own, so they can stop at different
    steps and wait for each other forever). A second Ctrl-C stops at once without saving.
    """

    def __init__(self, dirpath: str | Path):
        self.dirpath = Path(dirpath)
        self.signal: str | None = None  # the signal that stopped the run (the same on every process)
        self.saved_step: int | None = None
        self._received = 0  # 1 + the index in STOP_SIGNALS of the first signal this process received
        self._start_step: int | None = None
        self._trainer: L.Trainer | None = None
        self._previous_sigint: Any = None

    @property
    def ckpt_path(self) -> Path:
        return self.dirpath / LAST

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._trainer, self._start_step = trainer, trainer.global_step
        if threading.current_thread() is not threading.main_thread():
            return
        self._previous_sigint = signal.signal(signal.SIGINT, self._on_signal)
        for signum in (signal.SIGTERM, requeue_signal(trainer)):  # replacing Lightning's handlers
            if signum is not None:
                signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, self._previous_sigint)
            rank_zero_info(
                "\nCtrl-C: saving a checkpoint after this step (press Ctrl-C again to quit without saving) ..."
            )
        if self._received:
            return
        self._received = STOP_SIGNALS.index(signum) + 1
        trainer = self._trainer
        if trainer.strategy.launcher is not None:  # the processes this one started stop too
            trainer.strategy.launcher.kill(signal.SIGTERM)
        if not distributed(trainer):
            self._stop(trainer, self._received)

    def _stop(self, trainer: L.Trainer, code: int) -> None:
        self.signal = STOP_SIGNALS[code - 1].name
        stop_after_this_step(trainer)

    def _agree(self, trainer: L.Trainer) -> None:
        if self.signal is None and self._trainer is not None and distributed(trainer):
            if code := agree(trainer, self._received):
                self._stop(trainer, code)

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        self._agree(trainer)

    def on_validation_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not trainer.sanity_checking:
            self._agree(trainer)

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
        self._restore_sigint()
        if isinstance(exception, KeyboardInterrupt):
            self.signal = "SIGINT"  # a second Ctrl-C, or one before training started: the step may be half done
        elif isinstance(exception, SIGTERMException):
            self.signal = self.signal or "SIGTERM"
            if self._start_step is not None and trainer.global_step > self._start_step:
                trainer.save_checkpoint(self.ckpt_path, weights_only=False)
                self.saved_step = trainer.global_step

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._restore_sigint()


class Heartbeat(threading.Thread):
    """Counts this process's heartbeats in the run's TCP store, so that when a collective fails the
    processes still alive can tell which of them stopped (killed, or stopped by SIGSTOP)."""

    def __init__(self, rank: int):
        super().__init__(daemon=True, name="shakespeare-heartbeat")
        self.key = heartbeat_key(rank)
        self.stopped = threading.Event()

    def run(self) -> None:
        try:
            store = connect_store(timeout=60)
            while not self.stopped.wait(HEARTBEAT):
                store.add(self.key, 1)
        except Exception:  # the store is gone: so is the run
            return


def heartbeat_key(rank: int) -> str:
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT") or os.environ.get("SLURM_RESTART_COUNT") or "0"
    return f"shakespeare/heartbeat/{restart}/{rank}"


def connect_store(timeout: float) -> dist.TCPStore:
    """A connection of our own to the store the processes met at (rank 0's, or torchrun's agent's)."""
    return dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=timedelta(seconds=timeout),
        wait_for_workers=False,
    )


def lost_contact(err: BaseException) -> bool:
    """Whether `err` is a collective that failed because another process is gone or silent."""
    text = str(err)
    signs = (
        "Connection reset by peer",
        "Connection closed by peer",
        "Timed out waiting",
        "timeout caused pair closure",
        "Broken pipe",
        "Socket Timeout",
        "Watchdog caught collective operation timeout",
    )
    return isinstance(err, dist.DistError) or (isinstance(err, RuntimeError) and any(s in text for s in signs))


def store_reachable() -> bool:
    """Whether the store still takes connections (asked with a plain socket: torch retries for its whole timeout)."""
    try:
        with socket.create_connection((os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])), timeout=2):
            return True
    except OSError:
        return False


def lost_ranks(rank: int, world_size: int) -> list[int]:
    """The processes whose heartbeats stopped (the store lives in rank 0's process: unreachable, rank 0 is lost)."""
    if not store_reachable():
        return [0] if rank != 0 else []
    try:
        store = connect_store(timeout=5)
        before = [store.add(heartbeat_key(r), 0) for r in range(world_size)]
        time.sleep(SILENCE)
        after = [store.add(heartbeat_key(r), 0) for r in range(world_size)]
    except Exception:
        return [0] if rank != 0 else []
    return [r for r in range(world_size) if r != rank and after[r] == before[r]]


class LostRankWatch(L.Callback):
    """Names the process a run of several lost, within `collective_timeout` seconds.

    Once the processes have joined, a collective waits at most `collective_timeout` seconds for the others
    (torch's default: 30 minutes). Each process keeps a heartbeat in the run's store; when a collective
    fails (a connection reset, or no answer in time), the survivors look for the heartbeats that stopped,
    and the lowest surviving rank names the lost process, once.
    """

    def __init__(self, collective_timeout: Annotated[float, ABOVE_0] = 1800):  # seconds
        self.collective_timeout = collective_timeout
        self.lost: list[int] | None = None  # set once a collective failed
        self.alive_but_silent = False
        self.speaker = False
        self.error = ""
        self._heartbeat: Heartbeat | None = None

    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        if distributed(trainer) and self._heartbeat is None and "MASTER_ADDR" in os.environ:
            # once every process has joined (joining keeps Lightning's and torch's limits: processes start slowly)
            set_collective_timeout(self.collective_timeout)
            self._heartbeat = Heartbeat(trainer.global_rank)
            self._heartbeat.start()
            delay_child_observer(self.collective_timeout + 30)

    def teardown(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stopped.set()
            self._heartbeat = None

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
        if trainer.world_size == 1 or not lost_contact(exception):
            return
        rank, world_size = trainer.global_rank, trainer.world_size
        lost = lost_ranks(rank, world_size)
        if not lost and world_size == 2:  # both alive: the other one is stuck somewhere else
            lost, self.alive_but_silent = [1 - rank], True
        self.lost = lost
        self.speaker = rank == min(set(range(world_size)) - set(lost))
        self.error = (
            "its connection closed"
            if "peer" in str(exception) or "Broken pipe" in str(exception)
            else (f"no answer within host.collective_timeout={self.collective_timeout:g}s")
        )


def find(trainer: L.Trainer, kind: type) -> Any:
    return next((c for c in trainer.callbacks if isinstance(c, kind)), None)


def mark_research_log(trainer: L.Trainer, status: str, note: str) -> None:
    for research_log in (c for c in trainer.callbacks if isinstance(c, ResearchLog)):
        research_log.mark(status, note)


def resume_hint(cfg: DictConfig, run: Path, lead: str = "Resume") -> str:
    """How to go on from `run`'s last.ckpt: the same command for ckpt_path=auto, else the run's overrides
    with the run folder."""
    if cfg.get("ckpt_path") == AUTO:
        if TorchElasticEnvironment.detect():
            return "torchrun restarts the processes if --max-restarts allows; with ckpt_path=auto they resume it."
        return f"{lead} with the same command (ckpt_path=auto resumes it)."
    return f"{lead} with: {resume_command(run_overrides(), run)}"


def saved_step(path: Path) -> int | None:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])
    except Exception:
        return None


def kept(cfg: DictConfig) -> str:
    """What the run folder keeps: last.ckpt and its step, or that there is none."""
    last = Path(cfg.paths.output_dir) / "checkpoints" / LAST
    step = saved_step(last) if last.is_file() else None
    return f"{last} (step {step}) is kept" if step is not None else "no checkpoint had been saved yet"


def requeue_slurm_job(cfg: DictConfig, run: Path) -> str:
    """Requeue this SLURM job with `scontrol requeue`, as Lightning's auto-requeue does, if the requeued
    job will continue this run folder; say what happened."""
    if not (cfg.get("ckpt_path") == AUTO or find_run(cfg.get("ckpt_path"), cfg.paths.log_dir) == run):
        return (
            "SLURM asked for a requeue, but the job was not requeued: its command starts a new run folder, so "
            "the requeued job would start from scratch. Add ckpt_path=auto and a fixed hydra.run.dir to the "
            f"job's command. To continue this run: {resume_command(run_overrides(), run)}"
        )
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    except FileNotFoundError:
        return f"Could not requeue SLURM job {job}: scontrol is not on PATH. Resubmit the job to continue this run."
    if result.returncode != 0:
        return (
            f"Could not requeue SLURM job {job} (scontrol requeue {job}: {result.stderr.strip() or result.returncode}). "
            "Resubmit the job to continue this run."
        )
    return f"Requeued SLURM job {job} (scontrol requeue {job}): when it starts again it continues this run folder."


def interrupted(trainer: L.Trainer, cfg: DictConfig) -> Interrupted | None:
    """What to tell the user after a signal stopped `trainer` (also the research log's note); on SLURM's
    requeue signal, rank 0 requeues the job."""
    stop = find(trainer, InterruptCheckpoint)
    if stop is None or stop.signal is None:
        return None
    run = Path(cfg.paths.output_dir)
    last = run / "checkpoints" / LAST
    if stop.saved_step is not None:
        saved = f"Saved {last} at step {stop.saved_step} (epoch {trainer.current_epoch})."
    elif last.is_file():
        saved = f"Nothing new was saved; {kept(cfg)}."
    else:
        saved = "No training step had finished, so there is nothing to resume; start the run again."
    then = ""
    if last.is_file():
        requeue = requeue_signal(trainer)
        if requeue is not None and stop.signal == requeue.name and trainer.is_global_zero:
            then = " " + requeue_slurm_job(cfg, run)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # SLURM ends the job step next: this process is ending anyway
        else:
            then = " " + resume_hint(cfg, run)
    message = f"Training interrupted by {stop.signal}. {saved}{then}"
    mark_research_log(trainer, "interrupted", message)
    return Interrupted(message, 128 + signal.Signals[stop.signal])


def lost_rank(trainer: L.Trainer, cfg: DictConfig, watch: LostRankWatch) -> Fault:
    ranks = ", ".join(map(str, watch.lost))
    lost = f"rank {ranks}" if len(watch.lost) == 1 else f"ranks {ranks}"
    what = "is alive but stuck" if watch.alive_but_silent else "died or stopped answering"
    message = (
        f"Lost {lost} of {trainer.world_size}: its process {what} ({watch.error}), so the run stopped at "
        f"step {trainer.global_step} instead of waiting for it."
    )
    if watch.speaker:  # the others stay quiet: no need to read the checkpoint
        saved = kept(cfg)
        message += f" {saved[0].upper()}{saved[1:]}: only the steps after it are lost. {resume_hint(cfg, Path(cfg.paths.output_dir))}"
    return Fault(message, speaker=watch.speaker)


def unwritable(cfg: DictConfig, err: CheckpointWriteError) -> Fault:
    run = Path(cfg.paths.output_dir)
    if not (run / "checkpoints" / LAST).is_file():
        return Fault(f"{err} Start the run again once there is space.")
    saved = kept(cfg)
    return Fault(
        f"{err} {saved[0].upper()}{saved[1:]}: only the steps after it are lost. "
        f"{resume_hint(cfg, run, 'Once there is space again, resume')}"
    )


def restarts_share_the_store() -> bool:
    """Whether torchrun may restart this run's processes while sharing its rendezvous store with them:
    restarted processes can then read the dead ones' addresses from it and fail to connect (pytorch#135712)."""
    restarts = os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")
    return restarts.isdigit() and int(restarts) > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def restart_failed(err: BaseException) -> Fault | None:
    if not (restarts_share_the_store() and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0"):
        return None
    if not isinstance(err, RuntimeError) or "connect" not in str(err).lower():  # not the processes meeting
        return None
    return Fault(
        f"torchrun restarted the processes, but they could not connect to each other ({type(err).__name__}: "
        f"{str(err).splitlines()[0][-200:]}). torchrun shares its rendezvous store with the processes, and restarted "
        f"ones can read the addresses of the ones that died from it (pytorch#135712). Start torchrun with "
        f"{SHARED_STORE_FIX} in its environment; with ckpt_path=auto the run resumes its last.ckpt."
    )


@contextmanager
def explained(trainer: L.Trainer, cfg: DictConfig) -> Iterator[None]:
    """Around `trainer.fit`: a run stopped by a signal, a lost process or a checkpoint that could not be
    written ends in an Interrupted or Fault naming what happened, what was kept and how to go on."""
    if restarts_share_the_store() and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0" and speaks(UsageError()):
        log.warning(
            "torchrun --max-restarts: set %s in torchrun's environment, or a restart may fail to connect "
            "(its processes can read the addresses of the ones that died: pytorch#135712).",
            SHARED_STORE_FIX,
        )
    try:
        yield
    except SystemExit:  # SIGTERM (Lightning's SIGTERMException) or a second Ctrl-C (Lightning's exit)
        if (stop := interrupted(trainer, cfg)) is None:
            raise
        raise stop from None
    except Exception as err:
        watch = find(trainer, LostRankWatch)
        if isinstance(err, CheckpointWriteError):
            fault = unwritable(cfg, err)
        elif watch is not None and watch.lost is not None:
            fault = lost_rank(trainer, cfg, watch)
        elif (fault := restart_failed(err)) is None:
            raise
        mark_research_log(trainer, "failed", str(fault))
        if reruns_the_command(trainer):  # those waiting for this one
            trainer.strategy.launcher.kill(signal.SIGKILL)
        raise fault from None
