"""Model folders on the nodes of a Ray cluster: each node checks its own copy (present, loadable,
equal to its SHA256SUMS, that SHA256SUMS the first node's), and an error names the node."""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path

from ..errors import GPT2Error
from ..integrity import SUMS_FILE
from ..integrity import verify as verify_sums


def sums_digest(model_dir: str | Path) -> str:
    """A digest of the folder's SHA256SUMS ("" without one): equal digests, equal copies."""
    try:
        return hashlib.sha256((Path(model_dir) / SUMS_FILE).read_bytes()).hexdigest()
    except OSError:
        return ""


def node_name() -> str:
    """This node, as an error message names it: its Ray node IP (or host name) and id."""
    try:
        import ray

        ctx = ray.get_runtime_context()
        return f"{ray.util.get_node_ip_address()} ({ctx.get_node_id()[:12]})"
    except Exception:  # noqa: BLE001 -- outside Ray: the host is name enough
        return socket.gethostname()


def check_model_dir(model_dir: str | Path, verify: bool = True, expect_sums: str | None = None,
                    weights: str = "float32"):
    """Load the model folder here (with its weights at `weights`, as `gpt2np.load`), after checking
    its files against SHA256SUMS if it has one (and, with `expect_sums`, that SHA256SUMS is the
    other nodes'); `GPT2Error` naming this node if it is missing or differs."""
    from ..api import load

    folder = Path(model_dir)
    try:
        if expect_sums is not None and folder.is_dir() and sums_digest(folder) != expect_sums:
            raise GPT2Error(f"{folder}: its SHA256SUMS differs from the copy on the first node checked")
        if verify and (folder / SUMS_FILE).is_file():
            bad = [f"{name} {status}" for name, status in verify_sums(folder) if status != "ok"]
            if bad:
                raise GPT2Error(f"{folder}: files differ from its SHA256SUMS: {', '.join(bad)}")
        return load(folder, weights=weights)
    except GPT2Error as e:
        raise GPT2Error(f"on node {node_name()}: {e}") from None
