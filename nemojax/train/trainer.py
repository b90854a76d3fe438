"""Training loop: jitted train step (next-token + optional MTP and MoE balance losses), Orbax checkpoints with
automatic resume (parameters, optimizer state, data iterator state and step), NaN/Inf detection that stops
before the bad state is saved, periodic validation, a progress bar, and metrics as JSONL plus TensorBoard event
files (written by process 0 only on multi-host runs).

Run configs are YAML with `model:` and `train:` sections (configs/tiny.yaml); `key=value` overrides use
dotted names (`train.steps=100`, `model.hidden_size=64`, `train.optim.lr=1e-3`, `train.data.seq_len=128`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import time
from typing import Callable, Literal, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from nemojax.config import ConfigError, ModelConfig, build, check_choices, read_run_config
from nemojax.model import PERSISTENT, NemotronH
from nemojax.quant.recipe import QuantOptions, apply_precision, rounding_key
from nemojax.sharding import MeshConfig, batch_sharding, make_mesh, shard_model
from nemojax.train.data import Corpus, DataConfig
from nemojax.train.loss import lm_and_mtp_losses, moe_aux_loss, next_token_ce, update_expert_bias
from nemojax.train.optim import OptimConfig, make_optimizer, schedule


class TrainingError(RuntimeError):
    """Training cannot continue (e.g. the loss became NaN/Inf)."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 100
    keep: int = 2
    ckpt_dir: str = "checkpoints/run"     # local path or a remote URL Orbax understands (gs://bucket/run)
    log_dir: str = ""                     # metrics.jsonl + TensorBoard events; "" = ckpt_dir (or ./logs if remote)
    mtp_loss_weight: float = 0.3          # used when the model has an MTP head
    moe_bias_update_rate: float = 1e-3    # aux-loss-free balancing step for MoE layers (0 disables)
    loss_chunk_tokens: int = 0            # > 0: the fused output-layer loss holds logits for this many positions
                                          # per row at a time (memory for large vocabularies; costs a matmul)
    seed: int = 0
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    mesh: MeshConfig = MeshConfig()       # data=-1 fills the devices; e.g. train.mesh.tensor=2
    precision: Literal["bf16", "fp8", "nvfp4", "aqt_int8", "aqt_int4"] = "bf16"   # bf16: no quantization
    quant: QuantOptions = QuantOptions()  # recipe details (high-precision blocks, RHT, SR, forward switch)
    qad_teacher: str = ""                 # model dir: distill it into an NVFP4 student started from its weights

    def __post_init__(self):
        check_choices(self, "train")
        if self.loss_chunk_tokens < 0:
            raise ConfigError(f"train.loss_chunk_tokens must be >= 0, got {self.loss_chunk_tokens}")
        if self.qad_teacher and self.precision != "nvfp4":
            raise ConfigError(f"QAD (train.qad_teacher) distills into an nvfp4 student; set train.precision=nvfp4 "
                              f"(got {self.precision!r})")


def load_run_config(path: str, overrides: tuple = ()) -> tuple[ModelConfig, TrainConfig]:
    """Reads a run config YAML (model: + train:) and applies dotted key=value overrides (config.read_run_config)."""
    raw = read_run_config(path, overrides)
    return ModelConfig.from_dict(raw["model"], what=f"{path} model"), build(TrainConfig, raw["train"], "train")


def make_train_step(model_cfg: ModelConfig, cfg: TrainConfig, lr_schedule: optax.Schedule):
    """step(model, opt, tokens [batch, seq+1], teacher=None) -> metrics. With a teacher (QAD) the loss is the
    logit KL to it alone; "loss" then reports the student's cross entropy for comparison."""
    mtp_depth = model_cfg.runtime.mtp_depth if model_cfg.num_nextn_predict_layers else 0

    def loss_fn(model, tokens):
        main, mtp = lm_and_mtp_losses(model, tokens, depth=mtp_depth, chunk_tokens=cfg.loss_chunk_tokens)
        total = main + cfg.mtp_loss_weight * sum(mtp) + moe_aux_loss(model)       # 0 without MoE layers
        return total, (main, mtp)

    def qad_loss_fn(model, tokens, teacher):
        from nemojax.quant.qad import logit_kl

        inputs = tokens[:, :-1]
        student_logits = model(inputs)
        kl = logit_kl(jax.lax.stop_gradient(teacher(inputs)), student_logits)
        return kl, (jax.lax.stop_gradient(next_token_ce(student_logits, tokens)), [])

    # the model and optimizer state are donated: XLA writes the new state into the old buffers instead of
    # holding two copies of parameters + Adam moments at the step boundary
    @functools.partial(nnx.jit, donate_argnums=(0, 1))
    def step(model, opt, tokens, teacher=None):
        # a fresh stochastic-rounding key per step for quantized matmuls (layers fold in their own ids)
        with rounding_key(jax.random.fold_in(jax.random.key(cfg.seed + 7919), opt.step[...])):
            if teacher is None:
                (loss, (main, mtp)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, tokens)
            else:
                (loss, (main, mtp)), grads = nnx.value_and_grad(qad_loss_fn, has_aux=True)(model, tokens, teacher)
        opt.update(model, grads)
        if cfg.moe_bias_update_rate:
            update_expert_bias(model, cfg.moe_bias_update_rate)          # no-op without MoE layers
        metrics = {"loss": main, ("kl_loss" if teacher is not None else "total_loss"): loss,
                   "grad_norm": optax.tree.norm(grads),
                   "lr": lr_schedule(opt.step[...] - 1)}
        for k, m in enumerate(mtp, start=1):
            metrics[f"mtp_loss_{k}"] = m
        return metrics

    return step


