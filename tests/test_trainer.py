"""The trainer's units: parameter groups, the lr schedule, the optimization setup and the data setup's sharding.
(The loop itself is covered end to end: test_train_e2e, test_resume, test_distributed.)"""

import math

import pytest
import torch
from usage_support import TINY

from lineclip.data import ShardedBatches
from lineclip.reading import VOCAB_SIZE
from lineclip.trainer import build_model, lr_lambda, param_groups


def test_param_groups_decay_and_multipliers(compose_cfg):
    cfg = compose_cfg(*TINY, "model.backbone_lr_multiplier=0.1", "text.head_lr_multiplier=3", "optim.lr=1e-3",
                      "loss.reading_weight=1", "loss.bag_weight=1", "loss.text_bag_weight=1", "loss.bag_levels=[1,2]",
                      "loss.logit_scale_lr_multiplier=20")
    model, _, _ = build_model(cfg)
    groups = param_groups(model, cfg)
    by_param = {id(p): g for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert id(p) not in by_param
            continue
        g = by_param[id(p)]
        no_decay = p.ndim < 2 or name == "logit_scale"
        assert (g["weight_decay"] == 0.0) == no_decay, name
        expected = 1e-3 * (0.1 if name.startswith("image_backbone.")
                           else 3 if name.startswith(("text_head.", "text_bag_head."))
                           else 20 if name == "logit_scale" else 1)
        assert g["lr"] == pytest.approx(expected), name
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())
    assert model.bag_head.proj.out_features == model.text_bag_head.proj.out_features == 3 * VOCAB_SIZE


def test_warmup_then_cosine():
    f = lr_lambda(warmup=10, total=110, schedule="cosine", min_ratio=0.0)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(110) == pytest.approx(0.0, abs=1e-12)
    lin = lr_lambda(warmup=0 or 1, total=101, schedule="linear", min_ratio=0.1)
    assert lin(51) == pytest.approx(0.1 + 0.9 * 0.5)


def test_sharded_batches_deal_whole_batches_and_pad_to_equal_counts():
    class Batches:
        def __init__(self, batches):
            self.batches, self.epoch = batches, None

        def set_epoch(self, epoch):
            self.epoch = epoch

        def __iter__(self):
            return iter(self.batches)

        def __len__(self):
            return len(self.batches)

    sampler = Batches([[0, 1], [2, 3], [4, 5]])
    ranks = [ShardedBatches(sampler, rank, 2) for rank in range(2)]
    assert [list(r) for r in ranks] == [[[0, 1], [4, 5]], [[2, 3], [0, 1]]]  # padded with the first batch
    assert [len(r) for r in ranks] == [2, 2]
    ranks[1].set_epoch(3, skip=1)
    assert sampler.epoch == 3 and list(ranks[1]) == [[0, 1]]


def test_build_optimization_counts_steps_per_process(compose_cfg):
    from accelerate import Accelerator

    from lineclip.trainer import build_optimization

    cfg = compose_cfg("trainer.epochs=2", "trainer.gradient_accumulation_steps=2", "optim.warmup_steps=100")
    model, _, _ = build_model(cfg)
    wrapped, opt = build_optimization(cfg, model, Accelerator(cpu=True), batches_per_epoch=9)
    assert isinstance(opt.optimizer.optimizer, torch.optim.AdamW) and opt.micro_per_step == 2  # accelerate wraps it
    assert (opt.steps_per_epoch, opt.total_steps, opt.warmup) == (4, 8, 1)  # warmup above the total: a tenth
    assert opt.schedule["total_steps"] == 8 and opt.schedule["micro_batches_per_step"] == 2
