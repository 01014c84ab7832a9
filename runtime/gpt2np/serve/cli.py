"""`gpt-serve`: serve a model folder over OpenAI's completions API."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

import click

from ..cli.common import run_command, weights_option
from ..errors import GPT2Error, missing_extra

DEFAULT_BATCHED_TOKENS = 2048  # vLLM's default for --max-num-batched-tokens: a lone prompt is read whole
DEFAULT_STALL = 2.5  # a step that reads prompt tokens takes at most this many decode steps
DEFAULT_CACHE_POSITIONS = 4096  # the prefix cache holds this many positions by default


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("model_dir", type=click.Path(file_okay=False, path_type=str))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0 for every interface).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535),
              help="Port to listen on (0: any free port, printed on stderr).")
@click.option("--model-name", default=None, help="The model's name in the API [default: MODEL_DIR's folder name].")
@click.option("--api-key", envvar="GPT2NP_API_KEY", default=None,
              help="Require `Authorization: Bearer KEY` on every /v1/ and tokenizer request [env: GPT2NP_API_KEY].")
@click.option("--max-batch", default=16, show_default=True, type=click.IntRange(min=1),
              help="The most sequences decoded together in one forward pass.")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(min=0),
              help="The most sequences waiting for a place in the batch; beyond it requests get 429.")
@click.option("--max-num-batched-tokens", "max_batched_tokens", default=DEFAULT_BATCHED_TOKENS, show_default=True,
              type=click.IntRange(min=1), help="The most positions in one forward pass: each decoding sequence "
              "takes one, prompts being read share the rest (at least --max-batch).")
@click.option("--prefill-stall", default=DEFAULT_STALL, show_default=True, type=click.FloatRange(min=1, min_open=True),
              help="While streams decode, a prompt is read in chunks sized (from measured step times) so that "
                   "a step reading one takes at most this many times a step that only decodes.")
@click.option("--prefill-chunk", default=None, type=click.IntRange(min=1),
              help="A fixed limit on prompt tokens read per step [default: none].")
@click.option("--prefix-cache-mb", default=None, type=click.FloatRange(min=0),
              help="Memory for the prefix cache, which reuses computed prompt prefixes (and their "
                   "log-probabilities) across requests; 0 turns it off [default: 4096 positions' worth].")
@click.option("--max-stop-strings", envvar="GPT2NP_MAX_STOP_STRINGS", default=None, type=click.IntRange(min=0),
              help="The most stop strings one request may give [default: 4, OpenAI's limit; lm-evaluation-harness "
                   "may send more] [env: GPT2NP_MAX_STOP_STRINGS].")
@click.option("--header-timeout", default=10.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds a request's headers may take to arrive, from its first byte (408 and close beyond).")
@click.option("--body-timeout", default=30.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds a request's body may take to arrive, once its headers are in (408 and close beyond).")
@click.option("--max-connections", default=1024, show_default=True, type=click.IntRange(min=1),
              help="The most open connections; one more gets 503 and is closed at once.")
@click.option("--grace-period", default=30.0, show_default=True, type=click.FloatRange(min=0),
              help="On SIGTERM or Ctrl-C: seconds to let running requests finish before cancelling them.")
@click.option("--no-ui", is_flag=True, help="Leave out the playground page at / (the API alone).")
@weights_option
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]), help="How much to log on stderr.")
def serve(model_dir, host, port, model_name, api_key, max_batch, max_queue, max_batched_tokens, prefill_stall,
          prefill_chunk, prefix_cache_mb, max_stop_strings, header_timeout, body_timeout, max_connections,
          grace_period, no_ui, weights, log_level):
    """Serve the GPT-2 model in MODEL_DIR over HTTP with OpenAI's completions API.

    \b
    Endpoints: POST /v1/completions (streaming too), GET /v1/models, GET /health,
    POST /tokenize and /detokenize, GET /tokenizer_info (vLLM's), GET /metrics (Prometheus),
    and the playground page at / (open it in a browser; --no-ui leaves it out).

    Requests are decoded together with continuous batching: new ones join between steps,
    finished ones leave at once. On SIGTERM or Ctrl-C the server answers new requests with
    503, lets running ones finish (up to --grace-period seconds), and exits 0.
    """
    if max_batched_tokens < max_batch:
        raise GPT2Error(f"--max-num-batched-tokens ({max_batched_tokens}) must be at least --max-batch ({max_batch})")
    try:
        import uvicorn

        from .app import ServerState, create_app
        from .connections import guarded_protocol
    except ImportError as e:
        raise missing_extra("gpt-serve", "serve", e) from None
    from ..api import load
    from ..prefix_cache import PrefixCache
    from .metrics import Metrics
    from .protocol import MAX_STOP
    from .worker import EngineWorker

    model = load(model_dir, weights=weights)
    name = model_name or Path(model_dir).resolve().name
    metrics = Metrics()
    metrics.packed_weight_bytes.set(model.matmul.packed_bytes)
    print(f"gpt-serve: {model.matmul.describe()}", file=sys.stderr, flush=True)
    if prefix_cache_mb is None:
        prefix_cache_mb = DEFAULT_CACHE_POSITIONS * PrefixCache.bytes_per_position(model.config) / 2**20
    engine = model.engine(max_batch=max_batch, prefill_chunk=prefill_chunk, prefix_cache=prefix_cache_mb,
                          max_batched_tokens=max_batched_tokens, prefill_stall=prefill_stall)
    worker = EngineWorker(engine, max_queue, metrics)
    state = ServerState(model=model, model_name=name, worker=worker, metrics=metrics, api_key=api_key or None,
                        max_stop=MAX_STOP if max_stop_strings is None else max_stop_strings, body_timeout=body_timeout,
                        model_dir=model_dir, ui=not no_ui)
    sock = _listen(host, port)
    worker.start()
    config = uvicorn.Config(create_app(state), host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=5, lifespan="off",
                            http=guarded_protocol(header_timeout, max_connections))
    server = DrainingServer(config, state, grace_period)
    try:
        server.run(sockets=[sock])
    finally:
        worker.stop()
        sock.close()


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, opened before the server starts so that a taken port or a bad
    address is one clear error."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # IPPROTO_TCP named, and TCP_NODELAY set here (connections inherit it): asyncio sets
        # TCP_NODELAY only on sockets whose proto says TCP, and without it each response's last
        # small write waited for the client's delayed ACK, 40 ms on Linux.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except (OSError, OverflowError) as e:
        raise GPT2Error(f"cannot listen on {host}:{port}: {getattr(e, 'strerror', None) or e}") from None
    sock.set_inheritable(True)
    return sock


class DrainingServer:
    """uvicorn's server, with a shutdown that drains: the first SIGTERM or SIGINT makes every new
    request a 503 while running ones finish; when none is left (or after the grace period, which
    cancels them) the server stops and the process exits 0. A second signal stops at once."""

    def __new__(cls, config, state, grace_period):
        import uvicorn

        class _Server(uvicorn.Server):
            def handle_exit(self, sig, frame):
                if state.draining:
                    self.should_exit = self.force_exit = True
                    return
                logging.getLogger("gpt2np.serve").info(
                    "draining: new requests get 503; waiting for %d running (at most %.0f s)",
                    state.worker.active, grace_period)
                state.draining = True
                self.drain_deadline = time.monotonic() + grace_period

            async def on_tick(self, counter):
                if state.draining and not self.should_exit:
                    idle = state.worker.active == 0 and state.in_flight == 0
                    if idle or time.monotonic() > self.drain_deadline:
                        if not idle:
                            state.worker.cancel_all()
                        self.should_exit = True
                return await super().on_tick(counter)

            async def startup(self, sockets=None):
                await super().startup(sockets)
                for sock in sockets or []:
                    host, port = sock.getsockname()[:2]
                    host = f"[{host}]" if ":" in host else host
                    print(f"gpt-serve: serving {state.model_name} on http://{host}:{port} "
                          "(Ctrl-C or SIGTERM to stop)", file=sys.stderr, flush=True)
                    if state.ui:
                        print(f"gpt-serve: the playground: open http://{host}:{port}/ in a browser",
                              file=sys.stderr, flush=True)

        return _Server(config)


def main() -> None:
    # Signals during the model's load are an interrupted start (exit 130); the server installs its own.
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    run_command(serve, "gpt-serve", interrupted="interrupted")