@nnx.jit
def eval_loss(model, tokens):
    """Mean next-token cross entropy of one window batch tokens [b, seq + 1]."""
    return next_token_ce(model(tokens[:, :-1]), tokens)


class MetricsLog:
    """metrics.jsonl (one JSON record per logged step) and TensorBoard scalars (tensorboardX event files)."""

    def __init__(self, directory: str, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        from tensorboardX import SummaryWriter

        os.makedirs(directory, exist_ok=True)
        self.jsonl = open(os.path.join(directory, "metrics.jsonl"), "a")
        self.tb = SummaryWriter(os.path.join(directory, "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        step = int(record["step"])
        for key, value in record.items():
            if key != "step":
                self.tb.add_scalar(f"train/{key}" if key != "val_loss" else "eval/loss", value, step)
        self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()


class Trainer:
    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, corpus: Optional[Corpus] = None):
        self.model_cfg, self.cfg = model_cfg, cfg
        self.corpus = corpus or Corpus(cfg.data, jax.process_index(), jax.process_count())
        if self.corpus.tokenize.vocab_size > model_cfg.vocab_size:
            raise ConfigError(f"tokenizer {cfg.data.tokenizer!r} has {self.corpus.tokenize.vocab_size} tokens, more "
                              f"than the model's vocab_size {model_cfg.vocab_size}")
        remote = "://" in cfg.ckpt_dir
        self.ckpt_dir = cfg.ckpt_dir if remote else os.path.abspath(cfg.ckpt_dir)
        self.log_dir = os.path.abspath(cfg.log_dir or ("logs" if remote else cfg.ckpt_dir))
        self.is_chief = jax.process_index() == 0
        self._val_batches = None
        self.lr_schedule = schedule(cfg.optim, cfg.steps)
        self.model = NemotronH(model_cfg, nnx.Rngs(cfg.seed))
        self.teacher = self._load_teacher() if cfg.qad_teacher else None
        self.opt = nnx.Optimizer(self.model, make_optimizer(cfg.optim, cfg.steps), wrt=nnx.Param)
        self.mesh = make_mesh(cfg.mesh)
        if self.mesh.size > 1:       # parameters and optimizer state placed by their specs; restores keep them
            shard_model(self.model, self.mesh)
            shard_model(self.opt, self.mesh)
            if self.teacher is not None:
                shard_model(self.teacher, self.mesh)
        if cfg.data.batch_size % (self.mesh.shape["data"] * self.mesh.shape["fsdp"]):
            raise ConfigError(f"batch_size {cfg.data.batch_size} is not divisible by the data x fsdp mesh axes "
                              f"({self.mesh.shape['data']} x {self.mesh.shape['fsdp']})")
        self.history: list[dict] = []

    def _load_teacher(self) -> NemotronH:
        """The frozen QAD teacher; the student starts from its weights (post-training quantization)."""
        from nemojax.convert.auto import load_model
        from nemojax.quant.qad import check_same_architecture

        teacher = load_model(self.cfg.qad_teacher, dtype=self.model_cfg.runtime.param_dtype)
        check_same_architecture(self.model_cfg, teacher.config)
        # copies: the train step donates the student's buffers, which must not be the teacher's
        nnx.update(self.model, jax.tree.map(jnp.copy, nnx.state(teacher, PERSISTENT)))
        return teacher

    def apply_precision(self, step: int) -> None:
        """Sets the model's linear layers to the run's precision as of `step` (the forward may have switched
        back to high precision); a change of the layers' matmuls makes the jitted step retrace once."""
        apply_precision(self.model, self.cfg.precision, self.cfg.quant, step=step,
                        straight_through=self.teacher is not None)

    # ------------------------------------------------------------------ checkpoints
    def _manager(self):
        import orbax.checkpoint as ocp

        return ocp.CheckpointManager(os.path.join(self.ckpt_dir, "checkpoints"),
                                     options=ocp.CheckpointManagerOptions(max_to_keep=self.cfg.keep,
                                                                          enable_async_checkpointing=True))

    def _state_tree(self) -> dict:
        return {"model": nnx.to_pure_dict(nnx.state(self.model, PERSISTENT)),
                "opt": nnx.to_pure_dict(nnx.state(self.opt))}

    def _save(self, mgr, step: int, data_state: dict) -> None:
        import orbax.checkpoint as ocp

        mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(self._state_tree()),
                                               data=ocp.args.JsonSave(data_state)))

    def _restore(self, mgr) -> tuple[int, Optional[dict]]:
        import orbax.checkpoint as ocp

        step = mgr.latest_step()
        if step is None:
            return 0, None
        restored = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(self._state_tree()),
                                                             data=ocp.args.JsonRestore()))
        model_state, opt_state = nnx.state(self.model, PERSISTENT), nnx.state(self.opt)
        nnx.replace_by_pure_dict(model_state, restored.state["model"])
        nnx.replace_by_pure_dict(opt_state, restored.state["opt"])
        nnx.update(self.model, model_state)
        nnx.update(self.opt, opt_state)
        return int(step), dict(restored.data)

    def _global_batch(self, local: np.ndarray) -> jax.Array:
        """This host's rows [batch / hosts, seq] -> the global [batch, seq] array sharded over data x fsdp."""
        return jax.make_array_from_process_local_data(batch_sharding(self.mesh), np.asarray(local))

    def _mesh_context(self):
        """The mesh as jax's current mesh, so the model's activation constraints apply (multi-device only)."""
        return jax.set_mesh(self.mesh) if self.mesh.size > 1 else contextlib.nullcontext()

    # ------------------------------------------------------------------ loop
    def validate(self) -> float:
        if self._val_batches is None:
            self._val_batches = self.corpus.validation_batches(self.cfg.eval_batches)
        with self._mesh_context():
            losses = [float(eval_loss(self.model, self._global_batch(b))) for b in self._val_batches]
        return float(np.mean(losses)) if losses else float("nan")

    def run(self, stop_after: Optional[int] = None, progress: bool = True,
            loss_hook: Optional[Callable[[int, float], float]] = None) -> list[dict]:
        """Trains to cfg.steps, resuming from the latest checkpoint in ckpt_dir. stop_after ends the run early
        after that many steps of this call (a simulated interruption). loss_hook(step, loss) -> loss lets tests
        inject a bad loss."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        mgr = self._manager()
        start, data_state = self._restore(mgr)
        self.apply_precision(start)
        switch = cfg.quant.bf16_forward_from_step if cfg.precision != "bf16" else 0
        it = self.corpus.train_iterator(data_state)
        step_fn = make_train_step(self.model_cfg, cfg, self.lr_schedule)
        log = MetricsLog(self.log_dir, enabled=self.is_chief)
        tokens_per_step = cfg.data.batch_size * cfg.data.seq_len      # inputs (and targets) per step
        end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
        bar = tqdm(range(start, end), initial=start, total=cfg.steps, disable=not (progress and self.is_chief),
                   desc="train", dynamic_ncols=True)
        if start == 0:
            record0 = {"step": 0, "val_loss": self.validate()}
            self.history.append(record0)
            log.write(record0)
        t_last = time.perf_counter()
        try:
            for step in bar:
                if switch and step == switch:
                    self.apply_precision(step)
                with self._mesh_context():
                    metrics = step_fn(self.model, self.opt, self._global_batch(next(it)), self.teacher)
                record = {k: float(v) for k, v in metrics.items()}
                if loss_hook is not None:
                    record["loss"] = loss_hook(step + 1, record["loss"])
                if not all(math.isfinite(v) for v in record.values()):
                    bad = sorted(k for k, v in record.items() if not math.isfinite(v))
                    mgr.wait_until_finished()
                    raise TrainingError(f"non-finite {', '.join(bad)} at step {step + 1}; stopping before saving. "
                                        f"Last good checkpoint: step {mgr.latest_step()} in {self.ckpt_dir}")
                record["step"] = step + 1
                now = time.perf_counter()
                record["tokens_per_s"] = tokens_per_step / max(now - t_last, 1e-9)
                t_last = now
                if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                    record["val_loss"] = self.validate()
                self.history.append(record)
                if (step + 1) % cfg.log_every == 0 or "val_loss" in record:
                    log.write(record)
                    bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}",
                                    gnorm=f"{record['grad_norm']:.2f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                    **({"val": f"{record['val_loss']:.3f}"} if "val_loss" in record else {}))
                if (step + 1) % cfg.save_every == 0 or step + 1 == end:
                    self._save(mgr, step + 1, it.get_state())
        finally:
            bar.close()
            log.close()
            mgr.wait_until_finished()
            mgr.close()
        return self.history

    def export(self, directory: Optional[str] = None) -> str:
        """Saves the current model as a nemojax Orbax model directory (for `nemojax generate`)."""
        from nemojax.convert.orbax import save_orbax

        directory = directory or os.path.join(self.ckpt_dir, "model")
        save_orbax(self.model, directory, force=True)
        return directory
