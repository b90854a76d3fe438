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
import json
import math
import os
import signal
import sys
import threading
import time
from typing import Callable, Literal, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import nnx

from nemojax.compress.distill import DistillConfig, logit_kl
from nemojax.compress.elastic import ElasticConfig, tau_at, trainer_step
from nemojax.config import ConfigError, ModelConfig, build, check_bounds, check_choices, read_run_config
from nemojax.fs import storage_reason
from nemojax.model import PERSISTENT, NemotronH
from nemojax.quant.recipe import QuantOptions, apply_precision, rounding_key
from nemojax.sharding import BATCH_AXES, MeshConfig, batch_sharding, batch_shards, make_mesh, shard_model
from nemojax.train.checkpoint import Checkpoints
from nemojax.train.data import Corpus, DataConfig
from nemojax.train.loss import lm_and_mtp_losses, moe_aux_loss, next_token_ce, update_expert_bias
from nemojax.train.optim import OptimConfig, make_optimizer, schedule


class TrainingError(RuntimeError):
    """Training cannot continue (e.g. the loss became NaN/Inf)."""


class TrainingInterrupted(TrainingError):
    """SIGINT / SIGTERM stopped training (after saving a checkpoint of the current step, unless aborted)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 100
    keep: int = 2
    ckpt_dir: str = "checkpoints/run"     # local path or a remote URL Orbax understands (gs://bucket/run)
    resume_from: str = "latest"           # latest | previous | a saved step number (when the latest is damaged)
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
    distill_teacher: str = ""             # model dir: train the run's model on its logits (train.distill)
    distill: DistillConfig = DistillConfig()   # the distillation loss (also QAD's): KL / CE weights, T, top-k
    init_from: str = ""                   # model dir whose weights start a fresh run (e.g. a pruned model)
    # Nemotron Elastic: train.elastic.budgets=[1.0,0.75,0.5] trains train.init_from (the parent, also the frozen
    # teacher) with the router; the export is an elastic run (`nemojax elastic extract`)
    elastic: ElasticConfig = ElasticConfig(budgets=())

    def __post_init__(self):
        check_choices(self, "train")
        check_bounds(self, "train", 1, "steps", "log_every", "eval_every", "eval_batches", "save_every", "keep")
        check_bounds(self, "train", 0, "loss_chunk_tokens", "mtp_loss_weight", "moe_bias_update_rate")
        if self.qad_teacher and self.precision != "nvfp4":
            raise ConfigError(f"QAD (train.qad_teacher) distills into an nvfp4 student; set train.precision=nvfp4 "
                              f"(got {self.precision!r})")
        if self.qad_teacher and (self.distill_teacher or self.init_from):
            raise ConfigError("train.qad_teacher is the teacher and the student's starting point; leave "
                              "train.distill_teacher and train.init_from unset")
        if self.elastic.budgets:
            if not self.init_from:
                raise ConfigError("train.elastic.budgets trains the nested submodels of a trained parent: set "
                                  "train.init_from to the parent's model directory")
            if self.teacher or self.precision != "bf16":
                raise ConfigError("train.elastic distills from its own frozen parent (train.init_from) in bf16; "
                                  "leave train.distill_teacher / train.qad_teacher unset and train.precision=bf16")

    @property
    def teacher(self) -> str:
        return self.qad_teacher or self.distill_teacher


def load_run_config(path: str, overrides: tuple = ()) -> tuple[ModelConfig, TrainConfig]:
    """Reads a run config YAML (model: + train:) and applies dotted key=value overrides (config.read_run_config)."""
    raw = read_run_config(path, overrides)
    return ModelConfig.from_dict(raw["model"], what=f"{path} model"), build(TrainConfig, raw["train"], "train")


def make_train_step(model_cfg: ModelConfig, cfg: TrainConfig, lr_schedule: optax.Schedule, jit: bool = True):
    """step(model, opt, tokens [batch, seq+1], teacher=None) -> metrics. With a teacher (distillation, QAD) the
    loss is compress/distill.py's (train.distill: logit KL, optional CE mix); "loss" then reports the student's
    cross entropy, "kl_loss" the KL and, with a CE mix, "total_loss" the objective. jit=False returns the plain
    function (nemojax.aot compiles it over abstract state for a TPU topology)."""
    mtp_depth = model_cfg.runtime.mtp_depth if model_cfg.num_nextn_predict_layers else 0

    def loss_fn(model, tokens):
        main, mtp = lm_and_mtp_losses(model, tokens, depth=mtp_depth, chunk_tokens=cfg.loss_chunk_tokens)
        total = main + cfg.mtp_loss_weight * sum(mtp) + moe_aux_loss(model)       # 0 without MoE layers
        return total, (main, mtp)

    kd = cfg.distill

    def distill_loss_fn(model, tokens, teacher):
        inputs = tokens[:, :-1]
        student_logits = model(inputs)
        kl = logit_kl(jax.lax.stop_gradient(teacher(inputs)), student_logits, temperature=kd.temperature,
                      top_k=kd.top_k)
        ce = next_token_ce(student_logits, tokens)
        loss = kd.kl_weight * kl + (kd.ce_weight * ce if kd.ce_weight else 0.0)
        return loss, (jax.lax.stop_gradient(ce), jax.lax.stop_gradient(kl))

    def step(model, opt, tokens, teacher=None):
        # a fresh stochastic-rounding key per step for quantized matmuls (layers fold in their own ids)
        with rounding_key(jax.random.fold_in(jax.random.key(cfg.seed + 7919), opt.step[...])):
            if teacher is None:
                (loss, (main, mtp)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, tokens)
            else:
                (loss, (main, kl)), grads = nnx.value_and_grad(distill_loss_fn, has_aux=True)(model, tokens,
                                                                                           teacher)
                mtp = []
        opt.update(model, grads)
        if cfg.moe_bias_update_rate:
            update_expert_bias(model, cfg.moe_bias_update_rate)          # no-op without MoE layers
        metrics = {"loss": main, "grad_norm": optax.tree.norm(grads), "lr": lr_schedule(opt.step[...] - 1)}
        if teacher is None or kd.ce_weight:
            metrics["total_loss"] = loss
        if teacher is not None:
            metrics["kl_loss"] = kl
        for k, m in enumerate(mtp, start=1):
            metrics[f"mtp_loss_{k}"] = m
        return metrics

    # the model and optimizer state are donated: XLA writes the new state into the old buffers instead of
    # holding two copies of parameters + Adam moments at the step boundary
    return nnx.jit(step, donate_argnums=(0, 1)) if jit else step


@nnx.jit
def eval_loss(model, tokens):
    """Mean next-token cross entropy of one window batch tokens [b, seq + 1]."""
    return next_token_ce(model(tokens[:, :-1]), tokens)


def _agreed_signal(caught: list[int]) -> int:
    """The first signal caught (0: none), agreed by all processes of a multi-host run so that all of them save
    the same step (a checkpoint save is collective)."""
    mine = caught[0] if caught else 0
    if jax.process_count() == 1:
        return mine
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.int32(mine))))


@contextlib.contextmanager
def _signals_caught():
    """SIGINT / SIGTERM are recorded in the yielded list, which the loop checks after each step; a second signal
    aborts at once. Outside the main thread (where handlers cannot be set) signals keep their default action."""
    caught: list[int] = []

    def handler(signum, frame):
        caught.append(signum)
        if len(caught) > 1:
            raise TrainingInterrupted(f"aborted by a second {signal.Signals(signum).name}; the last checkpoint is "
                                      f"the one saved before", signum)

    if threading.current_thread() is not threading.main_thread():
        yield caught
        return
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield caught
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; inf for a line cut short by a crash (dropped on resume)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


class MetricsLog:
    """metrics.jsonl (one JSON record per logged step) and TensorBoard scalars (tensorboardX event files). A run
    resumed at `resume_step` first drops the records of steps after it (they will be logged again; TensorBoard is
    told to drop its events of those steps too); a fresh run
    renames an existing metrics.jsonl (a previous run's) to metrics-TIMESTAMP.jsonl."""

    def __init__(self, directory: str, enabled: bool = True, resume_step: int = 0):
        self.enabled = enabled
        if not enabled:
            return
        from tensorboardX import SummaryWriter

        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "metrics.jsonl")
        if os.path.exists(path) and not resume_step:        # another run's log (its checkpoints are gone): kept
            os.replace(path, os.path.join(directory, f"metrics-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"))
        elif os.path.exists(path):
            with open(path) as f:
                kept = [line for line in f if _logged_step(line) <= resume_step]
            with open(path + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(path + ".tmp", path)
        self.jsonl = open(path, "a")
        # resumed: TensorBoard drops the earlier events of the steps logged again (purge_step)
        self.tb = SummaryWriter(os.path.join(directory, "tensorboard"), purge_step=resume_step + 1 if resume_step
                                else None)

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


RUN_FILE = "run.json"          # in ckpt_dir: what the run's checkpoints were trained as (checked on resume)


def _say(message: str) -> None:
    """A one-line note of the trainer on stderr (process 0 only), above the progress bar."""
    if jax.process_index() == 0:
        from tqdm.auto import tqdm

        tqdm.write(f"nemojax train: {message}", file=sys.stderr)


def _restart_rate(bar, done: int) -> None:
    """Makes a tqdm bar measure its rate and ETA from now on with `done` steps already done (the compiling
    first step would otherwise dominate the estimate)."""
    bar.set_description("train", refresh=False)
    bar.reset()                                               # clock and rate averages start now
    bar.initial = bar.n = bar.last_print_n = done
    bar.refresh()


def run_record(model_cfg: ModelConfig, cfg: TrainConfig) -> dict:
    """What a run's checkpoints depend on: the architecture (not how it runs), the precision recipe, the QAD
    teacher and the step count its learning-rate schedule was laid out over. JSON-ready."""
    arch = {k: v for k, v in model_cfg.to_dict().items() if k != "runtime"}
    record = {"architecture": arch, "precision": cfg.precision, "quant": dataclasses.asdict(cfg.quant),
              "qad_teacher": _abspath(cfg.qad_teacher), "steps": cfg.steps}
    if cfg.distill_teacher:                    # absent otherwise: records of earlier runs stay comparable
        record.update(distill_teacher=_abspath(cfg.distill_teacher), distill=dataclasses.asdict(cfg.distill))
    if cfg.elastic.budgets:
        record.update(elastic=dataclasses.asdict(cfg.elastic), init_from=_abspath(cfg.init_from))
    return json.loads(json.dumps(record, default=str))


def _abspath(path: str) -> str:
    return "" if not path or "://" in path else os.path.abspath(path)


def _differences(saved: dict, now: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(saved.keys() | now.keys()):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} {a!r} -> {b!r}")
    return out


class Trainer:
    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, corpus: Optional[Corpus] = None):
        self.model_cfg, self.cfg = model_cfg, cfg
        self.corpus = corpus or Corpus(cfg.data, jax.process_index(), jax.process_count())
        if self.corpus.tokenize.vocab_size > model_cfg.vocab_size:
            raise ConfigError(f"tokenizer {cfg.data.tokenizer!r} has {self.corpus.tokenize.vocab_size} tokens, more "
                              f"than the model's vocab_size {model_cfg.vocab_size}")
        remote = "://" in cfg.ckpt_dir
        if not remote and os.path.exists(cfg.ckpt_dir) and not os.path.isdir(cfg.ckpt_dir):
            raise ConfigError(f"train.ckpt_dir {cfg.ckpt_dir!r} is a file, not a directory")
        self.ckpt_dir = cfg.ckpt_dir if remote else os.path.abspath(cfg.ckpt_dir)
        self.log_dir = os.path.abspath(cfg.log_dir or ("logs" if remote else cfg.ckpt_dir))
        self.is_chief = jax.process_index() == 0
        teacher = _abspath(cfg.teacher)
        if teacher and not remote and os.path.commonpath([teacher, self.ckpt_dir]) == self.ckpt_dir:
            field = "qad_teacher" if cfg.qad_teacher else "distill_teacher"
            raise ConfigError(f"train.{field} {cfg.teacher!r} lies inside this run's train.ckpt_dir "
                              f"{cfg.ckpt_dir!r}, whose export (CKPT_DIR/model) would overwrite the teacher; give the "
                              f"run its own train.ckpt_dir")
        self._val_batches = None
        self.lr_schedule = schedule(cfg.optim, cfg.steps)
        self.model = NemotronH(model_cfg, nnx.Rngs(cfg.seed))
        self.teacher = self._load_teacher() if cfg.teacher else None
        if cfg.init_from:
            self._init_from(cfg.init_from)
        self.elastic = self._start_elastic() if cfg.elastic.budgets else None
        self.opt = nnx.Optimizer(self.model, make_optimizer(cfg.optim, cfg.steps), wrt=nnx.Param)
        if self.elastic is not None:               # the router is small and stays replicated on a mesh
            self.router_opt = nnx.Optimizer(self.elastic.router, optax.adam(cfg.elastic.router_learning_rate),
                                            wrt=nnx.Param)
        self.mesh = make_mesh(cfg.mesh)
        if self.mesh.size > 1:       # parameters and optimizer state placed by their specs; restores keep them
            shard_model(self.model, self.mesh)
            shard_model(self.opt, self.mesh)
            if self.teacher is not None:
                shard_model(self.teacher, self.mesh)
        if cfg.data.batch_size % batch_shards(self.mesh):
            raise ConfigError(f"batch_size {cfg.data.batch_size} is not divisible by the data x fsdp x expert mesh "
                              f"axes ({' x '.join(str(self.mesh.shape[a]) for a in BATCH_AXES)})")
        self.history: list[dict] = []

    def _load_teacher(self) -> NemotronH:
        """The frozen teacher. QAD: the student starts from its weights (post-training quantization);
        distillation: it must share the student's vocabulary."""
        from nemojax.compress.distill import check_teacher
        from nemojax.convert.auto import load_model
        from nemojax.quant.qad import check_same_architecture

        teacher = load_model(self.cfg.teacher, dtype=self.model_cfg.runtime.param_dtype)
        if not self.cfg.qad_teacher:
            check_teacher(self.model_cfg, teacher.config)
            return teacher
        check_same_architecture(self.model_cfg, teacher.config)
        # copies: the train step donates the student's buffers, which must not be the teacher's
        nnx.update(self.model, jax.tree.map(jnp.copy, nnx.state(teacher, PERSISTENT)))
        return teacher

    def _init_from(self, path: str) -> None:
        """Starts the model from the weights of a model directory of the same architecture (a resumed run
        restores its checkpoint over them)."""
        from nemojax.convert.auto import load_model

        source = load_model(path, dtype=self.model_cfg.runtime.param_dtype)
        a, b = (dict(c.to_dict(), runtime=None) for c in (self.model_cfg, source.config))
        differ = sorted(k for k in a if a[k] != b.get(k))
        if differ:
            raise ConfigError(f"train.init_from {path!r} holds another architecture (" + ", ".join(
                f"{k} {b.get(k)!r} vs the run's {a[k]!r}" for k in differ[:4]) + "); set model.* to match it")
        nnx.update(self.model, nnx.state(source, PERSISTENT))

    def _start_elastic(self):
        """Nemotron Elastic from the parent loaded by init_from: importance on the first calib_batches training
        batches (and the layer ranking with max_skip), the parent sorted into importance order (it becomes the
        run's model) and a frozen copy of it as the teacher. A resumed run repeats this (the same batches give
        the same order) before its checkpoint is restored over the model and router."""
        from nemojax.compress import elastic, importance

        ec = self.cfg.elastic
        elastic.check_model(self.model_cfg)
        if jax.process_count() > 1:
            raise ConfigError("train.elastic runs in one process for now (each host would score importance on its "
                              "own batches and sort the parent differently); a mesh of that process's devices "
                              "works")
        it = self.corpus.train_iterator()
        calib = [np.asarray(next(it)) for _ in range(ec.calib_batches)]
        scores = importance.collect(self.model, calib)
        if ec.max_skip:
            scores.stats.update(importance.depth_scores(self.model, calib))
        run = elastic.start(self.model, scores, ec, seed=self.cfg.seed)
        self.model = run.model
        graphdef, state = nnx.split(run.model)
        self.teacher = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))     # the step donates the model
        return run

    def apply_precision(self, step: int) -> None:
        """Sets the model's linear layers to the run's precision as of `step` (the forward may have switched
        back to high precision); a change of the layers' matmuls makes the jitted step retrace once."""
        apply_precision(self.model, self.cfg.precision, self.cfg.quant, step=step,
                        straight_through=bool(self.cfg.qad_teacher))

    # ------------------------------------------------------------------ checkpoints
    def _stateful(self) -> list:
        """(object, checkpoint key, state) of everything a checkpoint holds."""
        out = [(self.model, "model", nnx.state(self.model, PERSISTENT)), (self.opt, "opt", nnx.state(self.opt))]
        if self.elastic is not None:
            out += [(self.elastic.router, "router", nnx.state(self.elastic.router, nnx.Param)),
                    (self.router_opt, "router_opt", nnx.state(self.router_opt))]
        return out

    def _state_tree(self) -> dict:
        return {key: nnx.to_pure_dict(state) for _, key, state in self._stateful()}

    def _check_resume(self, ckpt: Checkpoints) -> Optional[dict]:
        """Refuses to continue checkpoints trained as something else (architecture, precision recipe, QAD
        teacher: the record in CKPT_DIR/run.json) or past train.steps, before anything is changed; then records
        this run. Returns the record the checkpoints were trained under (None: a fresh run, or checkpoints from
        before run records)."""
        path = epath.Path(self.ckpt_dir) / RUN_FILE
        now = run_record(self.model_cfg, self.cfg)
        steps = ckpt.steps()
        saved = json.loads(path.read_text()) if steps and path.exists() else None
        if saved is not None:
            for what, keys, suffix in (("architecture", None, "2"),
                                       ("precision recipe", ("precision", "quant"), self.cfg.precision),
                                       ("QAD teacher", ("qad_teacher",), "qad"),
                                       ("distillation", ("distill_teacher", "distill"), "distill"),
                                       ("elastic setting", ("elastic", "init_from"), "elastic")):
                if keys is None:                      # architecture fields are named without a prefix
                    differ = _differences(saved.get("architecture") or {}, now["architecture"])
                else:
                    differ = _differences({k: saved.get(k) for k in keys}, {k: now.get(k) for k in keys})
                if differ:
                    raise ConfigError(
                        f"the checkpoints in {self.ckpt_dir} were trained with another {what} ("
                        f"{'; '.join(differ[:4])}{'; ...' if len(differ) > 4 else ''}); continue them with the "
                        f"settings they were started with, or give this run its own train.ckpt_dir (e.g. "
                        f"train.ckpt_dir={self.cfg.ckpt_dir.rstrip('/')}-{suffix})")
        chosen = ckpt.choose(self.cfg.resume_from)
        if chosen is not None and chosen > self.cfg.steps:
            raise ConfigError(f"the run in {self.ckpt_dir} is at step {chosen}, past train.steps={self.cfg.steps}; "
                              f"raise train.steps to continue it, or use another train.ckpt_dir for a new run")
        if self.is_chief:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.parent / f".{RUN_FILE}.writing"
            tmp.write_text(json.dumps(now, indent=2))
            tmp.replace(path)
        return saved

    def _resume_notes(self, saved: Optional[dict], start: int) -> None:
        """One line each: resumed from which step, a finished run, a schedule stretched by more steps."""
        cfg = self.cfg
        if start == 0:
            return
        if start == cfg.steps:
            _say(f"the run in {self.ckpt_dir} already reached step {start} of {cfg.steps}: nothing to train; "
                 f"its model is exported again (raise train.steps to train further)")
            return
        _say(f"resumed from step {start} in {self.ckpt_dir}")
        if saved is not None and saved.get("steps") not in (None, cfg.steps):
            before = float(schedule(cfg.optim, saved["steps"])(start))
            _say(f"train.steps {saved['steps']} -> {cfg.steps}: the {cfg.optim.schedule} learning-rate schedule is "
                 f"laid out over {cfg.steps} steps now, so at step {start} the rate is "
                 f"{float(self.lr_schedule(start)):.3g} (it was {before:.3g} under {saved['steps']} steps)")

    def _restore(self, ckpt: Checkpoints) -> tuple[int, Optional[dict]]:
        """Restores the step train.resume_from names (see checkpoint.py); (0, None) for a fresh run."""
        step = ckpt.choose(self.cfg.resume_from)
        if step is None:
            return 0, None
        restored, data_state = ckpt.restore(step, self._state_tree())
        ckpt.set_aside_after(step)                    # an earlier step chosen: the later ones would block saving
        for obj, key, state in self._stateful():
            nnx.replace_by_pure_dict(state, restored[key])
            nnx.update(obj, state)
        return step, data_state

    def _global_batch(self, local: np.ndarray) -> jax.Array:
        """This host's rows [batch / hosts, seq] -> the global [batch, seq] array sharded over data x fsdp x expert."""
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
        ckpt = Checkpoints(self.ckpt_dir, cfg.keep)
        saved_run = self._check_resume(ckpt)
        start, data_state = self._restore(ckpt)
        self._resume_notes(saved_run, start)
        self.apply_precision(start)
        switch = cfg.quant.bf16_forward_from_step if cfg.precision != "bf16" else 0
        it = self.corpus.train_iterator(data_state)
        step_fn = self._step_fn()
        log = MetricsLog(self.log_dir, enabled=self.is_chief, resume_step=start)
        tokens_per_step = cfg.data.batch_size * cfg.data.seq_len      # inputs (and targets) per step
        end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
        # the first step compiles: the bar says so, and its rate and ETA count from the end of that step
        bar = tqdm(initial=start, total=cfg.steps, disable=not (progress and self.is_chief),
                   desc="train (compiling the step)" if start < end else "train", dynamic_ncols=True)
        if start == 0:
            record0 = {"step": 0, "val_loss": self.validate()}
            self.history.append(record0)
            log.write(record0)
        t_last = time.perf_counter()
        try:
            with _signals_caught() as caught:
                for step in range(start, end):
                    if switch and step == switch:
                        self.apply_precision(step)
                    with self._mesh_context():
                        metrics = step_fn(step, self._global_batch(next(it)))
                    record = {k: float(v) for k, v in metrics.items()}
                    if loss_hook is not None:
                        record["loss"] = loss_hook(step + 1, record["loss"])
                    self._check_saves(ckpt, step + 1)
                    if not all(math.isfinite(v) for v in record.values()):
                        bad = sorted(k for k, v in record.items() if not math.isfinite(v))
                        self._check_saves(ckpt, step + 1, wait=True)
                        raise TrainingError(f"non-finite {', '.join(bad)} at step {step + 1}; stopping before saving. "
                                            f"{self._last_good(ckpt)}")
                    record["step"] = step + 1
                    if step == start:
                        _restart_rate(bar, step + 1)
                    else:
                        bar.update(1)
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
                    signum = _agreed_signal(caught)
                    if (step + 1) % cfg.save_every == 0 or step + 1 == end or signum:
                        with self._save_errors(ckpt, step + 1):    # save() first waits for the one in flight
                            ckpt.save(step + 1, self._state_tree(), it.get_state())
                    if signum:
                        self._check_saves(ckpt, step + 1, wait=True)
                        raise TrainingInterrupted(f"{signal.Signals(signum).name} at step {step + 1}: saved a "
                                                  f"checkpoint of step {step + 1} in {self.ckpt_dir}; run the same "
                                                  f"command to resume", signum)
            self._check_saves(ckpt, end, wait=True)          # the last saves, before reporting success
        finally:
            bar.close()
            log.close()
            with contextlib.suppress(Exception):             # an error already on its way wins over cleanup's
                ckpt.close()
        return self.history

    def _step_fn(self) -> Callable[[int, jax.Array], dict]:
        """fn(step, batch) -> metrics: one training step of the run's kind, updating its state in place."""
        if self.elastic is None:
            step_fn = make_train_step(self.model_cfg, self.cfg, self.lr_schedule)
            return lambda step, batch: step_fn(self.model, self.opt, batch, self.teacher)
        step_fn = trainer_step(self.elastic, self.lr_schedule, seed=self.cfg.seed)
        ec = self.cfg.elastic
        return lambda step, batch: step_fn(self.model, self.opt, self.elastic.router, self.router_opt, batch,
                                           self.teacher, jnp.int32(step), jnp.float32(tau_at(ec, step)))

    def _check_saves(self, ckpt: Checkpoints, step: int, wait: bool = False) -> None:
        """Stops training when an asynchronous checkpoint save has failed (disk full, lost storage); with wait,
        once the saves in flight have finished."""
        with self._save_errors(ckpt, step):
            if wait:
                ckpt.wait()
            ckpt.check_for_errors()

    @contextlib.contextmanager
    def _save_errors(self, ckpt: Checkpoints, step: int):
        """A checkpoint save failing inside (now, or an earlier asynchronous one reported now) becomes one
        TrainingError naming the last good checkpoint."""
        try:
            yield
        except TrainingError:                         # a second signal while waiting: not a save failure
            raise
        except Exception as e:
            raise TrainingError(f"saving a checkpoint failed ({storage_reason(e)}); stopped at step {step}. "
                                f"{self._last_good(ckpt)}") from e

    def _last_good(self, ckpt: Checkpoints) -> str:
        good = ckpt.last_good()
        return (f"Last good checkpoint: step {good} in {self.ckpt_dir}" if good is not None else
                f"No verified checkpoint in {self.ckpt_dir} yet")

    def export(self, directory: Optional[str] = None, force: bool = False) -> str:
        """Saves the current model as a nemojax Orbax model directory (for `nemojax generate`); the default,
        CKPT_DIR/model, is replaced by each export, another directory only with force."""
        from nemojax.convert.orbax import save_orbax

        default = os.path.join(self.ckpt_dir, "model")
        tok = self.cfg.data.tokenizer          # an HF tokenizer travels with the model (byte-level needs no file)
        source = None if tok == "byte" else tok if os.path.isdir(tok) else os.path.dirname(os.path.abspath(tok))
        if self.elastic is not None:          # the run's model, router and settings: `nemojax elastic extract`
            self.elastic.save(directory or default, force=force or directory in (None, default),
                              tokenizer_from=source)
        else:
            save_orbax(self.model, directory or default, force=force or directory in (None, default),
                       tokenizer_from=source)
        return directory or default
