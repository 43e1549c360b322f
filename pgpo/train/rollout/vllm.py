"""Rollouts with vLLM colocated in the training process.

One ``vllm.LLM`` per training rank samples that rank's prompts and returns the sampled tokens'
log-probs (for the truncated importance-sampling correction). After every optimizer step
:meth:`VLLMRolloutEngine.sync_weights` streams the policy's whole weights into it (gathered
from FSDP shards one tensor at a time), re-prepares the LM head and empties the prefix cache,
whose entries were computed with the old weights. On CUDA, vLLM sleeps (weights offloaded, KV
cache freed) while the trainer trains; its CPU build has no sleep mode.

The same code runs on vLLM's GPU and CPU builds; the CPU build is what the tests use.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from pgpo.train.models.lora import merged_named_tensors
from pgpo.train.models.model import TINY
from pgpo.train.rollout import Completion, stop_token_ids
from pgpo.train.run_folder.checkpoint import rng_state, set_rng_state

# Head sizes of vLLM's CPU attention backend (0.32; head_dim 16 fails inside vLLM).
CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def _without_chat_warmup_warning(record: logging.LogRecord) -> bool:
    """Drop vLLM's "Chat template warmup failed" warning: with ``skip_tokenizer_init`` (token
    ids only) vLLM still tries to render a chat at start-up and logs the expected failure with
    a traceback."""
    return not record.getMessage().startswith("Chat template warmup failed")


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Python's, NumPy's, torch's and every CUDA device's generator as they were before."""
    saved = rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        set_rng_state(saved)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _prepare_lm_head(model: torch.nn.Module) -> None:
    """Redo the LM head's post-load processing. vLLM's CPU build keeps a prepacked copy of
    linear weights; with tied embeddings ``reload_weights`` leaves the head's copy stale."""
    head = getattr(model, "lm_head", None)
    method = getattr(head, "quant_method", None)
    if method is not None and hasattr(method, "process_weights_after_loading"):
        method.process_weights_after_loading(head)


