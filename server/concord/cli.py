"""`concord`: the command line. Subcommands: serve, models, openapi, bake, texture, train-micro, demo.

Errors a user can cause print one line `concord <cmd>: error: ...` (plus a hint) and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import socket
import sys
from pathlib import Path

from concord import __version__
from concord.models.registry import DEFAULT_MODEL


def _fail(cmd: str, message: str, code: int = 2) -> int:
    print(f"concord {cmd}: error: {message}", file=sys.stderr)
    return code


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def cmd_serve(args) -> int:
    from concord.api.app import ServerSettings, create_app
    from concord.models.registry import ModelUnavailable, load_model

    token = args.token or os.environ.get("CONCORD_TOKEN") or None
    if not _is_loopback(args.host) and not token:
        return _fail(
            "serve",
            f"binding {args.host} exposes the server to other machines; that needs a token. "
            "Pass --token T (or set CONCORD_TOKEN) and give clients the same token, or keep --host 127.0.0.1.",
        )
    if not _port_free(args.host, args.port):
        return _fail("serve", f"port {args.port} on {args.host} is in use (another Concord server?). Pick another with --port.")
    data_dir = Path(args.data_dir).expanduser()
    print(f"Concord {__version__}: loading model {args.model!r} (device {args.device})...", flush=True)
    try:
        model = load_model(args.model, args.device, config=args.config)
    except ModelUnavailable as exc:
        return _fail("serve", str(exc))
    settings = ServerSettings(
        model=args.model,
        model_config=args.config,
        device=args.device,
        data_dir=data_dir,
        token=token,
        max_queue=args.max_queue,
        max_upload_mb=args.max_upload_mb,
    )
    app = create_app(settings, model=model)
    import uvicorn

    print(
        f"Concord serving on http://{args.host}:{args.port} (model {model.name}, {model.device}, {model.dtype}; "
        f"data in {data_dir})",
        flush=True,
    )
    print(f"Jobs that set nothing run at the model's recommended settings: {model.settings.describe()}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=args.log_level == "debug")
    return 0


def cmd_models(args) -> int:
    from concord.models.registry import PRESETS, offline_status, preset_recommended

    for p in PRESETS.values():
        ok, reason = offline_status(p.name)
        print(f"{p.name:12s} {'available' if ok else 'not on disk':12s} {p.description}")
        if args.verbose:
            print(f"{'':12s} recommended: {preset_recommended(p).describe()}")
        if reason and args.verbose:
            print(f"{'':12s} {reason}")
    return 0


def cmd_openapi(args) -> int:
    doc = openapi_document()
    text = json.dumps(doc, indent=2, sort_keys=True) + "\n"
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    return 0


def openapi_document() -> dict:
    """The protocol's OpenAPI document, from the app itself (no model is loaded to build it)."""
    from concord.api.app import ServerSettings, create_app

    return create_app(ServerSettings()).openapi()


def cmd_bake(args) -> int:
    from concord.geometry import bake_command

    return bake_command.main_from_args(args)


def cmd_texture(args) -> int:
    from concord import texture_command

    return texture_command.main_from_args(args)


def cmd_stylize(args) -> int:
    from concord import stylize_command

    return stylize_command.main_from_args(args)


def cmd_train_micro(args) -> int:
    from concord.micro import train as micro_train

    return micro_train.main_from_args(args)


def cmd_demo(args) -> int:
    from concord import demo

    return demo.main(out_dir=Path(args.out), model=args.model)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="concord", description="Consistent multi-image diffusion, served locally.")
    parser.add_argument("--version", action="version", version=f"concord {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the local job server")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (loopback by default; others need --token)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"preset name, diffusers folder or .safetensors file (default {DEFAULT_MODEL})")
    p.add_argument("--config", default=None, metavar="DIR",
                   help="for a .safetensors --model: a diffusers folder of its family with the configuration files "
                        "(and optionally controlnet/); default: the family's preset's, from the Hugging Face cache")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--data-dir", default=str(Path.home() / ".concord"), help="where job folders and results live")
    p.add_argument("--token", default=None, help="require `Authorization: Bearer TOKEN` on every request")
    p.add_argument("--max-queue", type=int, default=8, help="jobs that may wait; more are refused with 429")
    p.add_argument("--max-upload-mb", type=int, default=256, help="largest request accepted (413 above)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("models", help="list model presets and whether each loads offline")
    p.add_argument("-v", "--verbose", action="store_true", help="each model's recommended settings, and how to get the missing ones")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("openapi", help="print (or write) the protocol's OpenAPI document")
    p.add_argument("--out", default=None)
    p.set_defaults(func=cmd_openapi)

    try:
        from concord.geometry import bake_command
    except ImportError:
        bake_command = None
    if bake_command is not None:
        p = sub.add_parser("bake", help="bake given images onto a mesh's UVs from a transforms.json rig")
        bake_command.add_arguments(p)
        p.set_defaults(func=cmd_bake)

    from concord import texture_command

    p = sub.add_parser("texture", help="texture a mesh from a prompt (in-process, or on a server with --server)")
    texture_command.add_arguments(p)
    p.set_defaults(func=cmd_texture)

    from concord import stylize_command

    p = sub.add_parser("stylize", help="stylize an animation's frames consistently (in-process, or on a server with --server)")
    stylize_command.add_arguments(p)
    p.set_defaults(func=cmd_stylize)

    from concord.micro import train as micro_train

    p = sub.add_parser("train-micro", help="train Concord's embedded micro model (docs/micro-model.md)")
    micro_train.add_arguments(p)
    p.set_defaults(func=cmd_train_micro)

    p = sub.add_parser("demo", help="run the main job end to end on the embedded model")
    p.add_argument("--out", default="out/demo")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"the embedded model to run (default {DEFAULT_MODEL})")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from concord.models.registry import quiet_libraries

    quiet_libraries()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
