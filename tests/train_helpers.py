"""Shared by the training tests: a small tiny-config variant and a Trainer factory (the corpus fixture that
goes with it is in conftest.py)."""

from nemojax.train.trainer import Trainer, load_run_config

SMALL = ("model.hidden_size=64", "model.intermediate_size=128", "model.mamba_num_heads=4", "model.mamba_head_dim=16",
         "model.ssm_state_size=16", "model.head_dim=16", "train.data.seq_len=64", "train.data.batch_size=4",
         "train.eval_every=10", "train.eval_batches=2", "train.save_every=5",
         "train.log_every=5", "train.optim.warmup_steps=5", "train.steps=20")


def make(directory, corpus, *extra):
    """A Trainer on SMALL + extra overrides (later ones win) checkpointing into `directory`."""
    model_cfg, train_cfg = load_run_config("configs/tiny.yaml", SMALL + (f"train.ckpt_dir={directory}",) + extra)
    return Trainer(model_cfg, train_cfg, corpus)
