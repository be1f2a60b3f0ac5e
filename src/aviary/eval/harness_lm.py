"""`AviaryLM`: any model Aviary loads, as an lm-evaluation-harness model named "aviary".

    import lm_eval, aviary.eval.harness_lm                  # importing registers the name "aviary"
    lm_eval.simple_evaluate(model="aviary", model_args="pretrained=model.pth,dtype=bfloat16", tasks=[...])
    lm_eval.simple_evaluate(model=AviaryLM(loaded_model), tasks=[...])

The three requests of lm-eval's model API (`lm_eval.api.model.LM`), answered through `aviary.eval.scoring`:

    loglikelihood           (context, continuation) -> (log p, every token greedy). Requests with the same
                            context are scored together: the context runs once and every continuation starts
                            from its state (`continuation_scores`), so a 4-way multiple-choice item costs one
                            context, not four. A Transformer would need a KV-cache copy for the same.
    loglikelihood_rolling   (text,) -> log p of the whole text after the end-of-text token 0, in one pass
                            through the state (`token_losses`, chunked): no windows, each token sees all
                            tokens before it. lm-eval's Transformer adapters window at their maximum length,
                            so their numbers on long documents are not comparable token for token.
    generate_until          (context, {"until", "max_gen_toks", ...}) -> text, by `aviary.generation.Engine`
                            (greedy unless do_sample; `until` strings are stop strings; token 0 ends too).

Strings become tokens through lm-eval's `TemplateLM` (a context's trailing spaces move to the continuation, an
empty context is [0]); tokens are the model's tokenizer's (World for RWKV-5/6/7 unless `tokenizer=` says).
"""

from __future__ import annotations

import os
import warnings
from collections import defaultdict

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from aviary.eval.scoring import continuation_scores, token_losses

__all__ = ["AviaryLM"]

EOT = 0  # World tokenizer: end of document; RWKV-LM's evaluations also start each passage with it


