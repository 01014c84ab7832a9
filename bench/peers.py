"""The engines `make bench` compares gpt2np with, each driven the same way on the same weights.

- CTranslate2 (float32 and int8), converted from a gpt2np model folder by its own spec API: the
  same mapping as CTranslate2's OpenAI GPT-2 converter, reading safetensors instead of TensorFlow.
- Hugging Face transformers (torch CPU), which reads a gpt2np folder as it is.

Every runner, gpt2np's own included, has the same calls, timed by peers_bench.py with the same
clock and the same prompts: `generate(prompts, n, sample)` (exactly n new tokens per prompt, the
prompts decoded together; greedy, or temperature 0.8 with top-p 0.95) and `score(ids)` (the
log-probability of every token, by gpt2np's method: `<|endoftext|>` first, windows of 1024 tokens
that advance by 512, each token scored once, in the first window that holds it). A peer that is not installed is
skipped; `available()` says which are.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import numpy as np

from gpt2np.weights import SafetensorsFile


def available() -> list[str]:
    names = ["gpt2np"]
    from gpt2np.matmul import requested
    from gpt2np.onednn import library_path
    try:
        if requested() != "numpy" and library_path():
            names.append("gpt2np-numpy")  # the backend on (the default with the extra) and off, side by side
            names += ["gpt2np-bfloat16", "gpt2np-int8"]  # and the low-precision weights it offers
    except Exception:  # noqa: BLE001 -- no oneDNN: one gpt2np runner, NumPy's
        pass
    if importlib.util.find_spec("ctranslate2"):
        names += ["ctranslate2-float32", "ctranslate2-int8"]
    if importlib.util.find_spec("torch") and importlib.util.find_spec("transformers"):
        names.append("transformers")
    return names


class Runner:
    name: str

    def generate(self, prompts: list[list[int]], n: int, sample: bool = False) -> list[list[int]]:
        raise NotImplementedError

    def decode_ms(self, prompt: list[int], n: int) -> float:
        """Greedy decoding of one prompt: ms per token from the first new token to the n-th."""
        raise NotImplementedError

    def score(self, ids: list[int]) -> list[float]:
        out, scored = [], 1
        for begin, window in windows(ids):
            out += self.score_windows([window])[0][scored - begin - 1:]
            scored = begin + len(window)
        return out

    def score_windows(self, windows: list[list[int]]) -> list[list[float]]:
        """log p(w[i] | w[:i]) for i >= 1 of each window."""
        raise NotImplementedError


def windows(ids: list[int], size: int = 1024, stride: int = 512):
    """(start, tokens) of each window gpt2np.score reads, over [<|endoftext|>, *ids]."""
    seq, begin = [50256, *ids], 0
    while True:
        yield begin, seq[begin:begin + size]
        if begin + size >= len(seq):
            return
        begin += stride


class GPT2NP(Runner):
    def __init__(self, folder: Path, backend: str | None = None, weights: str = "float32"):
        import gpt2np
        self.model = gpt2np.load(folder, matmul_backend=backend, weights=weights)
        how = "oneDNN" if self.model.matmul.backend == "onednn" else "NumPy"
        self.name = f"gpt2np {gpt2np.__version__} ({how}{'' if weights == 'float32' else ', ' + weights})"

    def generate(self, prompts, n, sample=False):
        kw = dict(temperature=0.8, top_p=0.95, seed=1) if sample else {}
        return [g.ids for g in self.model.generate_batch(prompts, n, stop_at_eos=False, **kw)]

    def decode_ms(self, prompt, n):
        g = self.model.complete(prompt, n, stop_at_eos=False)
        return g.decode_s / (len(g.ids) - 1) * 1000

    def score(self, ids):
        return self.model.score(ids).logprobs


# ------------------------------------------------------------------------------------ CTranslate2
def ctranslate2_folder(folder: Path, out: Path) -> Path:
    """CTranslate2's model directory for the gpt2np folder `folder` (made once, float32 on disk)."""
    import ctranslate2
    from ctranslate2.converters.converter import Converter
    from ctranslate2.specs import common_spec, transformer_spec

    if (out / "model.bin").exists():
        return out
    config = json.loads((folder / "config.json").read_text())
    weights = {k.removeprefix("transformer."): np.asarray(v)
               for k, v in SafetensorsFile(folder / "model.safetensors").tensors.items()}
    vocab = json.loads((folder / "vocab.json").read_text())

    class FromFolder(Converter):
        def _load(self):
            spec = transformer_spec.TransformerDecoderModelSpec.from_config(
                config["n_layer"], config["n_head"], pre_norm=True, activation=common_spec.Activation.GELUTanh)
            d = spec.decoder
            d.embeddings.weight = weights["wte.weight"]
            d.position_encodings.encodings = weights["wpe.weight"]
            d.scale_embeddings = False
            d.projection.weight = d.embeddings.weight
            d.layer_norm.gamma, d.layer_norm.beta = weights["ln_f.weight"], weights["ln_f.bias"]
            for i, layer in enumerate(d.layer):
                def lin(s, name):  # HF Conv1D stores [in, out]; CTranslate2 wants [out, in]
                    s.weight, s.bias = weights[f"h.{i}.{name}.weight"].T.copy(), weights[f"h.{i}.{name}.bias"]

                def ln(s, name):
                    s.gamma, s.beta = weights[f"h.{i}.{name}.weight"], weights[f"h.{i}.{name}.bias"]
                ln(layer.self_attention.layer_norm, "ln_1")
                lin(layer.self_attention.linear[0], "attn.c_attn")
                lin(layer.self_attention.linear[1], "attn.c_proj")
                ln(layer.ffn.layer_norm, "ln_2")
                lin(layer.ffn.linear_0, "mlp.c_fc")
                lin(layer.ffn.linear_1, "mlp.c_proj")
            spec.config.unk_token = spec.config.bos_token = spec.config.eos_token = "<|endoftext|>"
            spec.register_vocabulary([t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])])
            return spec

    del ctranslate2
    FromFolder().convert(str(out), force=True)
    return out


