"""Chat: the checkpoint's chat template rendered as transformers renders it, and generation with a thinking
budget for reasoning models (Nano 2 / Nemotron 3 think inside <think> ... </think>, then answer).

Templates are Jinja strings from the model directory (`chat_template.jinja`, else `chat_template` in
`tokenizer_config.json`; a list of named templates picks `default`). They are rendered in jinja2's
ImmutableSandboxedEnvironment with transformers' settings (trim_blocks, lstrip_blocks, loopcontrols; `tojson`
without HTML escaping, `raise_exception`, `strftime_now`), with `messages`, `add_generation_prompt`, `tools`,
the tokenizer's special tokens (`bos_token`, `eos_token`, ...) and any extra template variables
(`enable_thinking=False` for templates that read it). Inputs are copied as plain JSON data first.

Thinking budget (NVIDIA NIM's "thinking budget control"): while the model is inside its thinking region, count
its tokens; at the budget, let it finish the current line for up to 10% more tokens, then insert the early-exit
string (default `</think>\\n\\n`) and continue generating the answer from there. A model that closes its thinking
by itself within the budget is left alone.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Iterator, Optional, Sequence

from nemojax.generate import stream_generate
from nemojax.model import NemotronH

THINK_END = "</think>"


def load_chat_template(model_dir: str, name: str = "default") -> tuple[str, dict]:
    """(template, special tokens {bos_token: str, ...}) of a model directory; one error when it has none."""
    config_file = os.path.join(model_dir, "tokenizer_config.json")
    config = {}
    if os.path.isfile(config_file):
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
    specials = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = config.get(key)
        if isinstance(value, dict):                    # AddedToken written out
            value = value.get("content")
        if isinstance(value, str):
            specials[key] = value
    jinja_file = os.path.join(model_dir, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            return f.read(), specials
    template = config.get("chat_template")
    if isinstance(template, list):                     # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if name not in named:
            raise ValueError(f"{config_file} has chat templates {sorted(named)}, not {name!r}")
        template = named[name]
    if not isinstance(template, str) or not template:
        raise FileNotFoundError(f"{model_dir} has no chat template (chat_template.jinja, or chat_template in "
                                f"tokenizer_config.json); chat needs the checkpoint's template")
    return template, specials


def _environment():
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env


def render_chat(template: str, messages: Sequence[dict], add_generation_prompt: bool = True,
                tools: Optional[list] = None, special_tokens: Optional[dict] = None, **variables) -> str:
    """The prompt text of a conversation (messages: [{"role": ..., "content": ...}, ...])."""
    for m in messages:
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"chat messages must be dicts with a 'role', got {m!r}")
    plain = json.loads(json.dumps({"messages": list(messages), "tools": tools, "variables": variables}))
    return _environment().from_string(template).render(
        messages=plain["messages"], tools=plain["tools"], add_generation_prompt=add_generation_prompt,
        **(special_tokens or {}), **plain["variables"])


def thinking_open(text: str, start: str = "<think>", end: str = THINK_END) -> bool:
    """Whether text (a rendered prompt plus what was generated) ends inside a thinking region."""
    return text.rfind(start) > text.rfind(end)


def stream_chat(model: NemotronH, tokenizer, prompt: str, max_new_tokens: int, thinking_budget: Optional[int] = None,
                early_exit: str = THINK_END + "\n\n", stop_tokens: Sequence[int] = (), **sampling
                ) -> Iterator[tuple[int, str]]:
    """Yields (token id, its text) as generated from the rendered prompt; with thinking_budget, at most that many
    tokens (+10% to finish a line) are spent inside the thinking region before `early_exit` is inserted (its
    tokens are yielded too) and the answer is generated after it. sampling: temperature, top_k, top_p, seed."""
    if thinking_budget is not None and thinking_budget < 0:
        raise ValueError(f"thinking_budget must be >= 0, got {thinking_budget}")
    ids = tokenizer.encode(prompt, add_bos=False)
    inside = thinking_budget is not None and thinking_open(prompt)
    end_ids = tokenizer.encode(THINK_END, add_bos=False)     # compared as ids: decoding may drop special tokens
    generated: list[int] = []
    text = ""                                   # decode(generated), so each token's piece costs one decode

    def add(token: int) -> str:
        nonlocal text
        generated.append(token)
        before, text = text, tokenizer.decode(generated)
        return text[len(before):]

    spent = 0
    while len(generated) < max_new_tokens:
        forced = None
        for tokens in stream_generate(model, [ids + generated], max_new_tokens - len(generated),
                                      stop_tokens=stop_tokens, **sampling):
            token = int(tokens[0])
            if token in stop_tokens:
                return
            piece = add(token)
            yield token, piece
            if not inside:
                continue
            spent += 1
            if generated[-len(end_ids):] == end_ids:                   # the model closed its thinking itself
                inside = False
                continue
            extension = max(1, thinking_budget // 10)
            if spent >= thinking_budget and ("\n" in piece or spent >= thinking_budget + extension):
                forced = tokenizer.encode(early_exit, add_bos=False)
                break
        if forced is None:
            return
        inside = False
        for token in forced:                        # the early exit, then the answer continues from it
            yield token, add(token)
