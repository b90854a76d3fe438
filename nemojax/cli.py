"""Command line: `nemojax train`, `nemojax generate`, `nemojax chat`, `nemojax eval`,
`nemojax convert hf-to-orbax|orbax-to-hf SRC DST`, `nemojax pack`, `nemojax prune`, `nemojax elastic train|extract`,
`nemojax compile` (TPU plans),
`nemojax info`, `nemojax demo`. The training stack is imported only by `train` (and `compile`)."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import time
import traceback
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from nemojax.chat import load_chat_template, render_chat, stream_chat
from nemojax.config import LAYER_KINDS, ModelConfig, shipped_configs
from nemojax.convert.auto import load_model
from nemojax.convert.hf import param_count
from nemojax.convert.orbax import PACK_FILE, hf_to_orbax, orbax_to_hf, save_packed
from nemojax.fs import check_writable_target
from nemojax.generate import PREFILL_CHUNK, stream_generate
from nemojax.host_allocator import accelerator_visible
from nemojax.model import NemotronH, count_params, make_forward
from nemojax.quant.pack import PackSpec, pack_model, weight_bytes
from nemojax.sharding import make_mesh, mesh_text, parse_mesh
from nemojax.tokenizer import load_tokenizer


def _cmd_convert(args) -> int:
    mesh = make_mesh(parse_mesh(args.mesh)) if args.mesh else None
    if args.direction == "hf-to-orbax":
        hf_to_orbax(args.src, args.dst, dtype=args.dtype or "float32", force=args.force, dt_clamp=args.dt_clamp,
                    mesh=mesh)
    else:
        orbax_to_hf(args.src, args.dst, dtype=args.dtype, max_shard_size=args.max_shard_size, force=args.force,
                    mesh=mesh)
    print(f"wrote {args.dst}")
    return 0


def _load_config(path: str):
    """A model config from a YAML file, a shipped config's name or an HF checkpoint directory."""
    if os.path.isdir(path):
        return ModelConfig.from_hf(path)
    return ModelConfig.from_yaml(path)


def _gb(n) -> str:
    return "?" if n is None else f"{n / 1e9:.2f} GB"


def _cmd_compile(args) -> int:
    """AOT-compiles one step for a TPU topology on this host and prints the plan; the last line is its JSON."""
    import json

    from nemojax.aot import compile_plan

    cfg = _load_config(args.config)
    plan = compile_plan(cfg, args.topology, parse_mesh(args.mesh), step=args.step, batch=args.batch,
                        seq_len=args.seq_len, remat=args.remat, precision=args.precision,
                        prefill_chunk=args.prefill_chunk or None, scan_layers=args.scan_layers)
    mesh = mesh_text(plan["mesh"]) or "one chip"
    scanned = ", scanned layers" if plan["scan_layers"] else ""
    print(f"{args.config}: {plan['step']} step, batch {plan['batch']} x {plan['seq_len']} tokens, remat "
          f"{plan['remat']}{scanned}, {plan['precision']}; {plan['topology']} ({plan['chips']} chips, {mesh}); "
          f"compiled in {plan['compile_seconds']:.0f} s")
    print("per chip: " + ", ".join(f"{k} {_gb(v)}" for k, v in plan["hbm"].items()))
    verdict = "fits" if plan["fits"] else "does NOT fit"
    print(f"HBM per chip {_gb(plan['hbm_bytes_per_chip'])} of {_gb(plan['hbm_capacity_bytes'])}: {verdict}")
    if plan["roofline_step_seconds"] is not None:
        print(f"{plan['flops_per_step'] / 1e12:.1f} TFLOP per chip per step (model "
              f"{plan['model_flops_per_chip'] / 1e12:.1f}); roofline {plan['roofline_step_seconds'] * 1e3:.1f} ms/step,"
              f" {plan['tokens_per_second']:,.0f} tokens/s, MFU {plan['mfu']:.0%} (upper bound; roofline from "
              f"{plan['roofline_basis']})")
    print(json.dumps(plan))
    return 0 if plan["fits"] or not args.check else 1


def _cmd_info(args) -> int:
    cfg = _load_config(args.config)
    counts = ", ".join(f"{kind.name} {cfg.pattern.count(c)}" for c, kind in LAYER_KINDS.items())
    print(f"layers: {cfg.num_layers}  ({counts})")
    print(f"hidden {cfg.hidden_size}, vocab {cfg.vocab_size}, mamba heads {cfg.mamba_num_heads}x"
          f"{cfg.mamba_head_dim} state {cfg.ssm_state_size} groups {cfg.n_groups}")
    print(f"parameters: {param_count(cfg):,}")
    return 0