class CTranslate2(Runner):
    def __init__(self, ct2_folder: Path, vocab: list[str], compute_type: str, threads: int):
        import ctranslate2
        self.name = f"CTranslate2 {ctranslate2.__version__} {compute_type}"
        self.vocab = vocab
        self.index = {t: i for i, t in enumerate(vocab)}
        self.generator = ctranslate2.Generator(str(ct2_folder), device="cpu", compute_type=compute_type,
                                               intra_threads=threads, inter_threads=1)

    def generate(self, prompts, n, sample=False):
        tokens = [[self.vocab[i] for i in p] for p in prompts]
        kw = dict(sampling_topk=0, sampling_topp=0.95, sampling_temperature=0.8) if sample else dict(sampling_topk=1)
        out = self.generator.generate_batch(tokens, max_length=n, min_length=n, include_prompt_in_result=False,
                                            max_batch_size=0, **kw)
        return [r.sequences_ids[0] for r in out]

    def decode_ms(self, prompt, n):
        times = [time.perf_counter() for _ in self.generator.generate_tokens(
            [self.vocab[i] for i in prompt], max_length=n, min_length=n, sampling_topk=1, end_token=[])]
        return (times[-1] - times[0]) / (len(times) - 1) * 1000

    def score_windows(self, windows):
        out = self.generator.score_batch([[self.vocab[i] for i in w] for w in windows])
        return [r.log_probs for r in out]


# ----------------------------------------------------------------------------------- transformers
class Transformers(Runner):
    def __init__(self, folder: Path, threads: int):
        import torch
        import transformers
        torch.set_num_threads(threads)
        self.torch = torch
        self.name = f"transformers {transformers.__version__} (torch {torch.__version__.split('+')[0]} CPU)"
        self.model = transformers.GPT2LMHeadModel.from_pretrained(str(folder), torch_dtype=torch.float32).eval()

    def generate(self, prompts, n, sample=False):
        torch = self.torch
        kw = dict(do_sample=True, temperature=0.8, top_p=0.95, top_k=0) if sample else dict(do_sample=False)
        with torch.inference_mode():
            out = self.model.generate(torch.tensor(prompts), attention_mask=torch.ones_like(torch.tensor(prompts)),
                                      max_new_tokens=n, min_new_tokens=n, pad_token_id=50256, **kw)
        return out[:, len(prompts[0]):].tolist()

    def decode_ms(self, prompt, n):
        import transformers

        class Clock(transformers.generation.streamers.BaseStreamer):
            times: list[float] = []

            def put(self, value):
                self.times.append(time.perf_counter())

            def end(self):
                pass
        clock = Clock()
        clock.times = []
        with self.torch.inference_mode():
            self.model.generate(self.torch.tensor([prompt]), attention_mask=self.torch.ones(1, len(prompt), dtype=self.torch.long),
                                max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=50256, streamer=clock)
        times = clock.times[1:]  # the first put is the prompt itself
        return (times[-1] - times[0]) / (len(times) - 1) * 1000

    def score_windows(self, windows):
        torch = self.torch
        res = []
        with torch.inference_mode():
            for w in windows:
                logits = self.model(torch.tensor([w])).logits[0, :-1]
                lp = torch.log_softmax(logits, -1).gather(1, torch.tensor(w[1:])[:, None])[:, 0]
                res.append(lp.tolist())
        return res


def load(name: str, folder: Path, cache: Path, threads: int) -> Runner:
    if name == "gpt2np":
        return GPT2NP(folder)
    if name == "gpt2np-numpy":
        return GPT2NP(folder, "numpy")
    if name in ("gpt2np-bfloat16", "gpt2np-int8"):
        return GPT2NP(folder, weights=name.split("-")[1])
    if name.startswith("ctranslate2"):
        vocab = [t for t, _ in sorted(json.loads((folder / "vocab.json").read_text()).items(), key=lambda kv: kv[1])]
        return CTranslate2(ctranslate2_folder(folder, cache), vocab, name.split("-")[1], threads)
    if name == "transformers":
        return Transformers(folder, threads)
    raise ValueError(name)

