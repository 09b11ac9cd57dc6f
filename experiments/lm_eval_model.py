"""lm-evaluation-harness adapter: Switchyard checkpoints as the harness's `switchyard` model.

    python -m experiments.lm_eval_model --model switchyard --model_args checkpoint=DIR --tasks TASKS [lm_eval options]
    switchyard-lm-eval --model switchyard --model_args checkpoint=DIR --tasks TASKS ...    (the same, as installed)

lm-eval 0.4 finds models only in its own registry and loads no plugins, so the plain `lm_eval` command does not know
`switchyard`: this module registers the model (`@register_model("switchyard")`) and then runs lm_eval's own command
line with the same arguments; every lm_eval option works (--include_path, --output_path, --log_samples, --limit,
--batch_size, --device, --gen_kwargs, ...). From Python, `import experiments.lm_eval_model` registers it for
`lm_eval.simple_evaluate(model="switchyard", model_args="checkpoint=DIR", ...)`.

model_args: checkpoint (required: a checkpoint directory, a training run directory, a Hugging Face directory or a
GGUF file, as experiments.evaluate reads them), dtype (float32, bfloat16 or float16), max_gen_toks (the generation
length when a task gives none, 256), seed (of sampled generation, 1234). --batch_size N and --device come from
lm_eval's own options (device: cuda when available unless --device says otherwise).

How requests are scored:
- loglikelihood: context and continuation are encoded as lm-eval's TemplateLM does (the whole string, then the
  context; trailing spaces of the context move to the continuation; an empty context becomes the end-of-text
  token). The last max_seq_len + 1 tokens are kept; the score is the sum of ln p of the continuation's tokens, and
  is_greedy says whether each of them is the argmax. Requests run longest first, batch_size per forward, right-padded
  (causal attention: the padding after a row's tokens changes none of its logits).
- Routing runs as in generation (routing.generation): every token is routed on its own, without capacity, so a score
  does not depend on the batch size, on the padding or on the other requests of a batch, whatever the router.
- loglikelihood_rolling (perplexity tasks): lm-eval's rolling windows of max_seq_len predicted tokens, the first token
  predicted from the end-of-text token. They are experiments.evaluate's windows but for the last, shorter one, which
  lm-eval fills up with context from before it (evaluate gives it only its own tokens): the two agree exactly when
  the token count is a multiple of max_seq_len.
- generate_until: model.generate (KV cache) on batches of left-padded prompts with the same generation settings;
  greedy unless do_sample (then temperature and top_k). The context keeps its last max_seq_len - max_gen_toks tokens
  so the continuation fits the cache. Generation runs in rounds of 16, 32, 64, ... new tokens, and a row leaves the
  batch once a stop string (`until`) or the end-of-text token appears; the text is cut before the first stop string.
  Greedy results equal a single model.generate call of max_gen_toks tokens cut the same way.
"""
from __future__ import annotations

import sys
from typing import Any, Optional, Sequence

import torch

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # an optional dependency: the `eval` extra
    raise ImportError(f"the lm-evaluation-harness adapter needs lm-eval 0.4 ({e}): "
                      f"pip install 'switchyard-moe[eval]'") from None

from experiments.evaluate import DTYPES, load_checkpoint, resolve_device
from moe.generation import left_pad
from routing.generation import generation

MODEL_NAME = "switchyard"
DEFAULT_MAX_GEN_TOKS = 256
FIRST_ROUND = 16  # new tokens in the first generation round; each later round doubles it
# Generation settings a task may pass that change nothing when they have these values.
NEUTRAL_GEN_KWARGS = {"top_p": 1.0, "num_beams": 1, "repetition_penalty": 1.0, "min_p": 0.0}


