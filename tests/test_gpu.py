"""What only a CUDA GPU can show: a bf16-mixed training step, a compiled model, and the sliding-window sampler
equal to the model on the GPU. Skipped without one; run them where a GPU is lent."""

from __future__ import annotations

import pytest
import torch

from shakespeare.cli.train import fit
from shakespeare.model.sliding_window import SlidingWindow
from tests.harness import ROTARY_RUNGS, rotary_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ON_THE_GPU = ["trainer=gpu", "host.threads=1"]


def test_a_bf16_mixed_training_step_learns(tiny_cfg):
    before = fit(tiny_cfg(*ON_THE_GPU, "model=block_norm_dropout", "trainer.limit_train_batches=1"))["val/loss"]
    after = fit(
        tiny_cfg(
            *ON_THE_GPU,
            "model=block_norm_dropout",
            "trainer.precision=bf16-mixed",
            "optimizer.lr=0.01",
            "trainer.max_epochs=3",
            "trainer.limit_train_batches=40",
        )
    )["val/loss"]
    assert torch.isfinite(torch.tensor(after)) and after < before


def test_a_compiled_model_trains_and_its_checkpoint_is_the_plain_models(tiny_cfg):
    cfg = tiny_cfg(*ON_THE_GPU, "model=qk_norm", "model.compile=true", "trainer.precision=bf16-mixed")
    assert torch.isfinite(torch.tensor(fit(cfg)["val/loss"]))
    state = torch.load(f"{cfg.paths.output_dir}/checkpoints/best.ckpt", weights_only=True)["state_dict"]
    assert not [name for name in state if "_orig_mod" in name]  # loads into the uncompiled model


@pytest.mark.parametrize("rung, overrides", ROTARY_RUNGS)
@torch.inference_mode()
def test_on_the_gpu_the_sliding_window_is_the_models_own_function_up_to_its_context(rung, overrides, tmp_path):
    model = rotary_model(rung, overrides, tmp_path).cuda()
    T = model.cfg.sequence_length
    idx = torch.randint(1, 66, (3, T), device="cuda")
    window = SlidingWindow(model, num_streams=3)
    for n in range(1, T + 1):
        torch.testing.assert_close(window(idx[:, :n]), model(idx[:, :n])[:, -1], atol=1e-4, rtol=1e-4)
