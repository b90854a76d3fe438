"""Chat (issue 17): templates render exactly as transformers' apply_chat_template; the thinking budget stops
thinking within budget + 10% and the answer continues from the inserted early exit; `generate --chat` and
`nemojax chat` run a conversation."""

import io
import json

import numpy as np
import pytest

pytest.importorskip("transformers")
from flax import nnx  # noqa: E402
from hf_helpers import save_bpe_tokenizer  # noqa: E402

from nemojax import ModelConfig, NemotronH, save_orbax  # noqa: E402
from nemojax.chat import load_chat_template, render_chat, stream_chat  # noqa: E402
from nemojax.cli import main  # noqa: E402
from nemojax.generate import generate  # noqa: E402
from nemojax.tokenizer import load_tokenizer  # noqa: E402

# Shaped like Nano 2's: a system turn with /think or /no_think flags, tools as JSON, loop controls, an error for
# an unknown role, and a generation prompt that opens (or closes) the thinking region.
TEMPLATE = """{%- set ns = namespace(system='', think=true) -%}
{%- for m in messages if m['role'] == 'system' -%}
  {%- set ns.system = m['content'] | replace('/think', '') | replace('/no_think', '') | trim -%}
  {%- if '/no_think' in m['content'] %}{% set ns.think = false %}{% endif -%}
{%- endfor -%}
{%- if enable_thinking is defined and not enable_thinking %}{% set ns.think = false %}{% endif -%}
{{ bos_token }}<SPECIAL_10>System
{{ ns.system }}
{% if tools %}Tools: {{ tools | tojson }}
{% endif %}
{%- for m in messages -%}
  {%- if m['role'] == 'system' %}{% continue %}{% endif -%}
  {%- if m['role'] == 'user' -%}
<SPECIAL_11>User
{{ m['content'] }}
  {%- elif m['role'] == 'assistant' -%}
<SPECIAL_11>Assistant
{{ m['content'].split('</think>')[-1] | trim }}{{ eos_token }}
  {%- else -%}
{{ raise_exception('unknown role ' + m['role']) }}
  {%- endif %}
{% endfor -%}
{%- if add_generation_prompt -%}
<SPECIAL_11>Assistant
{% if ns.think %}<think>
{% else %}<think></think>
{% endif %}
{%- endif -%}"""

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "system", "content": "You are terse. /no_think"}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "<think>greet</think>Hello."}, {"role": "user", "content": "Ünïcode ✓"}],
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random nemojax model (vocab 320) with the BPE tokenizer and TEMPLATE saved beside it."""
    root = tmp_path_factory.mktemp("chat")
    save_bpe_tokenizer(root / "tok", chat_template=TEMPLATE)
    cfg = ModelConfig.from_yaml("tiny").replace(hidden_size=64, intermediate_size=96, mamba_num_heads=4,
                                                mamba_head_dim=16, ssm_state_size=16, head_dim=16)
    save_orbax(NemotronH(cfg, nnx.Rngs(0)), str(root / "model"), tokenizer_from=str(root / "tok"))
    return str(root / "model")


@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("variables", [{}, {"enable_thinking": False}])
def test_template_renders_as_transformers_apply_chat_template(model_dir, conversation, variables):
    from transformers import AutoTokenizer

    messages = CONVERSATIONS[conversation]
    tools = [{"name": "add", "description": "adds \"numbers\" <fast>", "parameters": {"a": "int"}}]
    reference = AutoTokenizer.from_pretrained(model_dir)
    template, specials = load_chat_template(model_dir)
    for generation_prompt in (True, False):
        for extra in ({}, {"tools": tools}):
            ours = render_chat(template, messages, add_generation_prompt=generation_prompt, special_tokens=specials,
                               **extra, **variables)
            theirs = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                                   **extra, **variables)
            assert ours == theirs


def test_template_errors_and_named_templates(tmp_path, model_dir):
    template, specials = load_chat_template(model_dir)
    with pytest.raises(Exception, match="unknown role tool"):
        render_chat(template, [{"role": "tool", "content": "x"}], special_tokens=specials)
    with pytest.raises(FileNotFoundError, match="has no chat template"):
        load_chat_template(str(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "default", "template": "A{{ messages[0]['content'] }}"},
                           {"name": "tool_use", "template": "B"}], "bos_token": {"content": "<s>"}}))
    assert load_chat_template(str(tmp_path)) == ("A{{ messages[0]['content'] }}", {"bos_token": "<s>"})
    assert load_chat_template(str(tmp_path), "tool_use")[0] == "B"


def test_thinking_budget_ends_thinking_in_budget_and_the_answer_continues_from_the_exit(model_dir):
    from nemojax.convert.auto import load_model

    model = load_model(model_dir)
    tok = load_tokenizer(model_dir, model.config.bos_token_id, model.config.eos_token_id)
    template, specials = load_chat_template(model_dir)
    prompt = render_chat(template, CONVERSATIONS[0], special_tokens=specials)
    assert prompt.endswith("<think>\n")
    end_think = tok.encode("</think>", add_bos=False)
    assert len(end_think) == 1                         # a special token of this tokenizer, as in Nano 2's
    budget, new = 20, 40
    ids = [t for t, _ in stream_chat(model, tok, prompt, new, thinking_budget=budget)]
    assert len(ids) == new
    exit_at = ids.index(end_think[0])
    assert exit_at <= budget + budget // 10, (exit_at, ids)
    # what follows the exit is the model's own greedy continuation of prompt + thinking + early exit
    exit_ids = tok.encode("</think>\n\n", add_bos=False)
    context = tok.encode(prompt, add_bos=False) + ids[:exit_at] + exit_ids
    assert ids[exit_at:exit_at + len(exit_ids)] == exit_ids
    answer = generate(model, [context], new - exit_at - len(exit_ids), prefill_chunk=None)[0, len(context):]
    np.testing.assert_array_equal(ids[exit_at + len(exit_ids):], answer)
    # without a budget nothing is inserted: the plain greedy continuation of the prompt
    free = [t for t, _ in stream_chat(model, tok, prompt, 12)]
    np.testing.assert_array_equal(free, generate(model, [tok.encode(prompt, add_bos=False)], 12,
                                                 prefill_chunk=None)[0, -12:])


def test_generate_chat_and_interactive_chat(model_dir, monkeypatch, capsys):
    assert main(["generate", "--model", model_dir, "--chat", "--prompt", "What is 2 + 2?", "--system", "Be terse.",
                 "--thinking-budget", "4", "--max-new-tokens", "12", "--ignore-eos"]) == 0
    out = capsys.readouterr().out
    assert out.strip()
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n\nHow are you?\n/exit\nnever read\n"))
    assert main(["chat", "--model", model_dir, "--max-new-tokens", "6", "--chat-kwargs",
                 '{"enable_thinking": false}']) == 0
    captured = capsys.readouterr()
    assert captured.err.count("tokens in") == 2                     # two replies, the blank line skipped
    assert main(["chat", "--model", model_dir, "--chat-kwargs", "[1]"]) == 2
    assert "--chat-kwargs must be a JSON object" in capsys.readouterr().err


def test_an_explicit_tokenizer_path_is_used_and_a_wrong_one_is_one_error(model_dir, tmp_path):
    named = load_tokenizer(str(tmp_path), 1, 2, tokenizer=model_dir)             # a directory holding tokenizer.json
    own = load_tokenizer(model_dir, 1, 2)
    assert named.encode("def add(a, b):") == own.encode("def add(a, b):") != load_tokenizer(
        model_dir, tokenizer="byte").encode("def add(a, b):")
    with pytest.raises(FileNotFoundError, match="no such tokenizer.json"):
        load_tokenizer(model_dir, tokenizer=str(tmp_path / "missing.json"))
