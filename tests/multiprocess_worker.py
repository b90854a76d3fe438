"""One process of a multi-process CPU training run (see test_multiprocess.py): trains 3 steps, stops, resumes
to 6 from the shared checkpoint, prints the losses. argv: process_id num_processes port ckpt_dir [signal]; with
`signal` it trains until SIGINT/SIGTERM stops it and prints the step it stopped at."""

import json
import sys

import jax

from nemojax.distributed import initialize
from nemojax.train.trainer import Trainer, TrainingInterrupted, load_run_config

SMALL = ("model.hidden_size=64", "model.intermediate_size=128", "model.mamba_num_heads=4", "model.mamba_head_dim=16",
         "model.ssm_state_size=16", "model.head_dim=16", "train.data.seq_len=64", "train.data.batch_size=4",
         "train.eval_every=5", "train.eval_batches=2", "train.save_every=3", "train.log_every=1", "train.steps=6")


def main(pid: int, n: int, port: int, ckpt: str, mode: str = "") -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if n > 1:
        initialize("on", coordinator_address=f"localhost:{port}", num_processes=n, process_id=pid)
    if mode == "signal":
        model_cfg, train_cfg = load_run_config("configs/tiny.yaml", SMALL + (
            f"train.ckpt_dir={ckpt}", "train.steps=100000", "train.save_every=100000", "train.eval_every=100000"))
        try:
            Trainer(model_cfg, train_cfg).run(progress=False)
        except TrainingInterrupted as e:
            print("INTERRUPTED " + str(e).split("at step ")[1].split(":")[0], flush=True)
        return
    model_cfg, train_cfg = load_run_config("configs/tiny.yaml", SMALL + (f"train.ckpt_dir={ckpt}",))
    history = Trainer(model_cfg, train_cfg).run(stop_after=3, progress=False)
    history += Trainer(model_cfg, train_cfg).run(progress=False)
    out = {"process": jax.process_index(), "processes": jax.process_count(), "devices": jax.device_count(),
           "losses": [h["loss"] for h in history if "loss" in h], "val": [h["val_loss"] for h in history
                                                                         if "val_loss" in h]}
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:])
