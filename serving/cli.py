"""`lightspan serve`: the command line of the OpenAI-compatible server (`lightspan.serving.server`).

Only argparse here; torch, transformers and FastAPI load when the command runs, so `lightspan
--help` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve a Hugging Face causal LM over an OpenAI-compatible API, reloading new checkpoints",
        description=(
            "OpenAI-compatible server (FastAPI; /v1/chat/completions, /v1/completions, /v1/models, "
            "POST /v1/reload, /health) with batching, token-by-token streaming (stream: true), "
            "vLLM-style return_token_ids and logprobs. With --store and --resource it serves the "
            "latest published checkpoint of RESOURCE and swaps in each newer one without dropping "
            "requests. POST /v1/reload loads the store's latest version ({}), a published one "
            '({"version": N}) or the --model folder again; a "path" only with --allow-reload-path.'
        ),
    )
    parser.add_argument(
        "--model", metavar="DIR", help="Hugging Face model folder (fallback until RESOURCE has a version)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument(
        "--port", type=int, default=8000, help="port; 0 picks a free one (default: %(default)s)"
    )
    parser.add_argument(
        "--store",
        metavar="URL",
        help="store to poll: chdb:///dir or http://host:port (a collector); "
        "default with --resource: $LIGHTSPAN_STORE or ./lightspan-data",
    )
    parser.add_argument("--resource", metavar="NAME", help="checkpoint resource name to serve and follow")
    parser.add_argument(
        "--poll-seconds",
        type=float,
        default=10.0,
        metavar="S",
        help="how often to look for a newer version (default: %(default)s)",
    )
    parser.add_argument(
        "--max-batch",
        type=int,
        default=32,
        metavar="N",
        help="most sequences decoded together (default: %(default)s)",
    )
    parser.add_argument(
        "--keep-versions",
        type=int,
        default=2,
        metavar="K",
        help='newest published versions kept loaded, each answering model="RESOURCE:VERSION" '
        '(model="RESOURCE" answers with the routed one) (default: %(default)s)',
    )
    parser.add_argument(
        "--allow-reload-path",
        action="store_true",
        help='let POST /v1/reload {"path": DIR} load any model folder this process can read '
        "(off: only published versions of RESOURCE, or the --model folder again)",
    )
    parser.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:1 ...")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="weights dtype; auto = bf16/fp16 on GPU, float32 on CPU",
    )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from lightspan.serving.server import InferenceServer
    from lightspan.store.url import default_url

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = InferenceServer(
        args.model,
        host=args.host,
        port=args.port,
        store=args.store or (default_url() if args.resource else None),
        resource=args.resource,
        poll_seconds=args.poll_seconds,
        max_batch=args.max_batch,
        device=args.device,
        dtype=args.dtype,
        allow_reload_path=args.allow_reload_path,
        keep_versions=args.keep_versions,
    ).start()
    # One line on stdout that scripts (and tests) read to find the port.
    print(f"lightspan serve: serving {server.model.id} on {server.url}", flush=True, file=sys.stdout)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` and container stops end it like Ctrl-C
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass  # serve_forever closed the server on its way out
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