def _cmd_demo(args) -> int:
    """Builds the tiny model, runs a jitted forward pass and prints parameter counts and timing."""
    cfg = _load_config(args.config)
    model = NemotronH(cfg, nnx.Rngs(0))
    print(f"nemojax demo: {args.config}: pattern {cfg.pattern!r}, {count_params(model):,} parameters "
          f"on {jax.devices()[0].platform}")
    ids = jax.random.randint(jax.random.key(0), (2, args.seq_len), 0, cfg.vocab_size)
    forward = make_forward(model)
    t0 = time.perf_counter()
    logits = forward(ids).block_until_ready()
    t1 = time.perf_counter()
    forward(ids).block_until_ready()
    t2 = time.perf_counter()
    probs = jax.nn.softmax(logits[0, -1])
    print(f"forward [2, {args.seq_len}] -> logits {tuple(logits.shape)} {logits.dtype}; compile+run {t1 - t0:.2f}s, "
          f"run {1000 * (t2 - t1):.1f} ms; next-token entropy {float(-(probs * jnp.log(probs)).sum()):.3f} "
          f"(uniform would be {float(jnp.log(cfg.vocab_size)):.3f})")
    return 0


def _read_prompts(args) -> list[str]:
    """--prompt, or the lines of --prompt-file (- for stdin; blank lines skipped)."""
    if (args.prompt is None) == (args.prompt_file is None):
        raise ValueError("give exactly one of --prompt and --prompt-file")
    if args.prompt is not None:
        return [args.prompt]
    with (sys.stdin if args.prompt_file == "-" else open(args.prompt_file, encoding="utf-8")) as f:
        prompts = [line.rstrip("\r\n") for line in f if line.strip()]
    if not prompts:
        raise ValueError(f"--prompt-file {args.prompt_file}: no prompts (one per line)")
    return prompts


def _load_for_inference(args, mesh=None):
    """(directory, model, tokenizer) of --model (a directory, or a Hub id in the local HF cache), --dtype and
    --tokenizer; with a mesh, parameters are read straight into their shards."""
    from nemojax.fs import model_path

    path = model_path(args.model)
    model = load_model(path, args.dtype, mesh=mesh)
    cfg = model.config
    tok = load_tokenizer(path, cfg.bos_token_id, cfg.stop_token_ids[0] if cfg.stop_token_ids else None,
                         tokenizer=args.tokenizer)
    return path, model, tok


def _cmd_generate(args) -> int:
    import json

    from nemojax.generate import generate

    prompts = _read_prompts(args)
    variables = _template_variables(args.chat_kwargs)
    if args.chat and len(prompts) > 1:
        raise ValueError("--chat takes one --prompt (a user message); use `nemojax chat` for a conversation")
    mesh = make_mesh(parse_mesh(args.mesh)) if args.mesh else None
    path, model, tok = _load_for_inference(args, mesh)
    if mesh is not None:
        print(f"nemojax generate: sharded over a mesh of {dict(mesh.shape)}", file=sys.stderr)
    stops = () if args.ignore_eos else model.config.stop_token_ids
    if args.chat:
        template, specials = load_chat_template(path)
        messages = ([{"role": "system", "content": args.system}] if args.system is not None else []) + \
            [{"role": "user", "content": prompts[0]}]
        _chat_reply(model, tok, template, specials, variables, messages, args, stops)
        return 0
    if len(prompts) > 1:                  # a batch: one JSON line per prompt, in order
        encoded = [tok.encode(p) for p in prompts]
        t0 = time.perf_counter()
        out = generate(model, encoded, args.max_new_tokens, args.temperature, args.top_k, args.top_p, stops,
                       args.seed, mesh=mesh, prefill_chunk=args.prefill_chunk or None)
        width = out.shape[1] - args.max_new_tokens
        for text, row in zip(prompts, out[:, width:].tolist()):
            cut = next((i for i, t in enumerate(row) if t in stops), len(row))
            print(json.dumps({"prompt": text, "completion": tok.decode(row[:cut]), "tokens": cut}))
        print(f"[{len(prompts)} prompts in {time.perf_counter() - t0:.2f}s]", file=sys.stderr)
        return 0
    prompt = tok.encode(prompts[0])
    sys.stdout.write(prompts[0])
    sys.stdout.flush()
    generated, printed, t0, t_first = [], "", time.perf_counter(), None
    for tokens in stream_generate(model, [prompt], args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                                  stops, args.seed, mesh=mesh, prefill_chunk=args.prefill_chunk or None):
        if t_first is None:
            t_first = time.perf_counter()
        token = int(tokens[0])
        if token in stops:
            break
        generated.append(token)
        text = tok.decode(generated)
        if not text.endswith("\ufffd"):        # hold back a multi-byte character until it is complete
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text
    sys.stdout.write(tok.decode(generated)[len(printed):])
    t1 = time.perf_counter()
    decode_rate = (len(generated) - 1) / (t1 - t_first) if len(generated) > 1 else float("nan")
    print(f"\n[{len(generated)} tokens; prefill + first token {t_first - t0:.2f}s; decode {decode_rate:.1f} tok/s]",
          file=sys.stderr)
    return 0


def _template_variables(text: Optional[str]) -> dict:
    import json

    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--chat-kwargs must be a JSON object, e.g. '{{\"enable_thinking\": false}}': {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"--chat-kwargs must be a JSON object, got {text!r}")
    return value


def _chat_reply(model, tok, template: str, specials: dict, variables: dict, messages: list, args, stops) -> str:
    """Renders the conversation with the model's chat template (and --chat-kwargs `variables`), streams the reply
    to stdout and returns it."""
    prompt = render_chat(template, messages, add_generation_prompt=True, special_tokens=specials, **variables)
    t0, count, reply = time.perf_counter(), 0, ""
    for _, piece in stream_chat(model, tok, prompt, args.max_new_tokens, thinking_budget=args.thinking_budget,
                                stop_tokens=stops, temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p, seed=args.seed):
        count += 1
        reply += piece
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(f"[{count} tokens in {time.perf_counter() - t0:.2f}s]", file=sys.stderr)
    return reply


