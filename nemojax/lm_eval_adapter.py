"""nemojax as a model of EleutherAI's lm-evaluation-harness (`pip install 'nemojax[eval]'`).

Importing this module registers the model name `nemojax`:

    import lm_eval, nemojax.lm_eval_adapter
    lm_eval.simple_evaluate(model="nemojax", model_args="pretrained=DIR,batch_size=8", tasks=["hellaswag"])

or from the shell, `python -m nemojax.lm_eval_adapter run --model nemojax --model_args pretrained=DIR
--batch_size 8 --tasks ...` (lm_eval's own command line, with the model registered). DIR is an HF checkpoint, a
nemojax model directory or a Hub id in the local Hugging Face cache; the tokenizer is the directory's
tokenizer.json (`tokenizer=byte` for byte-level models).

The harness's TemplateLM splits every (context, continuation) request into tokens exactly as its transformers
backend does (trailing context spaces move to the continuation; the pair is encoded whole and split at the
context's length; an empty context becomes the prefix token, bos else eos); this class only scores tokens.
Rows of a batch are right-padded to a multiple of `pad_to` (the model is causal, so padding cannot change the
scored positions) so the forward compiles once per padded length.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from lm_eval import utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from nemojax.convert.auto import load_model
from nemojax.fs import model_path
from nemojax.generate import generate
from nemojax.tokenizer import load_tokenizer


@nnx.jit
def _log_probs(model, tokens: jax.Array) -> jax.Array:
    """log softmax of the logits [b, t, V] (fp32) for input tokens [b, t]."""
    return jax.nn.log_softmax(model(tokens).astype(jnp.float32), axis=-1)


@register_model("nemojax")
class NemojaxLM(TemplateLM):
    def __init__(self, pretrained: str, dtype: Optional[str] = None, batch_size: int = 8,
                 max_length: Optional[int] = None, tokenizer: str = "auto", pad_to: int = 64,
                 max_gen_toks: int = 256, **kwargs):
        super().__init__()
        path = model_path(pretrained)
        self.model = load_model(path, dtype)
        cfg = self.model.config
        self.tokenizer = load_tokenizer(path, cfg.bos_token_id, cfg.stop_token_ids[0] if cfg.stop_token_ids else None,
                                        tokenizer=tokenizer)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8        # lm_eval's "auto": 8
        self.max_length = int(max_length or cfg.max_position_embeddings)
        self.pad_to, self.max_gen_toks = int(pad_to), int(max_gen_toks)
        self.pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0

    # ------------------------------------------------------------------ tokens
    @property
    def eot_token_id(self) -> int:
        stops = self.model.config.stop_token_ids
        if not stops:
            raise ValueError("the model config declares no eos token; lm_eval needs one")
        return stops[0]

    @property
    def prefix_token_id(self) -> int:
        bos = self.model.config.bos_token_id
        return bos if bos is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_bos=bool(add_special_tokens))

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(tokens)

    # ------------------------------------------------------------------ scoring
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of log p(continuation), continuation is the greedy choice) per (key, context, continuation)."""
        results = []
        for start in tqdm(range(0, len(requests), self.batch_size), disable=disable_tqdm, desc="nemojax"):
            batch = requests[start:start + self.batch_size]
            rows = []
            for _, context, continuation in batch:
                if not continuation:
                    raise ValueError("lm_eval asked to score an empty continuation")
                whole = (list(context) + list(continuation))[-(self.max_length + 1):]
                rows.append((whole[:-1], len(continuation)))
            width = -(-max(len(r) for r, _ in rows) // self.pad_to) * self.pad_to
            tokens = np.full((len(batch), width), self.pad_id, np.int32)
            for i, (r, _) in enumerate(rows):
                tokens[i, :len(r)] = r
            logp = np.asarray(_log_probs(self.model, jnp.asarray(tokens)))
            for i, ((r, n), (_, _, continuation)) in enumerate(zip(rows, batch)):
                scored = logp[i, len(r) - n:len(r)]                         # positions predicting the continuation
                target = np.asarray(continuation[-n:])
                results.append((float(scored[np.arange(n), target].sum()),
                                bool((scored.argmax(-1) == target).all())))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log likelihood of whole texts, in disjoint windows of max_length tokens (as the harness's transformers
        backend computes it)."""
        out = []
        for request in tqdm(requests, disable=disable_tqdm, desc="nemojax rolling"):
            windows = map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                token_list=self.tok_encode(request.args[0]), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1))
            out.append(sum(ll for ll, _ in self._loglikelihood_tokens([(None, *w) for w in windows],
                                                                      disable_tqdm=True)))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with do_sample and temperature) completions cut at the first `until` string."""
        out = []
        for request in tqdm(requests, disable=disable_tqdm, desc="nemojax generate"):
            context, gen_kwargs = request.args
            kwargs = dict(gen_kwargs)
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
            prompt = self.tok_encode(context)[-(self.max_length - max_new):]        # as the HF backend encodes
            tokens = generate(self.model, [prompt], max_new, temperature=temperature,
                              stop_tokens=self.model.config.stop_token_ids, prefill_chunk=None)[0, len(prompt):]
            stops = set(self.model.config.stop_token_ids)
            cut = next((i for i, t in enumerate(tokens.tolist()) if t in stops), len(tokens))
            text = self.tok_decode(tokens[:cut].tolist())
            for stop in until:
                if stop and stop in text:
                    text = text.split(stop, 1)[0]
            out.append(text)
        return out


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
