"""CPU settings: the thread count reaches torch, denormal floats are flushed, and freed big blocks are reused
without page faults."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from shakespeare.cli.train import fit
from shakespeare.errors import UsageError
from shakespeare.run import host as cpu
from shakespeare.run.host import keep_freed_memory, set_threads
from tests.harness import compose_train, fast_first


def test_trainer_threads_reaches_torch(tiny_cfg):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        fit(tiny_cfg("host.threads=1", "trainer.limit_train_batches=1"))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_training_flushes_denormal_floats_to_zero(tiny_cfg):
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush denormal floats (torch.set_flush_denormal needs x86 with SSE3)")
    tiny = torch.tensor([1e-39])  # below float32's smallest normal number, 1.2e-38
    assert (tiny * 1.0).item() > 0  # kept, at a hundred times the cost of arithmetic on normal numbers
    try:
        fit(tiny_cfg("trainer.limit_train_batches=1"))
        assert (tiny * 1.0).item() == 0
    finally:
        torch.set_flush_denormal(False)


@pytest.mark.parametrize("value", fast_first([0, "two", -1, 1.5, True], keep=2))
def test_bad_thread_counts_are_named(value, tiny_cfg):
    with pytest.raises(UsageError, match=r"^host.threads=.* (must be|is refused)"):
        fit(tiny_cfg(f"host.threads={value}"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator only")
def test_big_blocks_are_reused_without_page_faults():
    import resource

    assert keep_freed_memory()
    for _ in range(5):  # the heap grows to hold the block once...
        torch.empty(64 * 2**20, dtype=torch.uint8).fill_(1)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):  # ...then reuses it; fresh mappings would fault every page of every block
        torch.empty(64 * 2**20, dtype=torch.uint8).fill_(1)
    pages = 64 * 2**20 // resource.getpagesize()
    # 5 x pages without the setting; a kernel that reclaims the idle block's pages (e.g. DAMON) may cost one block
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults < 2 * pages


@pytest.mark.slow
def test_cpu_speedrun_validates_at_its_last_step(tiny_cfg):
    cfg = tiny_cfg(
        "experiment=cpu_speedrun", "trainer.max_steps=4", "trainer.val_check_interval=2", "data.batch_size=8"
    )
    metrics = fit(cfg)
    assert (
        cfg.model.qk_norm
        and cfg.model.norm == "layer"
        and cfg.optimizer._target_ == "shakespeare.training.muon.MuonAdamW"
    )
    assert cfg.model.fused_attention and cfg.model.attention_dropout is None and cfg.model.dropout == 0.0
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))


@pytest.mark.parametrize("busy, threads", [(0.1, 4), (1.2, 3), (3.6, 1), (9.0, 1)])
def test_auto_threads_take_the_cores_other_work_leaves_free(busy, threads, monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(cpu, "cores", lambda: 4)
    monkeypatch.setattr(cpu, "TORCH_DEFAULT", 4)
    monkeypatch.setattr(cpu, "busy_cores", lambda seconds=cpu.SAMPLE_SECONDS: busy)
    try:
        set_threads("auto")
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow  # starts a process
def test_busy_cores_sees_another_process_spinning():
    if cpu.busy_cores(0.01) is None:
        pytest.skip("no /proc/stat on this system")
    spinner = subprocess.Popen(
        [sys.executable, "-c", "import time\nend = time.time() + 5\nwhile time.time() < end: pass"]
    )
    try:
        time.sleep(0.3)  # the interpreter started
        assert cpu.busy_cores(0.5) >= 0.6  # one core busy, measured from outside that process
    finally:
        spinner.kill()
        spinner.wait()


def test_cpu_speedrun_uses_every_core_other_work_leaves_free(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert compose_train(tmp_path, ["experiment=cpu_speedrun"]).host.threads == "auto"
    assert compose_train(tmp_path).host.threads == 1  # the other rungs keep one thread, robust beside other work
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # a launcher dividing the cores between parallel jobs decides
    assert compose_train(tmp_path, ["experiment=cpu_speedrun"]).host.threads == 3