@register_model("aviary")
class AviaryLM(TemplateLM):
    """lm-eval's model API over an Aviary model.

    pretrained:  a checkpoint path, or an already loaded `aviary.RWKV` (default: the bundled model)
    tokenizer:   a tokenizer object, or a name/file for `aviary.load_tokenizer` (default: the version's)
    dtype, device, quantize, adapter, adapter_alpha: as `aviary.load` (used only when loading a path)
    state:       an `RWKVState` (or a state file) every request starts from, e.g. a state-tuned prompt
    batch_size:  prompts decoded together by generate_until ("auto" -> 16); log-likelihoods need no batch
                 size: continuations of one context already run as one batch
    chunk_len:   tokens per forward when a long document runs through the state (memory, not results)
    """

    def __init__(self, pretrained=None, *, tokenizer=None, dtype: str = "float32", device: str | None = None,
                 quantize: str | None = None, adapter: str | None = None, adapter_alpha: float | None = None,
                 state=None, batch_size: int | str = 1, max_batch_size: int | None = None, chunk_len: int = 1024,
                 **unused):
        super().__init__()
        import aviary

        if unused:  # lm-eval passes model_args through as keywords: a typo should not go unnoticed
            warnings.warn(f"AviaryLM ignores {', '.join(sorted(unused))}", stacklevel=2)

        if isinstance(pretrained, torch.nn.Module):
            model = pretrained
        else:
            if pretrained is None:
                from aviary.models import default_model_path

                pretrained = default_model_path()
            if not os.path.exists(pretrained):
                raise FileNotFoundError(f"no such checkpoint: {pretrained}")
            if adapter is not None:
                from aviary.peft import read_adapter

                adapter = read_adapter(adapter, **({} if adapter_alpha is None else {"alpha": adapter_alpha}))
            model = aviary.load(pretrained, device=device or "cpu", dtype=dtype, quantize=quantize,
                                adapter=adapter)
        model.eval()
        self.model = model
        if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = aviary.load_tokenizer(tokenizer, version=model.config.version)
        self.tokenizer = tokenizer
        if state is not None and not hasattr(state, "wkv"):
            from aviary.loading import load_start_state

            state = load_start_state(model, str(state), model.device)
        self.state = state
        self.batch_size = 16 if batch_size in (None, "auto") or str(batch_size).startswith("auto") \
            else int(batch_size)
        if max_batch_size is not None:
            self.batch_size = min(self.batch_size, int(max_batch_size))
        self.chunk_len = int(chunk_len)
        self._device = model.device

    # ---- strings <-> tokens (TemplateLM) ------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return EOT

    @property
    def tokenizer_name(self) -> str:
        return type(self.tokenizer).__name__

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return list(self.tokenizer.encode(string))

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(list(tokens))

    # ---- the three requests ---------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation), context tokens, continuation tokens). Those with the same
        context tokens run as one group: the context once, then every continuation from its state."""
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)  # context tokens -> request indices
        for i, (_, context_enc, _) in enumerate(requests):
            groups[tuple(context_enc)].append(i)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        with tqdm(total=len(requests), desc="aviary loglikelihood", disable=disable_tqdm or None) as bar:
            for context_enc, members in groups.items():
                scores = continuation_scores(self.model, list(context_enc),
                                             [requests[i][2] for i in members], state=self.state)
                for i, (logprob, greedy) in zip(members, scores, strict=True):
                    results[i] = (logprob, greedy)
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
                bar.update(len(members))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log p(text | token 0) of each text, the whole text through the state in one pass."""
        results = []
        for request in tqdm(requests, desc="aviary loglikelihood_rolling", disable=disable_tqdm or None):
            (text,) = request.args
            tokens = [self.prefix_token_id, *self.tok_encode(text)]
            scores = token_losses(self.model, tokens, state=self.state, chunk_len=self.chunk_len)
            results.append(-scores.total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), results[-1])
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (unless `do_sample`) continuations of each context, cut before the first `until` string, at
        most `max_gen_toks` tokens. Requests with the same settings decode together, `batch_size` at a time."""
        from aviary.generation import Engine

        groups: dict[str, list[int]] = defaultdict(list)
        for i, request in enumerate(requests):
            groups[repr(sorted(request.args[1].items()))].append(i)
        results: list[str | None] = [None] * len(requests)
        engine = Engine(self.model, self.tokenizer)  # empty again after each batch
        with tqdm(total=len(requests), desc="aviary generate_until", disable=disable_tqdm or None) as bar:
            for members in groups.values():
                params = _sampling_params(requests[members[0]].args[1])
                for start in range(0, len(members), self.batch_size):
                    batch = members[start:start + self.batch_size]
                    outs = [engine.add(self.tok_encode(requests[i].args[0]) or [EOT], params, state=self.state)
                            for i in batch]
                    while engine.has_work:
                        engine.step()
                    for i, out in zip(batch, outs, strict=True):
                        results[i] = out.text
                        self.cache_hook.add_partial("generate_until", requests[i].args, out.text)
                    bar.update(len(batch))
        return results


def _sampling_params(gen_kwargs: dict):
    """lm-eval's generation settings -> SamplingParams. Greedy unless do_sample with a temperature > 0."""
    from aviary.generation import SamplingParams

    kwargs = dict(gen_kwargs)
    until = kwargs.pop("until", None) or ()
    if isinstance(until, str):
        until = (until,)
    max_new = int(kwargs.pop("max_gen_toks", 256))
    temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
    sample = bool(kwargs.pop("do_sample", False)) and temperature > 0
    settings = {"temperature": temperature if sample else 0.0}
    if sample:
        for name in ("top_p", "top_k", "seed"):
            if kwargs.get(name) is not None:
                settings[name] = kwargs[name]
    return SamplingParams(max_new_tokens=max_new, stop=tuple(s for s in until if s), **settings)
