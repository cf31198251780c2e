"""The lab's model as an lm-evaluation-harness LM (github.com/EleutherAI/lm-evaluation-harness), so any
lm-eval task scores a run: `llmlabs eval RUN --tasks hellaswag,arc_easy` (wherever lm-eval can fetch
the task's data), or lm-eval's own API with model="llmlabs", model_args="run=RUN".

- loglikelihood(context, continuation): lm-eval's split (TemplateLM: the continuation's tokens are
  what it adds to the context's, BOS first); requests sorted by length, `batch_size` rows a forward,
  right-padded; a row longer than the model's context keeps its last sequence_len + 1 tokens, as
  lm-eval's Hugging Face model does.
- loglikelihood_rolling(text): the text in windows of the model's context, each token scored once with
  as much context as fits (lm_eval.utils.get_rolling_token_windows), summed.
- generate_until(context, gen_kwargs): batched through the lab's engine (KV cache, prompts of any
  lengths in one batch); a batch stops once every row holds one of its stop strings, and each text
  is cut before the first one. Greedy unless gen_kwargs say do_sample.
Log-probabilities are taken in at least float32, whatever the model computes in.

lm_eval is an optional extra (`pip install 'llmlabs[eval]'`); evaluate.py imports this module only
for lm-eval tasks, and says in one line how to install it where it is missing.
"""
import json
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, simple_parse_args_string
from tqdm import tqdm

from llmlabs.common import LabError

GEN_KEYS = {"until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p"}  # what the engine can do
DEFAULT_GEN_TOKS = 256  # lm-eval's Hugging Face model's default