@register_model(MODEL_NAME)
class SwitchyardLM(TemplateLM):
    """A Switchyard Transformer (any checkpoint kind experiments.evaluate reads) behind lm-eval's LM interface."""

    def __init__(self, checkpoint: Optional[str] = None, dtype: str = "float32", batch_size: int | str = 1,
                 max_batch_size: Optional[int] = None, device: Optional[str] = None,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, seed: int = 1234, **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise ValueError(f"unknown --model_args {sorted(unknown)} for --model {MODEL_NAME}; known: checkpoint, "
                             f"dtype, max_gen_toks, seed (batch size and device: --batch_size, --device)")
        if not checkpoint:
            raise ValueError(f"--model {MODEL_NAME} needs --model_args checkpoint=DIR (a checkpoint or run directory, "
                             f"a Hugging Face directory or a .gguf file)")
        if str(dtype) not in DTYPES:
            raise ValueError(f"--model_args dtype={dtype!r} is not supported; use one of {list(DTYPES)}")
        if str(batch_size).startswith("auto"):
            raise ValueError(f"--batch_size {batch_size}: the {MODEL_NAME} model has no automatic batch size; "
                             f"pass a number, e.g. --batch_size 16")
        self.batch_size_per_forward = int(batch_size)
        if self.batch_size_per_forward < 1:
            raise ValueError(f"--batch_size {batch_size} must be positive")
        self._device = self._pick_device(device)
        loaded = load_checkpoint(str(checkpoint), self._device, DTYPES[str(dtype)])
        if loaded.tokenizer is None:
            raise ValueError(f"{loaded.path} has no tokenizer, which lm-eval's text tasks need; use a checkpoint "
                             f"written by experiments.train / experiments.convert (they store tokenizer.json)")
        self.checkpoint_path = loaded.path
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.max_gen_toks = int(max_gen_toks)
        self.generator = torch.Generator(device=self._device).manual_seed(int(seed))

    @staticmethod
    def _pick_device(device: Optional[str]) -> torch.device:
        # lm_eval's configuration defaults to cuda:0 when --device is not given: on a machine without CUDA that
        # means "the default device", so it falls back to the CPU instead of failing.
        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            if device is not None:
                print(f"{MODEL_NAME}: --device {device} but CUDA is not available; running on the CPU", file=sys.stderr)
            return resolve_device("auto")
        return resolve_device(str(device))

    # ---------------------------------------------------------------- what TemplateLM asks for

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self.model.cfg.max_seq_len

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return f"{MODEL_NAME}-{self.tokenizer.name}"

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs: Any) -> list[int]:
        # Switchyard tokenizers add no special tokens (no BOS), so add_special_tokens changes nothing.
        return list(self.tokenizer.encode(string))

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens))

    # ---------------------------------------------------------------- scoring

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """requests: ((context, continuation), context ids, continuation ids) -> (sum of ln p, is_greedy) each."""
        from tqdm import tqdm

        M = self.max_length
        items = []  # (request index, input ids, continuation ids scored)
        for i, (_, ctx, cont) in enumerate(requests):
            if not cont:
                raise ValueError(f"request {i} has an empty continuation; lm-eval scores at least one token")
            whole = (list(ctx) + list(cont))[-(M + 1):]
            n = min(len(cont), len(whole) - 1)  # a continuation longer than the window: its last M tokens
            items.append((i, whole[:-1], list(cont)[-n:]))
        items.sort(key=lambda it: -len(it[1]))  # longest first: similar lengths share a batch, little padding
        results: list[Optional[tuple[float, bool]]] = [None] * len(items)
        B = self.batch_size_per_forward
        bar = tqdm(total=len(items), disable=disable_tqdm, desc=f"{MODEL_NAME} loglikelihood")
        for b in range(0, len(items), B):
            batch = items[b:b + B]
            width = len(batch[0][1])
            x = torch.full((len(batch), width), self.eot_token_id, dtype=torch.long)
            for r, (_, inp, _) in enumerate(batch):
                x[r, :len(inp)] = torch.tensor(inp, dtype=torch.long)
            with generation():  # every token routed alone: the padding and the other rows change nothing
                logp = torch.log_softmax(self.model(x.to(self._device)).logits.float(), dim=-1)
            for r, (i, inp, cont) in enumerate(batch):
                rows = logp[r, len(inp) - len(cont):len(inp)]  # the positions that predict the continuation
                target = torch.tensor(cont, device=rows.device)
                score = float(rows.gather(-1, target[:, None]).sum())
                greedy = bool((rows.argmax(-1) == target).all())
                results[i] = (score, greedy)
                if requests[i][0] is not None:  # None: a rolling window, cached as its whole string below
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], (score, greedy))
            bar.update(len(batch))
        bar.close()
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """The total ln p of each request's whole string, over non-overlapping windows of max_seq_len tokens."""
        out = []
        for req in requests:
            (string,) = req.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tok_encode(string), self.prefix_token_id, self.max_length, context_len=1)]
            scores = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows], disable_tqdm=True)
            total = sum(s for s, _ in scores)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    # ---------------------------------------------------------------- generation

    def _settings(self, gen_kwargs: dict) -> tuple[list[str], int, float, Optional[int]]:
        """(stop strings, max new tokens, temperature (0: greedy), top_k) from a request's generation settings."""
        kw = dict(gen_kwargs)
        until = kw.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_gen = int(kw.pop("max_gen_toks", self.max_gen_toks))
        do_sample = bool(kw.pop("do_sample", False))
        temperature = float(kw.pop("temperature", 1.0 if do_sample else 0.0))
        top_k = kw.pop("top_k", None)
        for key, neutral in NEUTRAL_GEN_KWARGS.items():
            if key in kw and kw[key] == neutral:
                kw.pop(key)
        if kw:
            raise ValueError(f"generation settings {kw} are not supported by --model {MODEL_NAME} (it knows until, "
                             f"max_gen_toks, do_sample, temperature, top_k); remove them from the task or --gen_kwargs")
        if max_gen < 1:
            raise ValueError(f"max_gen_toks={max_gen} must be positive")
        return until, max_gen, (temperature if do_sample else 0.0), (int(top_k) if top_k else None)

    @torch.no_grad()
    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        from tqdm import tqdm

        groups: dict[str, list[int]] = {}  # requests with the same settings share batches
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items(), key=lambda kv: kv[0])), []).append(i)
        out: list[Optional[str]] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc=f"{MODEL_NAME} generate_until")
        for members in groups.values():
            settings = self._settings(requests[members[0]].args[1])
            members = sorted(members, key=lambda i: -len(requests[i].args[0]))
            for b in range(0, len(members), self.batch_size_per_forward):
                batch = members[b:b + self.batch_size_per_forward]
                texts = self.generate_batch([requests[i].args[0] for i in batch], *settings)
                for i, text in zip(batch, texts):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(batch))
        bar.close()
        return out  # type: ignore[return-value]

    def generate_batch(self, contexts: Sequence[str], until: Sequence[str], max_gen: int, temperature: float = 0.0,
                       top_k: Optional[int] = None) -> list[str]:
        """The continuations of `contexts`, each cut before its first stop string (or its end-of-text token)."""
        M, eot = self.max_length, self.eot_token_id
        keep = M - max_gen if max_gen < M else M  # the continuation fits the cache when it can
        prompts = [(self.tok_encode(c) or [eot])[-keep:] for c in contexts]
        new: list[list[int]] = [[] for _ in contexts]
        live, step, left = list(range(len(contexts))), FIRST_ROUND, max_gen
        while live and left > 0:
            n = min(step, left)
            idx, mask = left_pad([prompts[i] + new[i] for i in live], pad_id=eot, device=self._device)
            grown = self.model.generate(idx, n, temperature=temperature, top_k=top_k, generator=self.generator,
                                        eos_id=eot, attention_mask=mask)
            still = []
            for r, i in enumerate(live):
                new[i] += grown[r, idx.shape[1]:].tolist()
                if eot in new[i]:
                    new[i] = new[i][:new[i].index(eot)]
                elif not any(s in self.tok_decode(new[i]) for s in until):
                    still.append(i)
            live, left, step = still, left - n, step * 2
        texts = []
        for ids in new:
            text = self.tok_decode(ids)
            for s in until:
                if s:
                    text = text.split(s, 1)[0]
            texts.append(text)
        return texts


def main(argv: Optional[list[str]] = None) -> None:
    """lm_eval's command line with the `switchyard` model registered (see the module docstring)."""
    import lm_eval.models  # noqa: F401  (lm_eval's own models stay known beside ours: its registry fills lazily)
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
