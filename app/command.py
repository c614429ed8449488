"""`personalize app`: launch the browser app (Train, Generate, Evaluate, Concepts) and print its URL.

Gradio is imported only when the app starts, so `personalize --help` stays fast.
"""

from __future__ import annotations

import argparse
import logging

from personalize.base_models import DEFAULT_BASE_MODEL

from .locations import default_workspace


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base-model",
        default=DEFAULT_BASE_MODEL,
        help=f"hub id, diffusers folder, .safetensors file, or a built-in: 'shapes', 'tiny' (default {DEFAULT_BASE_MODEL}; "
        "falls back to the built-in 'shapes' when it cannot be loaded)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=None, help="port (default: the first free one from 7860)")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    parser.add_argument(
        "--workspace", default=str(default_workspace()), help=f"folder where concepts are kept (default {default_workspace()})"
    )


def run(args: argparse.Namespace) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own start-up requests are noise here
    from .state import AppState
    from .ui import build_app, launch_options

    print(f"loading base model {args.base_model} ...", flush=True)
    state = AppState.open(args.workspace, args.base_model)
    if state.base.banner:
        print(f"warning: {state.base.banner}", flush=True)
    demo = build_app(state)
    demo.queue()
    _, local_url, share_url = demo.launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        prevent_thread_lock=True,
        quiet=True,
        **launch_options(state),
    )
    print(f"personalize app running at {local_url}  (workspace {state.workspace.root}; Ctrl+C to stop)", flush=True)
    if share_url:
        print(f"public link: {share_url}", flush=True)
    try:
        demo.block_thread()
    finally:
        if state.jobs.stop():
            print("stopping the training job after its current step (the adapter is kept) ...", flush=True)
            state.jobs.wait(timeout=120)
        demo.close()
    return 0
