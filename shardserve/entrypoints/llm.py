"""The offline API: LLM(model=...).generate(prompts, SamplingParams(...)) and .chat(messages)."""
from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any, Iterator, Sequence as Seq

from tqdm import tqdm

from shardserve.engine.args import EngineArgs
from shardserve.engine.llm_engine import LLMEngine
from shardserve.outputs import RequestOutput
from shardserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from shardserve.entrypoints.dp_offline import DataParallelEngines


class LLM:
    """Generate from a batch of prompts with continuous batching.

    >>> llm = LLM()                       # the built-in SmolLM2-135M-Instruct
    >>> llm.generate(["Hello"], SamplingParams(max_tokens=8))[0].outputs[0].text
    """

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        use_tqdm = kwargs.pop("use_tqdm_on_load", True)
        self.args = EngineArgs.from_kwargs(model=model, **kwargs)
        self.engine: LLMEngine | DataParallelEngines
        if self.args.data_parallel_size > 1:
            from shardserve.entrypoints.dp_offline import DataParallelEngines
            self.engine = DataParallelEngines(self.args, progress=use_tqdm)
        else:
            self.engine = LLMEngine(self.args.create_config(progress=use_tqdm), progress=use_tqdm)
        self._ids = itertools.count()

    def get_tokenizer(self):
        """The engine's tokenizer; None when it was started with skip_tokenizer_init."""
        return self.engine.tokenizer

    def generate(self, prompts: str | Seq[str] | None = None,
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 prompt_token_ids: Seq[Seq[int]] | None = None, use_tqdm: bool = True) -> list[RequestOutput]:
        """One RequestOutput per prompt, in input order. `prompts` may also be lists of token ids.

        The call is all or nothing: a prompt that is refused refuses the whole call (nothing of it is left in the
        engine), and an error output (a failed step, a lost rank) raises after the call's other requests are
        aborted; after a lost rank the next call restarts the ranks first."""
        if prompts is None and prompt_token_ids is None:
            raise ValueError("pass prompts (strings) or prompt_token_ids (lists of token ids)")
        if isinstance(prompts, str):
            prompts = [prompts]
        if prompts and prompt_token_ids is None and not isinstance(prompts[0], str):
            prompts, prompt_token_ids = None, prompts  # type: ignore[assignment]  # token ids passed positionally
        if prompt_token_ids is not None and prompt_token_ids and isinstance(prompt_token_ids[0], int):
            prompt_token_ids = [prompt_token_ids]  # type: ignore[list-item]
        n = len(prompts) if prompts is not None else len(prompt_token_ids)  # type: ignore[arg-type]
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = [sampling_params] * n if isinstance(sampling_params, SamplingParams) else list(sampling_params)
        if len(params) != n:
            raise ValueError(f"got {len(params)} sampling params for {n} prompts")
        self._recover()
        ids: list[str] = []
        try:
            for i in range(n):
                rid = str(next(self._ids))
                self.engine.add_request(rid, prompts[i] if prompts is not None else None, params[i],
                                        prompt_token_ids=list(prompt_token_ids[i]) if prompt_token_ids is not None
                                        else None)
                ids.append(rid)
        except BaseException:
            self._abort(ids)  # a rejected prompt rejects the whole call: nothing of it stays in the engine
            raise
        return self._run(ids, use_tqdm)

    def chat(self, messages: list[dict[str, str]] | list[list[dict[str, str]]],
             sampling_params: SamplingParams | None = None, use_tqdm: bool = True,
             add_generation_prompt: bool = True, chat_template: str | None = None) -> list[RequestOutput]:
        """Apply the tokenizer's chat template to one conversation (or a list of them) and generate."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        tok = self.get_tokenizer()
        if tok is None:
            raise ValueError("chat needs the tokenizer's chat template, and this LLM was started with "
                             "skip_tokenizer_init; apply the template yourself and pass prompt_token_ids to "
                             "generate(), or drop skip_tokenizer_init")
        prompts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=add_generation_prompt,
                                           chat_template=chat_template) for c in convs]
        ids = [tok.encode(p, add_special_tokens=False) for p in prompts]
        outs = self.generate(prompt_token_ids=ids, sampling_params=sampling_params, use_tqdm=use_tqdm)
        for o, p in zip(outs, prompts):
            o.prompt = p
        return outs

    def stream_chat(self, messages: list[dict[str, str]], sampling_params: SamplingParams | None = None
                    ) -> Iterator[str]:
        """Reply to one conversation, yielding the text as it is generated (each piece as soon as its step ends)."""
        tok = self.get_tokenizer()
        if tok is None:
            raise ValueError("chat needs a tokenizer; drop skip_tokenizer_init")
        prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        self._recover()
        rid = str(next(self._ids))
        self.engine.add_request(rid, None, sampling_params, prompt_token_ids=tok.encode(prompt, add_special_tokens=False))
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id != rid:
                        continue
                    if out.error:
                        raise RuntimeError(out.error)
                    if out.outputs and out.outputs[0].text_delta:
                        yield out.outputs[0].text_delta
                    if out.finished:
                        return
        finally:
            self.engine.abort_request(rid)  # a no-op once finished; stops the request if the caller stops early

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        """Step until every request of this call has finished; outputs of other requests (a stream_chat left
        suspended) are not this call's and are ignored. An error output raises, and the rest of the call's
        requests are aborted, as they are when the caller interrupts the call (nothing is left running)."""
        done: dict[str, RequestOutput] = {}
        own = set(ids)
        bar = tqdm(total=len(ids), desc="Generating", unit="req", disable=not use_tqdm or len(ids) < 2)
        try:
            while len(done) < len(ids):
                if not self.engine.has_unfinished_requests():
                    missing = [i for i in ids if i not in done]
                    raise RuntimeError(f"the engine lost requests {missing} of this call without an output")
                for out in self.engine.step():
                    if out.request_id not in own:
                        continue
                    if out.error:
                        raise RuntimeError(out.error)
                    if out.finished:
                        done[out.request_id] = out
                        bar.update(1)
        finally:
            bar.close()
            if len(done) < len(ids):
                self._abort([i for i in ids if i not in done])
        return [done[i] for i in ids]

    def _abort(self, ids: list[str]) -> None:
        for rid in ids:
            try:
                self.engine.abort_request(rid)
            except Exception:  # noqa: BLE001 - best effort while another error propagates
                pass

    def _recover(self) -> None:
        """Before a call: if the engine lost a rank (the call that saw it raised), restart its ranks, so that one
        failure does not leave this LLM dead for good."""
        if getattr(self.engine, "dead", None) and hasattr(self.engine, "restart_executor"):
            self.engine.restart_executor()

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