def _cmd_chat(args) -> int:
    """An interactive conversation: each stdin line is a user turn; the reply streams; /exit or EOF ends it."""
    variables = _template_variables(args.chat_kwargs)           # a bad --chat-kwargs fails before loading
    path, model, tok = _load_for_inference(args)
    template, specials = load_chat_template(path)
    messages = [{"role": "system", "content": args.system}] if args.system is not None else []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stdout.write("> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        reply = _chat_reply(model, tok, template, specials, variables, messages, args, model.config.stop_token_ids)
        messages.append({"role": "assistant", "content": reply})


def _add_chat_options(parser) -> None:
    parser.add_argument("--system", default=None, help="a system message (Nano 2 reads /think or /no_think here)")
    parser.add_argument("--thinking-budget", type=int, default=None,
                        help="reasoning models: at most this many thinking tokens (+10%% to finish a line), then "
                        "</think> is inserted and the answer follows (default: unlimited)")
    parser.add_argument("--chat-kwargs", default=None,
                        help="extra chat-template variables as JSON, e.g. '{\"enable_thinking\": false}'")


def _cmd_eval(args) -> int:
    """Perplexity and bits per byte of a model on a corpus; the last line is JSON."""
    import json

    from nemojax.evaluation import evaluate
    from nemojax.train.sources import Documents

    _, model, tok = _load_for_inference(args)
    docs = Documents(args.corpus, args.text_key)
    result = evaluate(model, (docs[i] for i in range(len(docs))), tok, seq_len=args.seq_len, batch=args.batch,
                      max_tokens=args.max_tokens, progress=not args.no_progress)
    print(f"{args.model} on {args.corpus}: {result['tokens']:,} tokens of {result['documents']:,} documents; "
          f"loss {result['loss']:.4f} nats/token, perplexity {result['perplexity']:.3f}, "
          f"{result['bits_per_byte']:.4f} bits/byte", file=sys.stderr)
    print(json.dumps({"model": args.model, "corpus": args.corpus, "seq_len": args.seq_len, **result}))
    return 0


def _cmd_pack(args) -> int:
    if os.path.isfile(os.path.join(args.src, PACK_FILE)):
        raise ValueError(f"{args.src} is already a packed model; pack its unpacked source instead")
    check_writable_target(args.dst, args.force, sources=(args.src,))
    model = load_model(args.src)
    before = weight_bytes(model)
    spec = PackSpec(args.format, args.group, embeddings=not args.keep_embeddings, lm_head=not args.keep_lm_head)
    report = pack_model(model, spec)
    save_packed(model, args.dst, spec, force=args.force, tokenizer_from=args.src)
    skipped = f"; left unpacked (K fits no block): {', '.join(report['skipped'])}" if report["skipped"] else ""
    print(f"packed {report['packed']} weights to {args.format}: {before / 2**20:.1f} MiB -> "
          f"{weight_bytes(model) / 2**20:.1f} MiB{skipped}; wrote {args.dst}")
    return 0


def _drop_layers_arg(text: Optional[str]):
    """--drop-layers: 'K' (a count: the K least important layers) or 'i,j,...' (indices; '5,' is layer 5)."""
    if text is None:
        return ()
    try:
        if "," not in text:
            return int(text)
        return tuple(int(i) for i in text.split(",") if i.strip())
    except ValueError:
        raise ValueError(f"--drop-layers {text!r}: expected a count K or layer indices i,j,...") from None


def _cmd_prune(args) -> int:
    """Importance from a calibration forward (or --scores), then width / depth pruning; the last line is JSON."""
    import json

    from nemojax.compress import importance, prune
    from nemojax.compress.search import check_budget
    from nemojax.convert.auto import model_config
    from nemojax.convert.hf import save_hf
    from nemojax.convert.orbax import save_orbax
    from nemojax.fs import model_path

    src = model_path(args.src)
    if os.path.isfile(os.path.join(src, PACK_FILE)):
        raise ValueError(f"{args.src} is a packed 4-bit model; prune its unpacked source instead")
    cfg = model_config(src)
    drop = _drop_layers_arg(args.drop_layers)
    sizes = {name: getattr(args, name) for name in prune.Targets.WIDTHS}
    explicit = drop if isinstance(drop, tuple) else ()
    prune.pruned_config(cfg, prune.Targets(**sizes, drop_layers=explicit))        # bad targets: before any work
    if isinstance(drop, int) and not 0 < drop < cfg.num_layers:
        raise ValueError(f"--drop-layers {drop}: the model has {cfg.num_layers} layers; drop 1 to "
                         f"{cfg.num_layers - 1}")
    budget = args.param_budget if args.active_param_budget is None else args.active_param_budget
    if args.search:
        if budget is None or (args.param_budget is not None and args.active_param_budget is not None):
            raise ValueError("--search needs one budget: --param-budget F or --active-param-budget F")
        check_budget(budget)
        if any(v is not None for v in sizes.values()) or drop:
            raise ValueError("--search chooses the sizes itself; leave out target sizes and --drop-layers")
    elif not any(v is not None for v in sizes.values()) and not drop:
        raise ValueError("nothing to prune: give a target size (--hidden-size, ...), --drop-layers or --search")
    check_writable_target(args.dst, args.force, sources=(src,))
    model = load_model(src)
    scores = None
    if args.scores and os.path.exists(args.scores):
        scores = importance.Scores.load(args.scores, cfg)
        print(f"nemojax prune: importance scores from {args.scores} ({scores.tokens:,} tokens)", file=sys.stderr)
    needs_depth = (isinstance(drop, int) or args.search) and args.depth_metric != "bi"
    if scores is None or (needs_depth and f"depth/{args.depth_metric}" not in scores.stats):
        batches = _calibration(args, src, cfg, args.calib_tokens)
        if scores is None:
            scores = importance.collect(model, batches)
        if needs_depth:
            scores.stats.update(importance.depth_scores(model, batches))
        print(f"nemojax prune: importance from {scores.tokens:,} calibration tokens of {args.calib}", file=sys.stderr)
        if args.scores:
            scores.save(args.scores)
    if isinstance(drop, int):
        drop = tuple(sorted(int(i) for i in prune.rank_layers(scores, cfg.num_layers, args.depth_metric)[:drop]))
    targets = prune.Targets(**sizes, drop_layers=drop)
    ranked = _prune_search(args, model, src, scores, budget) if args.search else None
    if ranked:
        targets, drop = ranked[0].targets, ranked[0].targets.drop_layers
    pruned = prune.prune(model, scores, targets)
    if args.hf:
        save_hf(pruned, args.dst, force=args.force, tokenizer_from=src)
    else:
        save_orbax(pruned, args.dst, force=args.force, tokenizer_from=src)
    if ranked:
        from nemojax.compress.search import table

        text = table(ranked)
        with open(os.path.join(args.dst, "search.md"), "w") as f:
            f.write(f"# nemojax prune --search: {'active ' if args.active_param_budget else ''}parameter budget "
                    f"{budget} of {args.src}\n\nValidation loss after {args.search_steps} distillation steps "
                    f"from the parent; rank 1 is the model in this directory (pruned, not yet distilled).\n\n"
                    + text)
        print(text, file=sys.stderr)
    before, after = count_params(model), count_params(pruned)
    print(f"pruned {before:,} -> {after:,} parameters ({after / before:.1%}); pattern {pruned.config.pattern!r}"
          f"{f', dropped layers {list(drop)}' if drop else ''}; wrote {args.dst}", file=sys.stderr)
    changed = {k: v for k, v in pruned.config.to_dict().items() if k != "runtime" and v != cfg.to_dict()[k]}
    print(json.dumps({"src": args.src, "dst": args.dst, "params_before": before, "params_after": after,
                      "dropped_layers": list(drop), "changed": changed}))
    return 0


def _calibration(args, src: str, cfg: ModelConfig, tokens: int) -> list:
    """Batches [calib_batch, calib_seq_len + 1] of the first `tokens` tokens of --calib (tokenized as the model)."""
    from nemojax.compress import importance
    from nemojax.train.sources import Documents

    tok = load_tokenizer(src, cfg.bos_token_id, cfg.stop_token_ids[0] if cfg.stop_token_ids else None,
                         tokenizer=args.tokenizer)
    docs = Documents(args.calib, args.text_key)
    return importance.calibration_batches(cfg, (docs[i] for i in range(len(docs))), tok, tokens,
                                          args.calib_seq_len, args.calib_batch)


def _cmd_elastic_train(args) -> int:
    """Nemotron Elastic: importance (and layer ranking), sort, joint training of every budget; the last line is
    JSON with each budget's chosen sizes and parameters."""
    import json

    from nemojax.compress import elastic, importance
    from nemojax.convert.auto import model_config
    from nemojax.fs import model_path

    src = model_path(args.src)
    if os.path.isfile(os.path.join(src, PACK_FILE)):
        raise ValueError(f"{args.src} is a packed 4-bit model; train elastic from its unpacked source instead")
    cfg = model_config(src)
    ec = elastic.ElasticConfig(budgets=_floats(args.budgets, "--budgets"), max_skip=args.max_skip,
                               learning_rate=args.lr, router_learning_rate=args.router_lr)
    if not ec.budgets:
        raise ValueError(f"--budgets {args.budgets!r}: give at least one budget, e.g. 1,0.75,0.5")
    elastic.check_model(cfg)
    elastic.choices(cfg, ec)
    check_writable_target(args.dst, args.force, sources=(src,))
    model = load_model(src)
    calib = _calibration(args, src, cfg, args.calib_tokens)
    scores = importance.collect(model, calib)
    if ec.max_skip:
        scores.stats.update(importance.depth_scores(model, calib))
    run = elastic.start(model, scores, ec, seed=args.seed)
    data = _calibration(args, src, cfg, args.calib_tokens + args.tokens)[len(calib):] or calib

    def log(row):
        if row["step"] % max(1, args.steps // 10) == 0 or row["step"] == args.steps:
            print(" ".join(f"{k} {v:.4g}" for k, v in row.items()), file=sys.stderr)

    elastic.train(run, data, args.steps, seed=args.seed, log=log)
    run.save(args.dst, force=args.force, tokenizer_from=src)
    out = {}
    for budget in ec.budgets:
        chosen = run.chosen(budget)
        out[f"{budget:g}"] = {"sizes": chosen, "params": elastic.expected_params(run, chosen)}
    print(f"wrote the elastic run {args.dst}; extract a budget with `nemojax elastic extract {args.dst} OUT "
          f"--budget B`", file=sys.stderr)
    print(json.dumps({"src": args.src, "dst": args.dst, "params": count_params(run.model), "budgets": out}))
    return 0


def _cmd_elastic_extract(args) -> int:
    """The submodel the run's router picks for --budget, as a standalone model directory; last line JSON."""
    import json

    from nemojax.compress.elastic import ElasticRun
    from nemojax.convert.hf import save_hf
    from nemojax.convert.orbax import save_orbax

    check_writable_target(args.dst, args.force, sources=(args.run,))
    run = ElasticRun.load(args.run)
    chosen = run.chosen(args.budget)
    sub = run.extract_sizes(chosen)
    if args.hf:
        save_hf(sub, args.dst, force=args.force, tokenizer_from=args.run)
    else:
        save_orbax(sub, args.dst, force=args.force, tokenizer_from=args.run)
    before, after = count_params(run.model), count_params(sub)
    print(f"extracted {after:,} of {before:,} parameters ({after / before:.1%}) for budget {args.budget:g}: "
          f"{chosen}; wrote {args.dst}", file=sys.stderr)
    print(json.dumps({"run": args.run, "dst": args.dst, "budget": args.budget, "sizes": chosen,
                      "params": after, "params_parent": before}))
    return 0


def _floats(text: str, what: str) -> tuple:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{what} {text!r}: expected comma-separated numbers, e.g. 1,0.75,0.5") from None


def _prune_search(args, model, src: str, scores, budget: float) -> list:
    """nemojax prune --search: candidates within the budget, each distilled briefly from the parent and ranked."""
    from nemojax.compress.search import search
    from nemojax.config import build
    from nemojax.train.trainer import TrainConfig

    steps = args.search_steps
    tokenizer = os.path.join(src, "tokenizer.json")
    data = {"corpus": args.calib, "text_key": args.text_key, "seq_len": args.calib_seq_len,
            "batch_size": args.calib_batch, "tokenizer": tokenizer if os.path.isfile(tokenizer) else "byte"}
    train_cfg = build(TrainConfig, {"steps": steps, "eval_every": steps, "save_every": steps, "log_every": steps,
                                    "eval_batches": 2, "data": data,
                                    "optim": {"lr": args.search_lr, "warmup_steps": max(1, steps // 10)}},
                      "prune --search")
    return search(model, src, scores, budget, train_cfg, active=args.active_param_budget is not None,
                  limit=args.search_candidates, depth_metric=args.depth_metric,
                  log=lambda line: print(f"nemojax prune: {line}", file=sys.stderr))


def _cmd_train(args) -> int:
    from nemojax.distributed import initialize
    from nemojax.train.trainer import Trainer, TrainingError, TrainingInterrupted, load_run_config

    model_cfg, train_cfg = load_run_config(args.config, tuple(args.overrides))
    initialize(args.distributed)
    trainer = Trainer(model_cfg, train_cfg)
    print(f"nemojax train: {args.config}: pattern {model_cfg.pattern!r}, {train_cfg.steps} steps of "
          f"{train_cfg.data.batch_size}x{train_cfg.data.seq_len} tokens; checkpoints in {trainer.ckpt_dir}",
          file=sys.stderr)
    try:
        history = trainer.run(progress=not args.no_progress)
    except TrainingInterrupted as e:
        print(f"nemojax train: {e}", file=sys.stderr)
        return 128 + e.signum                                           # the shell's convention: 130, 143
    except TrainingError as e:
        _error("train", e)
        return 3
    evals = [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
    if evals:
        print("validation loss: " + ", ".join(f"step {s}: {v:.3f}" for s, v in evals), file=sys.stderr)
    exported = trainer.export()
    print(f"model exported to {exported}", file=sys.stderr)
    if trainer.elastic is not None:
        print(f"an elastic run: extract a budget with `nemojax elastic extract {exported} OUT --budget B`",
              file=sys.stderr)
    return 0


class _Help(argparse.HelpFormatter):
    """--help shows every option's default where it has one (not for flags, required options or None)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("%(default)" in text or "default:" in text or not action.option_strings or action.required
                or action.default is None or action.default is False or action.default == argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)".lstrip()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nemojax")
    except PackageNotFoundError:                  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nemojax", description="Nemotron-H hybrid Mamba-Transformer models in JAX",
                                formatter_class=_Help)
    p.add_argument("--version", action="version", version=f"nemojax {_version()} (jax {jax.__version__})")
    sub = p.add_subparsers(dest="command", required=True,
                           parser_class=functools.partial(argparse.ArgumentParser, formatter_class=_Help))

    c = sub.add_parser("convert", help="convert checkpoints between HF safetensors and Orbax")
    c.add_argument("direction", choices=["hf-to-orbax", "orbax-to-hf"], help="which way to convert")
    c.add_argument("src", help="the checkpoint to read (HF: a directory or a cached Hub id)")
    c.add_argument("dst", help="the directory to write (written whole, then swapped in)")
    c.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="parameter dtype of the output (default: float32 for Orbax, as saved for HF)")
    c.add_argument("--dt-clamp", choices=["hf", "none"], default="none",
                   help="'none': NVIDIA's reference and transformers >= 5.25; 'hf' reproduces transformers 5.0-5.24 "
                   "(dt >= time_step_min in prefill)")
    c.add_argument("--max-shard-size", default="5GB", help="orbax-to-hf: largest safetensors file")
    c.add_argument("--mesh", default=None, help="read each tensor straight into its shards on a device mesh, e.g. "
                   "fsdp=-1 (host memory then holds one tensor block, not the model)")
    c.add_argument("--force", action="store_true", help="replace an existing non-empty DST (only once the new one is "
                   "complete)")
    c.set_defaults(func=_cmd_convert)

    i = sub.add_parser("info", help="print layer counts and parameter count of a config (YAML or HF dir)")
    i.add_argument("--config", default="tiny", help=CONFIG_HELP)
    i.set_defaults(func=_cmd_info)

    t = sub.add_parser("train", help="train from a run config (resumes from the latest checkpoint)")
    t.add_argument("--config", default="tiny", help=CONFIG_HELP)
    t.add_argument("--no-progress", action="store_true", help="no progress bar (metrics still go to metrics.jsonl)")
    t.add_argument("--distributed", choices=["auto", "on", "off"], default="auto",
                   help="jax.distributed.initialize(): auto = when launched as one of several processes")
    t.add_argument("overrides", nargs="*", help="dotted key=value, e.g. train.steps=100 model.hidden_size=64")
    t.set_defaults(func=_cmd_train)

    g = sub.add_parser("generate", help="stream a completion from an HF or Orbax checkpoint")
    g.add_argument("--model", required=True, help="HF checkpoint dir, nemojax model dir, or a Hub id (org/name) in "
                   "the local Hugging Face cache (nothing is downloaded)")
    g.add_argument("--prompt", default=None, help="the prompt text (streams the completion)")
    g.add_argument("--prompt-file", default=None, help="one prompt per line (- reads stdin), generated as one "
                   "batch; prints a JSON line per prompt")
    g.add_argument("--tokenizer", default="auto", help="auto (the model's tokenizer.json; byte-level for nemojax "
                   "models without one), byte, or a tokenizer.json / directory holding one")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt")
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-k", type=int, default=0, help="0: no top-k filter")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: as saved")
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at the model's eos token(s)")
    g.add_argument("--mesh", default=None, help="run sharded on a device mesh, e.g. data=2,tensor=2,expert=2 "
                   "(axes data, fsdp, tensor, expert; sizes multiply to the device count, one may be -1)")
    g.add_argument("--prefill-chunk", type=int, default=PREFILL_CHUNK,
                   help="prefill prompts longer than this chunk by chunk (0: in one pass; default %(default)s)")
    g.add_argument("--chat", action="store_true", help="the prompt is a user message, rendered with the model's "
                   "chat template")
    _add_chat_options(g)
    g.set_defaults(func=_cmd_generate)

    h = sub.add_parser("chat", help="interactive chat with the model's chat template (one user turn per line)")
    h.add_argument("--model", required=True, help="HF checkpoint dir, nemojax model dir, or a cached Hub id")
    h.add_argument("--max-new-tokens", type=int, default=1024, help="tokens per reply")
    h.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    h.add_argument("--top-k", type=int, default=0, help="0: no top-k filter")
    h.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    h.add_argument("--seed", type=int, default=0, help="sampling seed")
    h.add_argument("--tokenizer", default="auto", help="as for generate")
    h.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: as saved")
    _add_chat_options(h)
    h.set_defaults(func=_cmd_chat)

    e = sub.add_parser("eval", help="perplexity and bits per byte of a model on a corpus")
    e.add_argument("--model", required=True, help="HF checkpoint dir, nemojax model dir, or a cached Hub id")
    e.add_argument("--corpus", default="stdlib", help="stdlib, a directory of text files, or comma-separated "
                   ".txt/.jsonl/.parquet/.array_record files or globs (as train.data.corpus)")
    e.add_argument("--text-key", default="text", help="the text field of JSONL / Parquet / ArrayRecord records")
    e.add_argument("--seq-len", type=int, default=1024, help="tokens of context per window")
    e.add_argument("--batch", type=int, default=8, help="windows per forward pass")
    e.add_argument("--max-tokens", type=int, default=100_000,
                   help="score whole documents until this many tokens are predicted")
    e.add_argument("--tokenizer", default="auto", help="as for generate")
    e.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: as saved")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(func=_cmd_eval)

    a = sub.add_parser("compile", help="AOT-compile a train/prefill/decode step for a TPU topology on this host "
                       "and report per-chip HBM, whether it fits, FLOPs and the roofline step time (needs libtpu)")
    a.add_argument("--config", required=True, help="model or run config YAML, or an HF checkpoint dir")
    a.add_argument("--topology", required=True, help="TPU slice, e.g. v5p-128 (TensorCores), v6e-256 (chips), "
                   "or v5p:4x4x4")
    a.add_argument("--mesh", default="fsdp=-1", help="mesh over the slice's chips (default %(default)s)")
    a.add_argument("--step", choices=["train", "prefill", "decode"], default="train", help="which step to compile")
    a.add_argument("--batch", type=int, default=None,
                   help="global batch (default: data x fsdp x expert for train, 1 else)")
    a.add_argument("--seq-len", type=int, default=None,
                   help="train window / prompt / cache length (default: 8192 train, the model's context otherwise)")
    a.add_argument("--remat", choices=["none", "block", "dots"], default=None, help="default: the config's")
    a.add_argument("--precision", choices=["bf16", "fp8", "nvfp4", "aqt_int8", "aqt_int4"], default="bf16",
                   help="train step: the low-precision recipe")
    a.add_argument("--scan-layers", action=argparse.BooleanOptionalAction, default=None,
                   help="train step: scan over repeated units of the layer pattern (default: the config's)")
    a.add_argument("--prefill-chunk", type=int, default=PREFILL_CHUNK, help="prefill step: chunk size (0: one pass)")
    a.add_argument("--check", action="store_true", help="exit 1 when the step does not fit")
    a.set_defaults(func=_cmd_compile)

    k = sub.add_parser("pack", help="pack a model's linear weights to 4 bits (NVFP4 or int4) for serving")
    k.add_argument("src", help="HF checkpoint dir or nemojax Orbax dir")
    k.add_argument("dst", help="the packed model directory to write")
    k.add_argument("--format", choices=["nvfp4", "int4"], default="nvfp4", help="4-bit format")
    k.add_argument("--group", type=int, default=128, help="int4 rows per scale (32/64/128)")
    k.add_argument("--keep-embeddings", action="store_true", help="leave the embedding table unpacked")
    k.add_argument("--keep-lm-head", action="store_true", help="leave the output layer unpacked")
    k.add_argument("--force", action="store_true", help="replace an existing non-empty DST (only once the new one is "
                   "complete)")
    k.set_defaults(func=_cmd_pack)

    r = sub.add_parser("prune", help="prune a model by activation importance (Minitron / Minitron-SSM): width "
                       "(embedding, MLP, attention, group-aware Mamba, experts) and depth")
    r.add_argument("src", help="HF checkpoint dir, nemojax model dir, or a cached Hub id")
    r.add_argument("dst", help="the pruned model directory to write")
    for name, what in (("hidden_size", "embedding channels"), ("intermediate_size", "MLP neurons"),
                       ("mamba_num_heads", "Mamba heads (a multiple of n_groups; the same number per group)"),
                       ("mamba_head_dim", "Mamba head-dim channels (the same in every head)"),
                       ("num_attention_heads", "attention query heads (pruned within KV groups)"),
                       ("num_key_value_heads", "attention KV groups (whole groups)"),
                       ("n_routed_experts", "routed experts per MoE layer"),
                       ("moe_intermediate_size", "neurons of each routed expert")):
        r.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int, default=None,
                       help=f"target {what} (default: keep)")
    r.add_argument("--drop-layers", default=None, help="K (the K least important layers by --depth-metric) or "
                   "layer indices i,j,... ('5,' is layer 5)")
    r.add_argument("--depth-metric", choices=["loss", "nmse", "bi"], default="loss", help="layer ranking for a "
                   "--drop-layers count: LM-loss increase, normalized logit MSE when dropped, or block importance")
    r.add_argument("--calib", default="stdlib", help="calibration corpus (as train.data.corpus)")
    r.add_argument("--text-key", default="text", help="the text field of JSONL / Parquet / ArrayRecord records")
    r.add_argument("--calib-tokens", type=int, default=65536, help="calibration tokens")
    r.add_argument("--calib-seq-len", type=int, default=512, help="tokens per calibration window")
    r.add_argument("--calib-batch", type=int, default=8, help="windows per calibration forward")
    r.add_argument("--scores", default=None, help="importance scores file: read when it exists (no calibration), "
                   "else written after calibrating")
    r.add_argument("--search", action="store_true", help="choose the sizes: candidates within the budget, each "
                   "distilled briefly from the parent, ranked by validation loss (DST/search.md)")
    r.add_argument("--param-budget", type=float, default=None, help="--search: total parameters, a fraction of the "
                   "model's")
    r.add_argument("--active-param-budget", type=float, default=None, help="--search: parameters per token (MoE), "
                   "a fraction of the model's")
    r.add_argument("--search-candidates", type=int, default=4, help="--search: candidates distilled (the closest "
                   "to the budget)")
    r.add_argument("--search-steps", type=int, default=50, help="--search: distillation steps per candidate")
    r.add_argument("--search-lr", type=float, default=1e-3, help="--search: peak learning rate of those steps")
    r.add_argument("--tokenizer", default="auto", help="as for generate")
    r.add_argument("--hf", action="store_true", help="write an HF checkpoint (default: a nemojax Orbax dir)")
    r.add_argument("--force", action="store_true", help="replace an existing non-empty DST (only once the new one is "
                   "complete)")
    r.set_defaults(func=_cmd_prune)

    e = sub.add_parser("elastic", help="Nemotron Elastic: train nested submodels of one parent, extract one")
    es = e.add_subparsers(dest="elastic_command", required=True, help="train or extract",
                          parser_class=functools.partial(argparse.ArgumentParser, formatter_class=_Help))
    et = es.add_parser("train", help="sort the parent by importance and train every budget's submodel jointly")
    et.add_argument("src", help="the parent: HF checkpoint dir, nemojax model dir, or a cached Hub id")
    et.add_argument("dst", help="the elastic run directory to write")
    et.add_argument("--budgets", default="1,0.75,0.5", help="parameter budgets, fractions of the parent in (0, 1]")
    et.add_argument("--max-skip", type=int, default=0, help="layers a submodel may skip (normalized-MSE ranking)")
    et.add_argument("--steps", type=int, default=200, help="training steps (every budget in every step)")
    et.add_argument("--tokens", type=int, default=262144, help="training tokens read from --calib after the "
                    "calibration tokens (cycled)")
    et.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate of the model")
    et.add_argument("--router-lr", type=float, default=5e-2, help="Adam learning rate of the router")
    et.add_argument("--seed", type=int, default=0, help="router init and Gumbel noise")
    et.add_argument("--calib", default="stdlib", help="corpus for importance and training (as train.data.corpus)")
    et.add_argument("--text-key", default="text", help="the text field of JSONL / Parquet / ArrayRecord records")
    et.add_argument("--calib-tokens", type=int, default=65536, help="calibration tokens")
    et.add_argument("--calib-seq-len", type=int, default=512, help="tokens per window")
    et.add_argument("--calib-batch", type=int, default=8, help="windows per batch")
    et.add_argument("--tokenizer", default="auto", help="as for generate")
    et.add_argument("--force", action="store_true", help="replace an existing non-empty DST (only once the new one "
                    "is complete)")
    et.set_defaults(func=_cmd_elastic_train)
    ex = es.add_parser("extract", help="write the submodel the router picks for a budget as a standalone model")
    ex.add_argument("run", help="an elastic run directory (nemojax elastic train)")
    ex.add_argument("dst", help="the model directory to write")
    ex.add_argument("--budget", type=float, required=True, help="one of the run's budgets")
    ex.add_argument("--hf", action="store_true", help="write an HF checkpoint (default: a nemojax Orbax dir)")
    ex.add_argument("--force", action="store_true", help="replace an existing non-empty DST (only once the new one "
                    "is complete)")
    ex.set_defaults(func=_cmd_elastic_extract)

    d = sub.add_parser("demo", help="forward pass of a randomly initialised model")
    d.add_argument("--config", default="tiny", help=CONFIG_HELP)
    d.add_argument("--seq-len", type=int, default=256, help="tokens per row of the forward pass")
    d.set_defaults(func=_cmd_demo)
    return p


CONFIG_HELP = ("a shipped config by name (" + ", ".join(shipped_configs()) + "), a YAML file, or an HF "
               "checkpoint dir (default: %(default)s)")


def _error(command: str, e: BaseException) -> None:
    """The one-line error of a failed command (after its traceback with NEMOJAX_DEBUG=1)."""
    if os.environ.get("NEMOJAX_DEBUG"):
        traceback.print_exception(e)
    print(f"nemojax {command}: error: {e}", file=sys.stderr)


class _HeldTracebacks(logging.Filter):
    """Tracebacks that storage libraries print from their own threads when a write fails (Orbax workers logging
    through absl, asyncio futures never retrieved, tensorstore callbacks into a closed event loop): held while a
    command runs, shown afterwards if it succeeded, dropped if it failed with its one-line error. Some arrive
    only as the interpreter exits, so a failed command run as the `nemojax` process keeps holding them
    (NEMOJAX_DEBUG=1 shows everything as it comes)."""

    def __init__(self):
        super().__init__()
        self.held: list = []
        self.loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
        self.hook = sys.unraisablehook

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:
            self.held.append(record)
            return False
        return True

    def unraisable(self, u) -> None:
        self.held.append(u)

    def __enter__(self):
        for logger in self.loggers:
            logger.addFilter(self)
        sys.unraisablehook = self.unraisable
        return self

    def release(self, show: bool) -> None:
        for logger in self.loggers:
            logger.removeFilter(self)
        sys.unraisablehook = self.hook
        for item in self.held if show else ():
            if isinstance(item, logging.LogRecord):
                logging.getLogger(item.name).handle(item)
            else:
                self.hook(item)
        self.held.clear()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not os.environ.get("JAX_PLATFORMS") and not accelerator_visible():
        jax.config.update("jax_platforms", "cpu")      # e.g. libtpu installed on a host without TPUs
    held = None if os.environ.get("NEMOJAX_DEBUG") else _HeldTracebacks().__enter__()
    failed = True
    try:
        code = args.func(args)
        failed = False
        return code
    except (ValueError, OSError, NotImplementedError) as e:          # bad input, files, disk: one line
        _error(args.command, e)
        return 2
    except KeyboardInterrupt:
        print(f"nemojax {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if held is not None and not (failed and argv is None):       # argv None: this process is `nemojax`
            held.release(show=not failed)


if __name__ == "__main__":
    sys.exit(main())
