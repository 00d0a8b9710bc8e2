"""Faults at scale: DDP interrupted and resumed exactly, lost ranks, elastic restarts, SLURM requeue, full
disks, damaged checkpoints, world-size changes and crowded run folders, in real subprocesses (2 gloo ranks)."""

from __future__ import annotations

import errno
import multiprocessing
import os
import re
import resource
import shlex
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from shakespeare.cli.train import fit
from shakespeare.data.datamodule import ShakespeareDataModule
from shakespeare.errors import UsageError
from shakespeare.internals import patiently
from shakespeare.report.__main__ import main as report_main
from shakespeare.run.checkpoints import (
    LAST,
    PREVIOUS,
    AtomicCheckpointIO,
    CheckpointWriteError,
)
from tests.harness import (
    ROOT,
    assert_same_run,
    compose_train,
    start_train,
    wait_for,
    write_corpus,
)

# 3 epochs of 6 steps with dropout, last.ckpt every 4 steps; on 2 processes each takes batches of 16
RUN = [
    "model=block_norm_dropout",
    "data.batch_size=16",
    "trainer.max_epochs=3",
    "trainer.limit_train_batches=6",
    "trainer.limit_val_batches=2",
    "trainer.enable_progress_bar=false",
    "checkpoint.every_n_steps=4",
    "callbacks.generation_sample.max_new_tokens=0",
    "callbacks.research_log.sample_length=0",
]
DDP = ["trainer=ddp", "trainer.devices=2"]


def probe(name: str, kind: str, **settings) -> list[str]:
    return [
        f"+callbacks.{name}._target_=tests.probes.{kind}",
        *(f"+callbacks.{name}.{k}={v}" for k, v in settings.items()),
    ]


def step_of(checkpoint: Path) -> int:
    return torch.load(checkpoint, weights_only=True)["global_step"]


