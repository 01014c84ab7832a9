"""Make GPT-2 checkpoints exactly as OpenAI publishes them, with random weights.

A folder with the seven files of `gpt-2/models/<MODEL>/`: `checkpoint`, `encoder.json`, `hparams.json`,
`model.ckpt.data-00000-of-00001`, `model.ckpt.index`, `model.ckpt.meta`, `vocab.bpe`; variables under
TF1 names (`model/h0/attn/c_attn/w`, [1, E, 3E]) saved by `tf.compat.v1.train.Saver`.

    python tests/helpers/make_checkpoint.py OUT_DIR [--n-layer 2 --n-embd 64 --n-head 4 --n-ctx 64 --seed 0]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

BPE_DIR = Path(__file__).parent.parent / "data" / "gpt2-bpe"
SEVEN_FILES = ("checkpoint", "encoder.json", "hparams.json", "model.ckpt.data-00000-of-00001",
               "model.ckpt.index", "model.ckpt.meta", "vocab.bpe")


def openai_shapes(hp: dict) -> dict[str, tuple[int, ...]]:
    """The variables of OpenAI's GPT-2 checkpoint and their shapes, for hparams.json `hp`."""
    E, V, C = hp["n_embd"], hp["n_vocab"], hp["n_ctx"]
    shapes = {"model/wte": (V, E), "model/wpe": (C, E)}
    for i in range(hp["n_layer"]):
        h = f"model/h{i}/"
        shapes.update({
            h + "ln_1/g": (E,), h + "ln_1/b": (E,),
            h + "attn/c_attn/w": (1, E, 3 * E), h + "attn/c_attn/b": (3 * E,),
            h + "attn/c_proj/w": (1, E, E), h + "attn/c_proj/b": (E,),
            h + "ln_2/g": (E,), h + "ln_2/b": (E,),
            h + "mlp/c_fc/w": (1, E, 4 * E), h + "mlp/c_fc/b": (4 * E,),
            h + "mlp/c_proj/w": (1, 4 * E, E), h + "mlp/c_proj/b": (E,),
        })
    shapes.update({"model/ln_f/g": (E,), "model/ln_f/b": (E,)})
    return shapes


def random_openai_weights(hp: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights at scales that give varied, untied logits and non-trivial attention."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in openai_shapes(hp).items():
        if name.endswith("/g"):
            a = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name.endswith("/b"):
            a = 0.05 * rng.standard_normal(shape)
        elif name in ("model/wte", "model/wpe"):
            a = 0.3 * rng.standard_normal(shape)
        else:
            a = rng.standard_normal(shape) / np.sqrt(shape[-2])
        out[name] = a.astype(np.float32)
    return out


def save_checkpoint(out: Path, hp: dict, weights: dict[str, np.ndarray]) -> Path:
    """Write the seven files of an OpenAI GPT-2 model folder to `out`."""
    from gpt2np_convert.checkpoint import import_tensorflow

    tf = import_tensorflow()
    out.mkdir(parents=True, exist_ok=True)
    graph = tf.Graph()
    with graph.as_default():
        variables, assigns, feeds = [], [], {}
        for name, value in weights.items():
            var = tf.compat.v1.get_variable(name, shape=value.shape, dtype=tf.float32,
                                            initializer=tf.compat.v1.zeros_initializer())
            placeholder = tf.compat.v1.placeholder(tf.float32, value.shape)
            variables.append(var)
            assigns.append(var.assign(placeholder))
            feeds[placeholder] = value
        saver = tf.compat.v1.train.Saver(variables)
        with tf.compat.v1.Session(graph=graph) as session:
            session.run(assigns, feeds)
            saver.save(session, str(out / "model.ckpt"))
    # OpenAI's `checkpoint` file names the prefix relative to the folder.
    (out / "checkpoint").write_text('model_checkpoint_path: "model.ckpt"\n'
                                    'all_model_checkpoint_paths: "model.ckpt"\n')
    (out / "hparams.json").write_text(json.dumps(hp, indent=2))
    shutil.copyfile(BPE_DIR / "encoder.json", out / "encoder.json")
    shutil.copyfile(BPE_DIR / "vocab.bpe", out / "vocab.bpe")
    assert sorted(p.name for p in out.iterdir()) == sorted(SEVEN_FILES)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--n-embd", type=int, default=64)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-ctx", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    hp = {"n_vocab": 50257, "n_ctx": a.n_ctx, "n_embd": a.n_embd, "n_head": a.n_head, "n_layer": a.n_layer}
    save_checkpoint(a.out, hp, random_openai_weights(hp, a.seed))


if __name__ == "__main__":
    main()
