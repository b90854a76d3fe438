"""Compression on CPU (issue 15): what pruning, distillation and Nemotron Elastic buy at equal training tokens.

A parent (PARENT: 4.8M parameters, 5 Mamba / 5 MLP / 2 attention layers, 4 SSM groups) is trained on the embedded
stdlib corpus; then, from the same importance scores (one calibration pass over training batches) and with the same
number of training tokens for every arm:

  1. width pruning to ~50% of the parameters (embedding, FFN, Mamba heads), evaluated as pruned (no retraining);
  2. the same model distilled from the parent (logit KL, train.distill_teacher) for TOKENS tokens;
  3. the same architecture trained from scratch (cross entropy) for TOKENS tokens;
  4. Mamba heads halved group-aware (2 of 4 heads in every B/C group, ranked within the group) vs. group-blind
     (the globally top-ranked heads, in their original order, placed into the groups' slots: a head moved out
     of its group then reads another group's B/C), each as pruned and distilled;
  5. depth pruning (the least important layers by LM-loss increase, until the model is no larger than arm 1's)
     vs. arm 2, both distilled;
  6. Nemotron Elastic: one joint run of budgets 1.0 / 0.75 / 0.5 for 2 x TOKENS tokens, its 75% and 50%
     submodels extracted zero-shot, vs. the parent pruned to the same sizes and distilled separately for TOKENS
     tokens each (2 x TOKENS in all).

Every loss is the mean next-token cross entropy on the same held-out validation batches. Goals (issue 15): pruned +
distilled beats from scratch; group-aware beats group-blind; the Elastic 50% submodel is within 2% of the loss of
its separately distilled counterpart.

    python benchmarks/compression.py                   # writes benchmarks/compression.md (~30 min, 2 CPU cores)
    python benchmarks/compression.py --parent-steps 20 --steps 5 --out /tmp/c.md     # a quick check of the code
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import platform
import shutil
import tempfile
import time

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")       # a CPU benchmark (libtpu, when installed, is not a device here)

PARENT = ("model.hidden_size=256", "model.pattern=M-M*-M-M-M*-", "model.intermediate_size=768",
          "model.mamba_num_heads=16", "model.mamba_head_dim=32", "model.n_groups=4", "model.ssm_state_size=32",
          "model.num_attention_heads=8", "model.num_key_value_heads=2", "model.head_dim=32",
          "train.data.seq_len=128", "train.data.batch_size=8")
# width targets tried for "~50%": the one whose parameter count is closest to half the parent's is used
WIDTH_CANDIDATES = [dict(hidden_size=h, intermediate_size=f, mamba_num_heads=m)
                    for h in (256, 224, 192) for f in (512, 384, 256) for m in (12, 8)]
DISTILL = ("train.optim.lr=1e-3", "train.optim.warmup_steps=20", "train.optim.weight_decay=0")
ELASTIC_LR = 1e-3


class Bench:
    def __init__(self, args, workdir: str):
        from nemojax.train.data import Corpus
        from nemojax.train.trainer import load_run_config

        self.args, self.workdir = args, workdir
        self.model_cfg, self.train_cfg = load_run_config("configs/tiny.yaml", PARENT)
        corpus = Corpus(self.train_cfg.data)
        self.val = corpus.validation_batches(args.val_batches)
        it = corpus.train_iterator()
        self.calib = [np.asarray(next(it)) for _ in range(args.calib_batches)]
        self.seconds: dict[str, float] = {}

    def overrides(self, steps: int, name: str, *extra: str) -> tuple:
        every = max(1, steps // 10)
        return PARENT + (f"train.steps={steps}", f"train.eval_every={steps}", f"train.save_every={steps}",
                         f"train.log_every={every}", "train.eval_batches=1", "train.keep=1",
                         f"train.ckpt_dir={os.path.join(self.workdir, name)}", *extra)

    def train(self, name: str, steps: int, *extra: str, model_cfg=None, eval_every: int = 0):
        """A Trainer run from step 0 of the training stream (same data order for every arm); (model, history)."""
        from nemojax.train.trainer import Trainer, load_run_config

        cfg, tcfg = load_run_config("configs/tiny.yaml", self.overrides(steps, name, *extra))
        if eval_every:
            tcfg = dataclasses.replace(tcfg, eval_every=eval_every, eval_batches=self.args.val_batches)
        t0 = time.perf_counter()
        trainer = Trainer(model_cfg or cfg, tcfg)
        history = trainer.run(progress=False)
        self.seconds[name] = time.perf_counter() - t0
        return trainer.model, history

    def loss(self, model) -> float:
        from nemojax.train.trainer import eval_loss

        return float(np.mean([float(eval_loss(model, b)) for b in self.val]))

    def save(self, model, name: str) -> str:
        from nemojax.convert.orbax import save_orbax

        path = os.path.join(self.workdir, name)
        save_orbax(model, path, force=True)
        return path

    def distill(self, name: str, student, teacher_dir: str, steps: int):
        start = self.save(student, name + "-init")
        model, _ = self.train(name, steps, *DISTILL, f"train.distill_teacher={teacher_dir}",
                              f"train.init_from={start}", model_cfg=student.config)
        return model


def blind_mamba_selection(x_score, groups, heads, head_dim):
    """prune.mamba_selection without groups: the globally top-ranked heads, in their original order."""
    from nemojax.compress import prune as prune_lib

    channels = prune_lib._top(np.sqrt(np.sum(x_score ** 2, axis=0)), head_dim)
    head_score = np.sqrt(np.sum(x_score[:, channels] ** 2, axis=1))
    return np.sort(prune_lib._top(head_score, heads)), channels


@contextlib.contextmanager
def group_blind_mamba():
    """Pruning inside selects Mamba heads with blind_mamba_selection."""
    from nemojax.compress import prune as prune_lib

    aware = prune_lib.mamba_selection
    prune_lib.mamba_selection = blind_mamba_selection
    try:
        yield
    finally:
        prune_lib.mamba_selection = aware


def moved_heads(scores, cfg, heads: int) -> int:
    """How many of the group-blind choice's heads land outside their own group."""
    moved = 0
    for i, kind in enumerate(cfg.pattern):
        if kind == "M":
            picked, _ = blind_mamba_selection(np.sqrt(scores.get(("layers", i), "x")), cfg.n_groups, heads,
                                              cfg.mamba_head_dim)
            old_group = picked // (cfg.mamba_num_heads // cfg.n_groups)
            new_group = np.arange(heads) // (heads // cfg.n_groups)
            moved += int(np.sum(old_group != new_group))
    return moved


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parent-steps", type=int, default=800)
    p.add_argument("--steps", type=int, default=100, help="training steps of every compressed arm (TOKENS)")
    p.add_argument("--val-batches", type=int, default=16)
    p.add_argument("--calib-batches", type=int, default=8)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "compression.md"))
    args = p.parse_args()

    import jax
    from flax import nnx

    from nemojax.compress import elastic, importance
    from nemojax.compress import prune as prune_lib
    from nemojax.model import NemotronH, count_params
    from nemojax.train.data import Corpus

    t_start = time.perf_counter()
    workdir = tempfile.mkdtemp(prefix="nemojax_compression_")
    # arms of the same shapes (group-aware / group-blind, the separate distillations) reuse compiled steps
    jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "xla-cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    b = Bench(args, workdir)
    tokens_per_step = b.train_cfg.data.batch_size * b.train_cfg.data.seq_len
    tokens = args.steps * tokens_per_step
    rows: list[tuple] = []                     # (arm, params, loss, tokens trained, note)

    # -- the parent
    parent, history = b.train("parent", args.parent_steps, eval_every=max(1, args.parent_steps // 10))
    parent_dir = b.save(parent, "parent-model")
    curve = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
    full = count_params(parent)
    parent_loss = b.loss(parent)
    rows.append(("parent", full, parent_loss, args.parent_steps * tokens_per_step, ""))
    print(f"parent: {full:,} params, loss {parent_loss:.4f}, curve {curve}", flush=True)

    # -- importance (one calibration pass) and depth scores
    scores = importance.collect(parent, b.calib)
    scores.stats.update(importance.depth_scores(parent, b.calib[:2]))
    cfg = parent.config

    def pruned(targets):
        return prune_lib.prune(parent, scores, targets)

    # -- 1-3: width pruning to ~50%, as pruned, distilled, from scratch
    def params_of(targets) -> int:
        new = prune_lib.pruned_config(cfg, targets)
        return count_params(nnx.eval_shape(lambda: NemotronH(new, nnx.Rngs(0))))

    widths = min(WIDTH_CANDIDATES, key=lambda w: abs(params_of(prune_lib.Targets(**w)) / full - 0.5))
    width_targets = prune_lib.Targets(**widths)
    width_model = pruned(width_targets)
    width_params = count_params(width_model)
    note = ", ".join(f"{k} {getattr(cfg, k)} -> {v}" for k, v in widths.items())
    width_pruned_loss = b.loss(width_model)
    rows.append(("width-pruned ~50%, no retraining", width_params, width_pruned_loss, 0, note))
    distilled = b.distill("width-distilled", width_model, parent_dir, args.steps)
    distilled_loss = b.loss(distilled)
    rows.append(("width-pruned ~50% + distillation", width_params, distilled_loss, tokens, "KL to the parent"))
    scratch, _ = b.train("scratch", args.steps, model_cfg=width_model.config)
    scratch_loss = b.loss(scratch)
    rows.append(("same architecture from scratch", count_params(scratch), scratch_loss, tokens,
                 "cross entropy, the parent's recipe"))
    print(rows[-3:], flush=True)

    # -- 4: group-aware vs group-blind Mamba head pruning (heads halved)
    heads = cfg.mamba_num_heads // 2
    mamba_targets = prune_lib.Targets(mamba_num_heads=heads)
    aware = pruned(mamba_targets)
    with group_blind_mamba():
        blind = pruned(mamba_targets)
    moved = moved_heads(scores, cfg, heads)
    n_mamba = cfg.pattern.count("M")
    group_rows = []
    for label, model in (("group-aware", aware), ("group-blind", blind)):
        zero = b.loss(model)
        tuned = b.loss(b.distill(f"mamba-{label}", model, parent_dir, args.steps))
        group_rows.append((label, count_params(model), zero, tuned))
    print(group_rows, flush=True)

    # -- 5: depth pruning to no more than the width model's parameters, distilled
    order = prune_lib.rank_layers(scores, cfg.num_layers, "loss")
    drop: list[int] = []
    for layer in order:
        drop.append(int(layer))
        depth_model = prune_lib.drop_layers(parent, drop)
        if count_params(depth_model) <= width_params or len(drop) == cfg.num_layers - 1:
            break
    depth_zero = b.loss(depth_model)
    depth_loss = b.loss(b.distill("depth-distilled", depth_model, parent_dir, args.steps))
    depth_pattern = depth_model.config.pattern
    print(depth_pattern, depth_zero, depth_loss, flush=True)

    # -- 6: Nemotron Elastic (one joint run, 2 x TOKENS) vs separately pruned and distilled (TOKENS each)
    ec = elastic.ElasticConfig(budgets=(1.0, 0.75, 0.5), learning_rate=ELASTIC_LR)
    run = elastic.start(parent, scores, ec)
    stream = Corpus(b.train_cfg.data).train_iterator()             # the Trainer arms' data, in the same order
    batches = [np.asarray(next(stream)) for _ in range(2 * args.steps)]
    t0 = time.perf_counter()
    hist = elastic.train(run, batches, 2 * args.steps)
    b.seconds["elastic"] = time.perf_counter() - t0
    elastic_rows = []
    for budget in (0.75, 0.5):
        chosen = run.chosen(budget)
        sub = run.extract_sizes(chosen)
        sub_loss = b.loss(sub)
        separate = pruned(run.targets(chosen))
        sep_zero = b.loss(separate)
        sep_loss = b.loss(b.distill(f"separate-{budget:g}", separate, parent_dir, args.steps))
        elastic_rows.append((budget, chosen, count_params(sub), sub_loss, sep_zero, sep_loss))
    run.unmasked()
    elastic_full = b.loss(run.model)
    print(elastic_rows, flush=True)
    shutil.rmtree(workdir, ignore_errors=True)

    # -- the report
    goal_scratch = distilled_loss < scratch_loss
    goal_groups = group_rows[0][3] < group_rows[1][3]
    e50 = next(r for r in elastic_rows if r[0] == 0.5)
    gap50 = e50[3] / e50[5] - 1
    goal_elastic = gap50 <= 0.02

    def met(ok: bool) -> str:
        return "**met**" if ok else "**missed**"

    minutes = (time.perf_counter() - t_start) / 60
    lines = [
        "# Compression on the embedded corpus (generated by `python benchmarks/compression.py`)",
        "",
        f"Parent: `configs/tiny.yaml` with {' '.join(PARENT)}: {full:,} parameters, pattern `{cfg.pattern}`, "
        f"{cfg.n_groups} SSM groups. It trained {args.parent_steps} steps of {tokens_per_step} tokens "
        f"(the tiny config's recipe: AdamW, WSD schedule, lr {b.train_cfg.optim.lr}). Every compressed arm trains "
        f"{args.steps} steps = {tokens:,} tokens from the start of the same training stream (the Elastic joint run "
        f"and the two separate distillations it is compared with: {2 * tokens:,} in all). Distillation: forward KL "
        f"at T = 1 to the frozen parent, AdamW lr 1e-3 (WSD, 20 warm-up steps); from scratch: the parent's recipe. "
        f"Importance: one calibration pass over {args.calib_batches} training batches. Loss: mean next-token cross "
        f"entropy (nats) on {len(b.val)} held-out validation batches ({len(b.val) * tokens_per_step:,} tokens). "
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, {time.strftime('%Y-%m-%d')}, "
        f"{minutes:.0f} min in all.",
        "",
        "Parent validation loss while training (step: loss): "
        + ", ".join(f"{s}: {v:.3f}" for s, v in curve) + ".",
        "",
        "## Goals",
        "",
        f"- Pruned + distilled beats from scratch at equal tokens: {distilled_loss:.4f} vs {scratch_loss:.4f}: "
        f"{met(goal_scratch)}.",
        f"- Group-aware beats group-blind Mamba pruning (distilled): {group_rows[0][3]:.4f} vs "
        f"{group_rows[1][3]:.4f}: {met(goal_groups)}.",
        f"- The Elastic 50% submodel is within 2% of its separately distilled counterpart: {e50[3]:.4f} vs "
        f"{e50[5]:.4f} ({gap50:+.2%}): {met(goal_elastic)}.",
        "",
        "## Width pruning, distillation, from scratch",
        "",
        "| arm | params | of parent | val loss | training tokens | notes |",
        "|---|---|---|---|---|---|",
        *(f"| {a} | {n:,} | {n / full:.0%} | {lo:.4f} | {t:,} | {note} |" for a, n, lo, t, note in rows),
        "",
        "## Group-aware vs group-blind Mamba head pruning",
        "",
        f"Mamba heads {cfg.mamba_num_heads} -> {heads} in every Mamba layer ({cfg.n_groups} groups: "
        f"{cfg.mamba_num_heads // cfg.n_groups} -> {heads // cfg.n_groups} heads per group), nothing else pruned. "
        f"Group-blind keeps the globally top-ranked heads in their original order; {moved} of the "
        f"{heads * n_mamba} kept heads (over {n_mamba} layers) then sit in another group's slots and read its "
        f"B/C.",
        "",
        "| selection | params | val loss as pruned | after distillation |",
        "|---|---|---|---|",
        *(f"| {a} | {n:,} | {z:.4f} | {t:.4f} |" for a, n, z, t in group_rows),
        "",
        "## Width vs depth at the same size (both distilled)",
        "",
        "| pruning | pattern | params | val loss as pruned | after distillation |",
        "|---|---|---|---|---|",
        f"| width ({note}) | `{cfg.pattern}` | {width_params:,} | {width_pruned_loss:.4f} | {distilled_loss:.4f} |",
        f"| depth (drop layers {sorted(drop)}, least LM-loss increase first) | `{depth_pattern}` | "
        f"{count_params(depth_model):,} | {depth_zero:.4f} | {depth_loss:.4f} |",
        "",
        "## Nemotron Elastic vs separate pruning + distillation",
        "",
        f"One joint run of budgets 1.0 / 0.75 / 0.5 ({2 * args.steps} steps, {2 * tokens:,} tokens, every budget "
        f"in every step, constant lr {ELASTIC_LR}; the router's most likely sizes are extracted). Separate: the "
        f"parent pruned to the same sizes with the same scores and distilled {args.steps} steps each. After the "
        f"joint run the full (budget 1.0) model's loss is {elastic_full:.4f} (parent {parent_loss:.4f}); final "
        f"budget losses of the joint run: "
        + ", ".join(f"{k} {v:.3f}" for k, v in hist[-1].items() if k.startswith("kd@") or k.startswith("params@"))
        + ".",
        "",
        "| budget | sizes | params | of parent | Elastic (zero-shot extraction) | separate, as pruned | "
        "separate, distilled | Elastic vs separate |",
        "|---|---|---|---|---|---|---|---|",
        *(f"| {bud:g} | {', '.join(f'{k} {v}' for k, v in ch.items())} | {n:,} | {n / full:.0%} | {el:.4f} | "
          f"{sz:.4f} | {sl:.4f} | {el / sl - 1:+.2%} |" for bud, ch, n, el, sz, sl in elastic_rows),
        "",
        "Seconds per arm: " + ", ".join(f"{k} {v:.0f}" for k, v in b.seconds.items()) + ".",
        "",
    ]
    tmp = args.out + ".writing"                       # a finished report or none: the old one stays until then
    with open(tmp, "w") as f:
        f.write("\n".join(lines))
    os.replace(tmp, args.out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