def printed_command(out: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run the `Resume with: python train.py ...` command a run printed."""
    command = shlex.split(re.search(r"Resume with: (python train\.py .*)", out)[1])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *command[2:]],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def the_run(cwd: Path) -> Path:
    [run] = (cwd / "outputs").glob("*/*_block_norm_dropout")
    return run


def stopped_after(folder: Path) -> dict[str, str]:
    return {p.stem: p.read_text().strip() for p in folder.glob("rank*.txt")}


@pytest.fixture(scope="module")
def corpus13(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


@pytest.fixture(scope="module")
def ddp_reference(corpus13, tmp_path_factory) -> Path:
    """The checkpoints of the uninterrupted 2-process run, forked from this process (no second start-up;
    without TensorBoard, whose writer thread a fork would leave behind: the weights are the same)."""
    run = tmp_path_factory.mktemp("ddp_reference")
    fit(
        compose_train(
            run,
            [
                f"data.path={corpus13}",
                *RUN,
                "trainer.strategy=ddp_fork",
                "trainer.devices=2",
                "~logger",
                "~callbacks.learning_rate_monitor",
            ],
        )
    )
    return run / "checkpoints"


@pytest.fixture(scope="module")
def reference(corpus13, tmp_path_factory) -> Path:
    """The run folder of the uninterrupted one-process run."""
    run = tmp_path_factory.mktemp("reference") / "run"
    fit(compose_train(run, [f"data.path={corpus13}", *RUN]))
    return run


# 1. DDP interrupted, resumed exactly


@pytest.mark.slow
def test_ddp_sigterm_stops_every_rank_after_the_same_step_and_the_printed_command_resumes_exactly(
    tmp_path, corpus13, ddp_reference
):
    # SIGTERM to the main process only, as Kubernetes sends it; rank 1 has gone on and waits in step 8
    args = [f"data.path={corpus13}", *RUN, *DDP]
    proc = start_train(
        [*args, *probe("pause", "PauseAt", step=7, rank=0), *probe("record", "RecordStop", folder=tmp_path / "stops")],
        tmp_path,
    )
    wait_for(proc, "paused at step 7")
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    run = the_run(tmp_path)
    assert stopped_after(tmp_path / "stops") == {"rank0": "7 SIGTERMException", "rank1": "7 SIGTERMException"}
    assert step_of(run / "checkpoints" / LAST) == 7  # mid-epoch: epoch 1's first step
    assert out.count("Training interrupted by SIGTERM. Saved ") == 1 and "Traceback" not in out

    resumed = printed_command(out, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Status: finished" in (run / "research_log.md").read_text()
    assert_same_run(run / "checkpoints", ddp_reference)


@pytest.mark.slow
def test_ddp_ctrl_c_stops_every_rank_together_and_one_process_refuses_to_resume_it(tmp_path, corpus13, tiny_cfg):
    # Ctrl-C reaches the whole process group; rank 0 has gone on and waits in step 10
    args = [f"data.path={corpus13}", *RUN]
    proc = start_train(
        [
            *args,
            *DDP,
            *probe("pause", "PauseAt", step=9, rank=1),
            *probe("record", "RecordStop", folder=tmp_path / "stops"),
        ],
        tmp_path,
        new_session=True,
    )
    wait_for(proc, "paused at step 9")
    os.killpg(proc.pid, signal.SIGINT)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGINT, out[-3000:]
    run = the_run(tmp_path)
    assert stopped_after(tmp_path / "stops") == {"rank0": "9 SIGTERMException", "rank1": "9 SIGTERMException"}
    assert step_of(run / "checkpoints" / LAST) == 9
    assert out.count("Ctrl-C: saving a checkpoint after this step") == 1
    assert out.count("Training interrupted by SIGINT. Saved ") == 1 and "Traceback" not in out

    # 7. the 2-process checkpoint on 1 process: the data order would change, so it is refused with the reason
    with pytest.raises(
        UsageError, match=r"trained on 2 processes and this run has 1.*every 2-th window.*Resume it on 2"
    ):
        fit(compose_train(run, [*args, f"ckpt_path={run}"]))


def test_a_one_process_checkpoint_is_refused_on_two(tmp_path):
    datamodule = ShakespeareDataModule(path="unused.txt", batch_size=16)
    datamodule.trainer = SimpleNamespace(world_size=2, ckpt_path=tmp_path / "last.ckpt")
    with pytest.raises(
        UsageError, match=r"trained on 1 process and this run has 2.*Resume it on 1: without trainer=ddp"
    ):
        datamodule.load_state_dict({"world_size": 1})
    datamodule.load_state_dict({"world_size": 2})


# 2. A dead or stuck rank ends the run cleanly


@pytest.mark.slow
def test_a_stopped_rank_is_named_within_the_collective_timeout(tmp_path, corpus13):
    # SIGSTOP: the process neither dies nor answers; without a bound the other one waits 30 minutes
    args = [
        f"data.path={corpus13}",
        *RUN,
        *DDP,
        "host.collective_timeout=5",
        *probe("fault", "SignalSelfAt", step=6, rank=1, signal="SIGSTOP"),
    ]
    proc = start_train(args, tmp_path)
    pid = int(re.search(r"\(pid (\d+)\)", wait_for(proc, "rank 1 sends itself SIGSTOP"))[1])
    started = time.monotonic()
    out = proc.communicate(timeout=120)[0]
    waited = time.monotonic() - started
    assert proc.returncode == 1, out[-3000:]
    last = the_run(tmp_path) / "checkpoints" / LAST
    assert (
        out.count(
            "Lost rank 1 of 2: its process died or stopped answering (no answer within "
            "host.collective_timeout=5s), so the run stopped at step 6 "
        )
        == 1
    )
    assert f"{last} (step 4) is kept: only the steps after it are lost. Resume with: python train.py " in out
    assert "Traceback" not in out and waited < 5 + 30
    assert step_of(last) == 4
    assert (
        not Path(f"/proc/{pid}").exists() or "State:\tZ" in Path(f"/proc/{pid}/status").read_text()
    )  # not left stopped


def test_lightnings_launcher_gives_the_survivor_time_before_it_kills_everything():
    # Lightning's observer SIGKILLs the main process 5 s after a child dies: the survivor could not say which
    from lightning.fabric.strategies.launchers.subprocess_script import (
        _ChildProcessObserver,
    )

    main, dead = subprocess.Popen(["sleep", "60"]), subprocess.Popen(["false"])
    dead.wait()
    observer = _ChildProcessObserver(main_pid=main.pid, child_processes=[dead])
    observer._run = patiently(observer, observer._run, grace=0.3)
    started = time.monotonic()
    observer._run()
    assert time.monotonic() - started >= 0.3 and main.wait(timeout=10) == -signal.SIGKILL  # later, but still


# 3. Elastic restarts resume by themselves


def test_ckpt_path_auto_needs_a_fixed_folder(tiny_cfg):
    with pytest.raises(
        UsageError, match=r"ckpt_path=auto resumes the run folder's own checkpoints/last.ckpt.*hydra.run.dir="
    ):
        fit(tiny_cfg("ckpt_path=auto"))


@pytest.mark.slow
def test_ckpt_path_auto_starts_fresh_then_resumes_its_own_folder(tiny_cfg, tmp_path):
    folder = f"hydra.run.dir={tmp_path / 'run'}"
    fit(tiny_cfg("ckpt_path=auto", folder))  # nothing to resume: a fresh start
    assert step_of(tmp_path / "run" / "checkpoints" / LAST) == 5
    fit(tiny_cfg("ckpt_path=auto", folder, "trainer.max_epochs=2"))  # the same command, trained longer: resumes
    assert (
        step_of(tmp_path / "run" / "checkpoints" / LAST) == 10
        and step_of(tmp_path / "run" / "checkpoints" / PREVIOUS) == 5
    )


@pytest.mark.slow
def test_torchrun_restarts_a_killed_rank_and_finishes_like_the_uninterrupted_run(tmp_path, corpus13, ddp_reference):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "--max-restarts=1",
        str(ROOT / "train.py"),
        f"data.path={corpus13}",
        *RUN,
        *DDP,
        f"hydra.run.dir={run}",
        "ckpt_path=auto",
        *probe("fault", "SignalSelfAt", step=6, rank=1, signal="SIGKILL"),
    ]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert out.count("Lost rank 1 of 2: its process died or stopped answering (its connection closed)") == 1
    assert "torchrun restarts the processes if --max-restarts allows" in out
    assert "Status: finished" in (run / "research_log.md").read_text()
    assert_same_run(run / "checkpoints", ddp_reference)


# 4. SLURM preemption


@pytest.mark.slow
def test_slurm_requeue_signal_saves_requeues_and_the_requeued_job_continues_the_run(
    tmp_path, corpus13, reference, monkeypatch
):
    bin_dir, requeued = tmp_path / "bin", tmp_path / "requeued.txt"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {requeued}\n')
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "train",
        "SLURM_NTASKS": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "localhost",
    }
    run = tmp_path / "run"
    args = [f"data.path={corpus13}", *RUN, f"hydra.run.dir={run}", "ckpt_path=auto"]
    with monkeypatch.context() as job:
        for key, value in {**slurm, "PATH": f"{bin_dir}:{os.environ['PATH']}"}.items():
            job.setenv(key, value)
        proc = start_train([*args, *probe("pause", "PauseAt", step=7)], tmp_path)
        wait_for(proc, "paused at step 7")
        proc.send_signal(signal.SIGUSR1)  # what sbatch --signal=SIGUSR1@90 sends 90 s before the time limit
        out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGUSR1, out[-3000:]
    assert requeued.read_text() == "requeue 4242\n"
    assert (
        f"Training interrupted by SIGUSR1. Saved {run / 'checkpoints' / LAST} at step 7 (epoch 1). Requeued SLURM job 4242"
        in out
    )
    assert step_of(run / "checkpoints" / LAST) == 7

    for key, value in {**slurm, "SLURM_RESTART_COUNT": "1"}.items():  # SLURM starts the same job again
        monkeypatch.setenv(key, value)
    fit(compose_train(run, args))
    assert_same_run(run / "checkpoints", reference / "checkpoints")
    assert requeued.read_text() == "requeue 4242\n"


# 5. A full disk loses nothing


def test_a_failed_checkpoint_write_keeps_the_previous_one_and_names_the_error(tmp_path, monkeypatch):
    target, io = tmp_path / "checkpoints" / LAST, AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 4}, target)

    def full_disk(obj, f):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(
        CheckpointWriteError,
        match=rf"Could not write the checkpoint {re.escape(str(target))} in "
        rf"{re.escape(str(target.parent))}: No space left on device \(ENOSPC\), "
        r"so the run stopped and nothing half-written was left",
    ):
        io.save_checkpoint({"global_step": 8}, target)
    assert torch.load(target, weights_only=True) == {"global_step": 4}
    assert [p.name for p in target.parent.iterdir()] == [LAST]  # nothing half-written left


def test_last_ckpt_keeps_its_predecessor_once_the_new_one_is_written(tmp_path):
    target, io = tmp_path / LAST, AtomicCheckpointIO()
    for step in (4, 6, 6):  # the same step twice (the epoch's end and every_n_steps): no rotation
        io.save_checkpoint({"global_step": step}, target)
    assert step_of_plain(target) == 6 and step_of_plain(tmp_path / PREVIOUS) == 4


def step_of_plain(path: Path) -> int:
    return torch.load(path, weights_only=True)["global_step"]


@pytest.mark.slow
def test_a_full_disk_stops_the_run_naming_the_folder_and_it_resumes_once_there_is_space(tmp_path, corpus13, reference):
    args = [f"data.path={corpus13}", *RUN]
    go = tmp_path / "disk-is-full"
    proc = start_train([*args, *probe("pause", "PauseAt", step=7, until=go)], tmp_path)
    wait_for(proc, "paused at step 7")
    run = the_run(tmp_path)
    limit = (run / "checkpoints" / LAST).stat().st_size // 2  # later checkpoints no longer fit; logs still do
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (limit, limit))
    go.touch()
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 1, out[-3000:]
    last = run / "checkpoints" / LAST
    assert (
        f"Could not write the checkpoint {last} in {last.parent}: File too large (EFBIG), so the run stopped and "
        f"nothing half-written was left. {last} (step 6) is kept: only the steps after it are lost. Once there is "
        f"space again, resume with: python train.py "
    ) in out
    assert "Traceback" not in out and step_of(last) == 6 and not list(run.rglob("*.partial"))
    assert "Status: failed (Could not write the checkpoint" in (run / "research_log.md").read_text()

    fit(compose_train(run, [*args, f"ckpt_path={run}"]))  # space is back: steps 7-8 lost, the same result
    assert_same_run(run / "checkpoints", reference / "checkpoints")


# 6. A checkpoint that cannot be read


def middle_of_the_largest_tensor(checkpoint: Path) -> int:
    """The offset of the middle byte of the checkpoint's largest tensor record: inside the weights, never in the
    zip's headers or alignment padding, wherever the records happen to fall."""
    with zipfile.ZipFile(checkpoint) as archive:
        record = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    header = checkpoint.read_bytes()[record.header_offset : record.header_offset + 30]
    name, extra = int.from_bytes(header[26:28], "little"), int.from_bytes(header[28:30], "little")
    return record.header_offset + 30 + name + extra + record.file_size // 2


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["cut short", "bit rot"])
def test_a_damaged_last_ckpt_is_refused_naming_the_newest_readable_one(tmp_path, corpus13, reference, damage):
    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(reference), str(run)], check=True)
    last, previous = run / "checkpoints" / LAST, run / "checkpoints" / PREVIOUS
    data = bytearray(last.read_bytes())
    if damage == "cut short":  # a copy that stopped half way
        del data[len(data) // 2 :]
    else:  # one flipped bit in the weights: torch.load alone would load a wrong number
        data[middle_of_the_largest_tensor(last)] ^= 1
    last.write_bytes(bytes(data))
    newest = max((step_of(p), p.name == PREVIOUS, p) for p in (previous, run / "checkpoints" / "best.ckpt"))[2]
    reason = (
        "it is cut short" if damage == "cut short" else r"its contents are damaged \(the checksum of .* does not match"
    )
    args = [f"data.path={corpus13}", *RUN]
    with pytest.raises(
        UsageError,
        match=rf"{reason}.* The newest readable checkpoint of this run is {re.escape(str(newest))} "
        rf"\(step {step_of(newest)}\); resume from it: .*ckpt_path={re.escape(str(newest))}",
    ):
        fit(compose_train(run, [*args, f"ckpt_path={run}"]))

    fit(compose_train(run, [*args, f"ckpt_path={previous}"]))  # the periodic one before it resumes exactly
    got, want = (torch.load(folder / "checkpoints" / LAST, weights_only=True) for folder in (run, reference))
    assert got["global_step"] == want["global_step"] == 18
    for name, tensor in want["state_dict"].items():
        torch.testing.assert_close(got["state_dict"][name], tensor, rtol=0, atol=1e-6)


# 8. Crowded folders


def start_at_once(args: list[str], cwd: Path) -> None:
    """In a forked child: `python train.py *args` in `cwd` (Hydra's own entry point), exit with its status."""
    from hydra.core.global_hydra import GlobalHydra

    from shakespeare.cli.train import train

    os.chdir(cwd)
    GlobalHydra.instance().clear()
    sys.argv = [str(ROOT / "train.py"), *args]
    try:
        train()
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    except BaseException:
        code = 1
    os._exit(code)


@pytest.mark.slow
def test_eight_runs_started_at_once_into_one_outputs_folder_all_finish(tmp_path, corpus13, capsys):
    # 8 runs started within a few milliseconds of each other (forked: no start-up between them) on 2 cores
    args = [
        f"data.path={corpus13}",
        "model=bigram",
        "data.batch_size=16",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false",
        "callbacks.generation_sample.max_new_tokens=0",
        "callbacks.research_log.sample_length=0",
    ]
    context = multiprocessing.get_context("fork")
    runs = [context.Process(target=start_at_once, args=([*args, f"seed={seed}"], tmp_path)) for seed in range(8)]
    for run in runs:
        run.start()
    for run in runs:
        run.join(timeout=600)
    assert [run.exitcode for run in runs] == [0] * 8
    folders = sorted(p.parent for p in (tmp_path / "outputs").glob("*/*/.hydra"))
    assert len(folders) == 8  # each its own folder
    for folder in folders:
        assert "Status: finished" in (folder / "research_log.md").read_text()
        events = EventAccumulator(str(folder))
        events.Reload()
        assert len(events.Scalars("val/loss")) == 2  # complete: both epochs
    capsys.readouterr()
    assert report_main([str(tmp_path / "outputs")]) == 0
    assert capsys.readouterr().out.count("| finished |") == 8