@register_model("llmlabs")
class LabLM(TemplateLM):
    def __init__(self, model, tokenizer, batch_size=16, autocast=None):
        super().__init__()
        self.model, self.tok, self.batch_size = model.eval(), tokenizer, batch_size
        self.autocast = autocast or nullcontext()
        self.max_length = model.config.sequence_len
        self._device = next(model.parameters()).device

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict, additional_config=None):
        """lm-eval's model_args: run (a run directory of `llmlabs train`), device and batch_size."""
        from llmlabs.checkpoint import load_run
        from llmlabs.common import autodetect_device
        from llmlabs.data.tokenizer import Tokenizer

        args = {**{k: v for k, v in (additional_config or {}).items() if v is not None}, **arg_dict}
        if "run" not in args:
            raise LabError("model_args must name the run: run=RUN (a run directory of `llmlabs train`)")
        device = torch.device(args.get("device") or autodetect_device())
        model, ckpt = load_run(args["run"], device)
        if "encoder" in ckpt:
            raise LabError(f"{args['run']} is a --vision run, scored on its captions after their images: "
                           "`llmlabs eval RUN` (caption bpb) instead of lm-eval tasks")
        tokenizer = Tokenizer.load(Path(args["run"]) / "tokenizer.json")
        if tokenizer.hash != ckpt["tokenizer_hash"]:
            raise LabError(f"{args['run']}/tokenizer.json is not the tokenizer its checkpoint was trained with: "
                           "copy the run's tokenizer.json back from its data directory")
        size = str(args.get("batch_size", ""))  # lm-eval's "auto" sizing is not supported: the default then
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
        return cls(model, tokenizer, int(size) if size.isdigit() else 16, autocast)

    @property
    def eot_token_id(self):
        return self.tok.bos_id  # the lab separates documents with BOS: it ends one text and starts the next

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        """BOS first (every training document starts with it) unless add_special_tokens is False."""
        return ([] if add_special_tokens is False else [self.tok.bos_id]) + self.tok.encode(string)

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
        rows = [(ctx + cont)[-(self.max_length + 1):] for _, ctx, cont in requests]
        conts = [len(cont) for _, _, cont in requests]
        if max(conts, default=0) > self.max_length:
            raise LabError(f"an lm-eval continuation of {max(conts)} tokens does not fit the model's context of "
                           f"{self.max_length} tokens")
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))  # similar lengths share a batch: less padding
        out = [None] * len(rows)
        for b in tqdm(range(0, len(order), self.batch_size), disable=disable_tqdm, desc="loglikelihood"):
            batch = order[b:b + self.batch_size]
            x = torch.full((len(batch), len(rows[batch[0]]) - 1), self.tok.bos_id, dtype=torch.long)
            for r, i in enumerate(batch):
                x[r, :len(rows[i]) - 1] = torch.tensor(rows[i][:-1])
            with self.autocast:
                logits = self.model(x.to(self._device))
            for r, i in enumerate(batch):
                end, n = len(rows[i]) - 1, conts[i]
                scores = logits[r, end - n:end]
                logp = F.log_softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1)
                target = torch.tensor(rows[i][-n:], device=self._device)
                out[i] = (float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all()))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        windows, owners = [], []
        for k, req in enumerate(requests):
            tokens = self.tok_encode(req.args[0], add_special_tokens=False)
            for context, pred in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)):
                windows.append(((None, None), context, pred))
                owners.append(k)
        out = [0.0] * len(requests)
        for k, (logp, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm)):
            out[k] += logp
        return out

    def generate_until(self, requests, disable_tqdm=False):
        groups = {}  # one batch shares one gen_kwargs
        for k, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(k)
        out = [None] * len(requests)
        for ks in groups.values():
            kw = requests[ks[0]].args[1]
            if unknown := set(kw) - GEN_KEYS:
                raise LabError(f"an lm-eval task asks for generation settings {sorted(unknown)}: the lab's engine "
                               f"takes {', '.join(sorted(GEN_KEYS))}")
            until = [kw["until"]] if isinstance(kw.get("until"), str) else list(kw.get("until") or [])
            steps = int(kw.get("max_gen_toks", DEFAULT_GEN_TOKS))
            sample = dict(temperature=float(kw.get("temperature", 1.0)) if kw.get("do_sample") else 0.0,
                          top_k=kw.get("top_k"), top_p=kw.get("top_p"))
            keep = max(1, self.max_length - steps)  # the prompt's last tokens, leaving room for the answer
            ks = sorted(ks, key=lambda k: -len(requests[k].args[0]))
            for b in tqdm(range(0, len(ks), self.batch_size), disable=disable_tqdm, desc="generate_until"):
                batch = ks[b:b + self.batch_size]
                prompts = [self.tok_encode(requests[k].args[0])[-keep:] for k in batch]
                for k, text in zip(batch, self._generate(prompts, steps, until, sample)):
                    out[k] = text
        return out

    def _generate(self, prompts, steps, until, sample) -> list[str]:
        from llmlabs.engine import stream

        rows, done = [[] for _ in prompts], [False] * len(prompts)
        graph = self._device.type == "cuda"  # each decode step one CUDA graph replay (engine_speed: ~10x eager)
        with self.autocast, _capturable_autocast(graph):
            for toks in stream(self.model, prompts, steps, stop_ids=(self.tok.bos_id,), graph=graph, **sample):
                for i, t in enumerate(toks):
                    if done[i]:
                        continue
                    if t == self.tok.bos_id:  # the end of the document: the engine stops the row
                        done[i] = True
                    else:
                        rows[i].append(t)
                        done[i] = any(s in self.tok.decode(rows[i]) for s in until)
                if all(done):
                    break
        texts = [self.tok.decode(r) for r in rows]
        return [min((t[:t.index(s)] for s in until if s in t), key=len, default=t) for t in texts]


def _capturable_autocast(graph):
    """The autocast in force with its cast cache off, for a CUDA graph capture: a cached cast is freed
    when the outermost autocast exits while a graph would keep reading it (PyTorch's CUDA graphs notes
    on autocast); uncached, each replay casts the weights itself. Nothing to change without a graph
    or an autocast."""
    if graph and torch.is_autocast_enabled("cuda"):
        return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)
    return nullcontext()
