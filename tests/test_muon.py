"""optimizer=muon: Muon on the blocks' matrices, AdamW on the rest, one optimizer to Lightning, exact resumption."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from shakespeare.cli.train import fit
from shakespeare.errors import Interrupted
from shakespeare.model.generator import GeneratorConfig, ShakespeareGenerator
from shakespeare.model.loading import load_generator
from shakespeare.model.sampling import sample
from shakespeare.training.muon import MuonAdamW
from tests.harness import compose_train


def muon_for(rung: str, tmp_path) -> tuple[ShakespeareGenerator, MuonAdamW]:
    cfg = compose_train(tmp_path, [f"model={rung}", "optimizer=muon", "model.num_blocks=2"])
    torch.manual_seed(0)
    model = ShakespeareGenerator(GeneratorConfig(vocab_size=66, **OmegaConf.to_container(cfg.model, resolve=True)))
    return model, instantiate(OmegaConf.to_container(cfg.optimizer), params=model.named_parameters())


def test_muon_takes_the_blocks_matrices_and_adamw_everything_else(tmp_path):
    model, optimizer = muon_for("qk_norm", tmp_path)
    muon = {id(p) for group in optimizer.parts["muon"].param_groups for p in group["params"]}
    names = {name for name, p in model.named_parameters() if id(p) in muon}
    assert names == {
        f"blocks.{b}.{m}.weight"
        for b in (0, 1)
        for m in ("heads.qkv", "heads.projection", "feed_forward.linear", "feed_forward.projection")
    }
    adamw = optimizer.parts["adamw"].param_groups[0]
    assert {id(p) for p in adamw["params"]} == {
        id(p) for p in model.parameters()
    } - muon  # embeddings, head, norms, biases
    assert (adamw["lr"], adamw["weight_decay"], optimizer.parts["muon"].param_groups[0]["lr"]) == (0.003, 0.1, 0.02)


def test_one_step_moves_both_parts_and_a_scheduler_scales_both(tmp_path):
    model, optimizer = muon_for("rope", tmp_path)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    assert [group["lr"] for group in optimizer.param_groups] == [0.01, 0.0015]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    model.loss(torch.randint(1, 66, (4, 8)), torch.randint(1, 66, (4, 8))).backward()
    optimizer.step()
    scheduler.step()
    assert all(not torch.equal(before[name], p) for name, p in model.named_parameters() if "norm" not in name)
    state = optimizer.state_dict()
    assert set(state) == {"muon", "adamw"} and state["muon"]["state"] and state["adamw"]["state"]


def test_plain_parameters_all_go_to_adamw():
    optimizer = MuonAdamW([torch.zeros(3, 3, requires_grad=True)], adamw={"lr": 0.1})
    assert list(optimizer.parts) == ["adamw"]


@pytest.mark.slow
def test_a_muon_run_checkpoints_plain_data_and_resumes_exactly(tmp_path, corpus):
    args = [
        f"data.path={corpus}",
        "model=qk_norm",
        "optimizer=muon",
        "scheduler=warmup_cosine",
        "scheduler.warmup_steps=2",
        "data.batch_size=32",
        "trainer.max_epochs=-1",
        "trainer.max_steps=12",
        "trainer.limit_train_batches=4",
        "trainer.limit_val_batches=2",
        "trainer.enable_progress_bar=false",
        "checkpoint.every_n_steps=3",
    ]
    fit(compose_train(tmp_path / "reference", args))
    run = tmp_path / "run"
    with pytest.raises(Interrupted, match="Saved .* at step 6 "):
        fit(compose_train(run, [*args, "+callbacks.stop._target_=tests.probes.SignalAt", "+callbacks.stop.step=6"]))
    fit(compose_train(run, [*args, f"ckpt_path={run}"]))
    got = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    want = torch.load(tmp_path / "reference" / "checkpoints" / "last.ckpt", weights_only=True)
    assert got["global_step"] == want["global_step"] == 12
    for name, tensor in want["state_dict"].items():
        torch.testing.assert_close(got["state_dict"][name], tensor, rtol=0, atol=1e-6)
    momentum = got["optimizer_states"][0]["muon"]["state"]
    assert momentum and all("momentum_buffer" in s for s in momentum.values())
    model, tokenizer = load_generator(run)  # what generate.py reads: the checkpoint alone, weights_only
    assert "QKNormAttention" in repr(model) and "positional_embedding" not in repr(model)
    text = sample(model, tokenizer, "ROMEO:", max_new_tokens=40, generator=torch.Generator().manual_seed(0))[0]
    assert len(text) == 40 and set(text) <= set(tokenizer.vocabulary)


COEFFICIENTS = (3.4445, -4.775, 2.0315)


def test_cpu_orthogonalisation_is_torchs_iteration_in_float32_a_stack_at_once():
    import torch.optim._muon as torch_muon

    from shakespeare.training.muon import newton_schulz

    grads = torch.randn(3, 96, 32)
    ours = newton_schulz(grads, COEFFICIENTS, 5, 1e-7)
    assert ours.dtype == torch.float32 and ours.shape == grads.shape
    singular = torch.linalg.svdvals(ours)
    assert singular.min() > 0.5 and singular.max() < 1.5  # Muon's "roughly orthogonal"
    for grad, one in zip(grads, ours):
        torch.testing.assert_close(one, newton_schulz(grad[None], COEFFICIENTS, 5, 1e-7)[0])  # alone, the same
        torch.testing.assert_close(
            one, torch_muon._zeropower_via_newtonschulz(grad, COEFFICIENTS, 5, 1e-7).float(), atol=0.02, rtol=0
        )


@pytest.mark.parametrize("nesterov, adjust_lr_fn", [(True, None), (False, "match_rms_adamw")])
def test_batched_muon_steps_as_torchs_muon_does(nesterov, adjust_lr_fn, monkeypatch):
    """Same-shaped matrices batched, one of another shape, a tall one: each ends where torch.optim.Muon (with the
    same float32 iteration, matrix by matrix) takes it, step after step, momentum and weight decay included."""
    import torch.optim._muon as torch_muon

    from shakespeare.training.muon import BatchedMuon, newton_schulz

    monkeypatch.setattr(torch_muon, "_zeropower_via_newtonschulz", lambda g, *a: newton_schulz(g[None], *a)[0])
    shapes = [(32, 16), (32, 16), (16, 16), (64, 16), (32, 16)]
    start = [torch.randn(shape) for shape in shapes]
    settings = dict(lr=0.05, momentum=0.9, weight_decay=0.1, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    ours, theirs = [[torch.nn.Parameter(w.clone()) for w in start] for _ in range(2)]
    batched, reference = BatchedMuon(ours, **settings), torch.optim.Muon(theirs, **settings)
    for _ in range(3):
        grads = [torch.randn(shape) for shape in shapes]
        for params, optimizer in ((ours, batched), (theirs, reference)):
            for param, grad in zip(params, grads):
                param.grad = grad.clone()
            optimizer.step()
    for a, b, w in zip(ours, theirs, start):
        assert not torch.equal(a, w)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert batched.state_dict()["state"].keys() == reference.state_dict()["state"].keys()
    torch.testing.assert_close(batched.state_dict()["state"][0], reference.state_dict()["state"][0])