class VLLMRolloutEngine:
    """A :class:`~pgpo.train.rollout.RolloutEngine` backed by ``vllm.LLM`` (in-process).

    ``model_dir``: a transformers model folder vLLM loads once (later weights come from
    :meth:`sync_weights`). ``sleep``: offload between rollouts (CUDA builds only)."""

    def __init__(
        self,
        model_dir: str | Path,
        stop_ids: Sequence[int],
        seed: int,
        dtype: str,
        max_model_len: int,
        gpu_memory_utilization: float = 0.55,
        tensor_parallel_size: int = 1,
        sleep: bool = True,
        cleanup: Path | None = None,
    ) -> None:
        # In-process engine: weights can be handed over as tensors, no serialization. A user's
        # VLLM_ENABLE_V1_MULTIPROCESSING=1 would move the engine into another process, where the
        # weight push cannot reach it: this engine always sets 0.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        cpu = not torch.cuda.is_available()
        if cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
        from vllm import LLM

        renderer_log = logging.getLogger("vllm.renderers.base")
        if _without_chat_warmup_warning not in renderer_log.filters:
            renderer_log.addFilter(_without_chat_warmup_warning)
        self.stop_ids = list(stop_ids)
        self.sleep_enabled = sleep and not cpu  # the CPU build refuses enable_sleep_mode
        self.asleep: set[str] = set()  # which of "weights", "kv_cache" are offloaded
        self.sleep_freed_gib: float | None = None  # GPU memory the last sleep gave back
        self._cleanup = cleanup
        options = {}
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            options["distributed_executor_backend"] = "external_launcher"
        # vLLM tears down the process group when it shuts down: only one it made itself.
        self._owns_process_group = not torch.distributed.is_initialized()
        # vLLM reseeds Python's, NumPy's, torch's and CUDA's global generators with `seed`: keep
        # the trainer's streams intact.
        with preserved_rng():
            self.llm = LLM(
                model=str(model_dir),
                dtype=dtype,
                seed=seed,
                max_model_len=max_model_len,
                gpu_memory_utilization=gpu_memory_utilization,
                tensor_parallel_size=tensor_parallel_size,
                enforce_eager=cpu,
                enable_sleep_mode=self.sleep_enabled,
                skip_tokenizer_init=True,  # token ids in, token ids out
                # Log-probs of what was sampled from (after temperature and top-p), as the
                # truncated importance ratio needs; at temperature 1, top-p 1 they are the raw.
                logprobs_mode="processed_logprobs",
                **options,
            )

    @classmethod
    def from_config(
        cls, cfg, lm: torch.nn.Module, tokenizer, seed: int | None = None
    ) -> VLLMRolloutEngine:
        """From a TrainConfig and the policy's causal LM (before sharding), sampling with
        ``seed`` (this rank's; default ``cfg.seed``). A local folder or hub id in model.path is
        what vLLM loads; a policy that exists only in memory (``tiny-random-qwen3``) is first
        saved to ``output.dir/.vllm-initial-weights`` (by rank 0; removed by :meth:`close`)."""
        cpu = not torch.cuda.is_available()
        head_dim = getattr(lm.config, "head_dim", None)
        if cpu and head_dim is not None and head_dim not in CPU_HEAD_DIMS:
            raise ValueError(
                f"rollout.engine=vllm on CPU: vLLM's CPU attention does not support head_dim "
                f"{head_dim} (it supports {', '.join(map(str, CPU_HEAD_DIMS))})"
            )
        path = cfg.model.path
        cleanup = None
        if path == TINY:
            path = cleanup = Path(cfg.output.dir) / ".vllm-initial-weights"
            ranks = torch.distributed.is_initialized()
            if not ranks or torch.distributed.get_rank() == 0:
                shutil.rmtree(path, ignore_errors=True)
                # merged: a LoRA policy (B = 0 at the start) as the plain model vLLM loads
                lm.save_pretrained(path, state_dict=dict(merged_named_tensors(lm)))
            if ranks:
                torch.distributed.barrier()
        longest = max(cfg.rollout.max_new_tokens, cfg.eval.max_new_tokens)
        return cls(
            path,
            stop_token_ids(tokenizer),
            seed=cfg.seed if seed is None else seed,
            # The CPU attention kernels are float32 here; on GPUs vLLM runs in bf16.
            dtype="float32" if cpu else "bfloat16",
            max_model_len=cfg.rollout.vllm_max_model_len or cfg.rollout.max_prompt_tokens + longest,
            gpu_memory_utilization=cfg.rollout.vllm_gpu_memory_utilization,
            tensor_parallel_size=cfg.rollout.vllm_tensor_parallel_size,
            sleep=cfg.rollout.vllm_sleep,
            cleanup=cleanup,
        )

    def generate(
        self,
        prompts: list[list[int]],
        n: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seeds: Sequence[int] | None = None,
    ) -> list[list[Completion]]:
        """``n`` completions per prompt with each sampled token's log-prob (vLLM's raw,
        untempered log-probs: the trainer's are computed the same way)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._wake("weights", "kv_cache")

        def sampling(count: int, seed: int | None) -> SamplingParams:
            return SamplingParams(
                n=count,
                temperature=temperature,
                top_p=top_p,
                max_tokens=max_new_tokens,
                logprobs=0,  # the sampled token's own log-prob
                stop_token_ids=self.stop_ids,
                seed=seed,
                detokenize=False,
            )

        if seeds is None:  # one request of n per prompt, from vLLM's own seeded stream
            requests = [(p, sampling(n, None)) for p in prompts]
        else:
            # vLLM seeds a request's n samples with seed, seed + 1, ...: overlapping ranges
            # would repeat samples across prompts. One request per sample, hashed seeds.
            requests = [
                (p, sampling(1, int(np.random.SeedSequence([int(s), j]).generate_state(1)[0])))
                for p, s in zip(prompts, seeds)
                for j in range(n)
            ]
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p, _ in requests],
            [params for _, params in requests],
            use_tqdm=False,
        )
        samples = [out for request in outputs for out in request.outputs]
        completions = []
        for out in samples:
            tokens = list(out.token_ids)
            logprobs = [step[t].logprob for step, t in zip(out.logprobs, tokens)]
            finished = bool(tokens) and tokens[-1] in self.stop_ids
            completions.append(Completion(tokens, logprobs, finished))
        self._sleep()
        return [completions[i * n : (i + 1) * n] for i in range(len(prompts))]

    def sequence_logprobs(self, prompt: list[int], continuation: list[int]) -> list[float]:
        """vLLM's log-probs of a fixed ``continuation`` after ``prompt`` (a scoring pass, no
        sampling): what tests compare against the trainer's log-probs."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._wake("weights", "kv_cache")
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        (request,) = self.llm.generate(
            [TokensPrompt(prompt_token_ids=prompt + continuation)], params, use_tqdm=False
        )
        self._sleep()
        scored = request.prompt_logprobs[len(prompt) :]
        return [entry[t].logprob for entry, t in zip(scored, continuation)]

    @torch.no_grad()
    def sync_weights(self, lm: torch.nn.Module) -> None:
        """Load ``lm``'s current weights (transformers names; sharded or not; LoRA adapters
        merged) into vLLM, then re-prepare the LM head and reset the prefix cache."""
        self._wake("weights")
        self.llm.collective_rpc(
            "reload_weights",
            kwargs=dict(weights_iterator=merged_named_tensors(lm), is_checkpoint_format=True),
        )
        self.llm.apply_model(_prepare_lm_head)
        self.llm.reset_prefix_cache()

    def _wake(self, *tags: str) -> None:
        todo = [t for t in tags if t in self.asleep]
        if todo:
            self.llm.wake_up(tags=todo)
            self.asleep.difference_update(todo)

    def _sleep(self) -> None:
        if self.sleep_enabled:
            # Level 1: weights to CPU memory, KV cache dropped; the trainer gets the memory.
            free_before = torch.cuda.mem_get_info()[0]
            self.llm.sleep(level=1)
            self.asleep = {"weights", "kv_cache"}
            self.sleep_freed_gib = (torch.cuda.mem_get_info()[0] - free_before) / 2**30

    def close(self) -> None:
        """Shut the engine down and free what it holds, so that another engine can start in
        this process; remove the initial weights this engine saved."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            if self._owns_process_group:  # its shutdown also destroys the process group
                llm.llm_engine.engine_core.shutdown()
            del self.llm
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if self._cleanup is not None:
            shutil.rmtree(self._cleanup, ignore_errors=True)
            self._cleanup = None
