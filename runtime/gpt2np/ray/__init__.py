"""GPT-2 as a stage of a Ray Data pipeline (the extra `gpt2np[ray]`): `Generate` and `Score`.

Callable classes for `Dataset.map_batches` with an actor pool, as in Ray Data's batch-inference
guide: each actor loads the model folder once (a memory map, so every actor on a node shares the
same page-cache pages) and runs each batch through the engine's decode loop, the one that
`GPT2.generate_batch` uses::

    import ray
    from ray.data import ActorPoolStrategy
    from gpt2np.ray import Generate

    ds = ray.data.read_json("prompts.jsonl")                 # a "prompt" column, and any others
    ds = ds.map_batches(Generate, fn_constructor_kwargs={"model_dir": "/models/124M", "n_tokens": 40,
                                                         "temperature": 0.8, "seed": 1},
                        compute=ActorPoolStrategy(size=2), batch_size=16, num_cpus=1)
    ds.write_json("out/")

A batch is a dict of columns (Ray's "numpy" or "pandas" batch format). The other columns pass
through unchanged; the results are new columns. A row that cannot be done (a prompt too long, bad
ids, not text) gets its one-line message in an `error` column, and the rest of the batch goes on;
a row that arrives with an `error` already (from an earlier stage) is passed through untouched.

The model folder must be readable at the same path on every node. An actor checks it when it
starts, and its files against `SHA256SUMS` when the folder has one (`verify=False` skips that;
`expect_sums=sums_digest(folder)` also requires every node's SHA256SUMS to be the same): a missing
or different folder fails the actor with one line that names the node.

With a `seed`, each row's random stream comes from the seed and the row's `id` column
(`row_seed(seed, id)`), so it does not depend on which actor or batch the row lands in; without
an `id` column every row uses the seed itself, as `generate_batch` does.
"""

from .nodes import check_model_dir, sums_digest
from .stages import Generate, Score, row_seed

__all__ = ["Generate", "Score", "row_seed", "check_model_dir", "sums_digest"]
